#!/usr/bin/env bash
# Offline checks of the deployment files under deploy/.
#
#   scripts/check-deploy.sh               run every check (exit non-zero on the first failure)
#   scripts/check-deploy.sh --sync-rules  rewrite deploy/kubernetes/base/prometheusrule.yaml
#                                         from deploy/prometheus/kdedup-alerts.yaml, then check
#
# What it checks:
#   1. `kubectl kustomize` renders the base and every overlay under deploy/kubernetes/overlays/.
#   2. Every rendered object, and every Job under deploy/kubernetes/jobs/, validates against the
#      Kubernetes OpenAPI schemas (kubernetes-validate, strict: unknown fields are errors) for
#      each version in KUBE_VERSIONS. The Prometheus Operator CRDs (PodMonitor, PrometheusRule)
#      have no core schema: they are skipped by kind and checked structurally instead. Then
#      kdedup-specific rules: only KDEDUP_* variables that src/ reads, secrets only through
#      secretKeyRef, no Secret objects, the hardened securityContext, the native sidecar and
#      its probes, terminationGracePeriodSeconds above KDEDUP_SHUTDOWN_TIMEOUT, and a
#      migration Job exactly where KDEDUP_MIGRATE_ON_START=false.
#   3. `promtool check rules` on deploy/prometheus/kdedup-alerts.yaml, `promtool test rules` on
#      unit tests kept in this script (every alert fires on a bad series and stays quiet on a
#      healthy one; two kdedup Deployments in one namespace alert apart), and the rendered
#      PrometheusRule carries exactly the same rules.
#   4. The Grafana dashboard parses, is wired to the ${DS_PROMETHEUS} datasource variable, and
#      every PromQL query in it parses (promtool, with the Grafana variables substituted).
#      That each query also returns data is tests/it/prometheus.rs' job (a real Prometheus
#      scraping a real sidecar).
#
# Needs kubectl and python3 (3.9+). kubernetes-validate is installed into .tmp/venv on the first
# run. promtool is taken from PATH, or else from the Debian package `prometheus`, unpacked into
# .tmp/prometheus-deb with `apt-get download` (no service is installed or started). Nothing needs
# the network after the first run.
set -euo pipefail

# Pinned: 1.37.0 bundles the schemas of Kubernetes 1.25 to 1.37.
KUBERNETES_VALIDATE_VERSION=1.37.0
# 1.29: the oldest release where native sidecars (initContainers with restartPolicy: Always)
# are on by default. 1.37: the newest schema bundled by the pinned kubernetes-validate.
KUBE_VERSIONS="1.29.0 1.37.0"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV=.tmp/venv
WORK=.tmp/check-deploy
PROM_DEB_DIR=.tmp/prometheus-deb
RULES=deploy/prometheus/kdedup-alerts.yaml
PROMETHEUS_RULE=deploy/kubernetes/base/prometheusrule.yaml
DASHBOARD=deploy/grafana/kdedup-dashboard.json

die() {
  printf 'check-deploy: FAIL: %s\n' "$*" >&2
  exit 1
}
say() { printf '==> %s\n' "$*"; }

sync_rules=0
case "${1:-}" in
  "") ;;
  --sync-rules) sync_rules=1 ;;
  -h | --help)
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 0
    ;;
  *) die "unknown argument '$1' (try --help)" ;;
esac

command -v kubectl >/dev/null || die "kubectl not found on PATH (needed for 'kubectl kustomize')"
command -v python3 >/dev/null || die "python3 not found on PATH"
mkdir -p "$WORK"

# --- tools ---------------------------------------------------------------------------------

ensure_venv() {
  if [ -x "$VENV/bin/python" ] &&
    "$VENV/bin/python" -c "import sys, yaml, kubernetes_validate.version as v; sys.exit(v.__version__ != '$KUBERNETES_VALIDATE_VERSION')" 2>/dev/null; then
    return
  fi
  say "installing kubernetes-validate==$KUBERNETES_VALIDATE_VERSION into $VENV"
  python3 -m venv "$VENV" || die "could not create a venv in $VENV (Debian: apt-get install python3-venv)"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" ||
    die "pip could not install kubernetes-validate==$KUBERNETES_VALIDATE_VERSION (is PyPI reachable?)"
  "$VENV/bin/python" -c "import yaml, kubernetes_validate" ||
    die "kubernetes-validate installed but does not import"
}

PROMTOOL=""
ensure_promtool() {
  if command -v promtool >/dev/null; then
    PROMTOOL="$(command -v promtool)"
    return
  fi
  if [ -x "$PROM_DEB_DIR/usr/bin/promtool" ]; then
    PROMTOOL="$ROOT/$PROM_DEB_DIR/usr/bin/promtool"
    return
  fi
  if ! command -v apt-get >/dev/null || ! command -v dpkg-deb >/dev/null; then
    die "promtool not found. Install it (Debian/Ubuntu: apt-get install prometheus) or put it on PATH."
  fi
  say "promtool not on PATH: unpacking it from the Debian package 'prometheus' into $PROM_DEB_DIR"
  local dl="$WORK/deb"
  rm -rf "$dl" && mkdir -p "$dl"
  if ! (cd "$dl" && apt-get download prometheus >apt.log 2>&1); then
    if [ "$(id -u)" = 0 ]; then
      apt-get update >"$dl/apt-update.log" 2>&1 || die "apt-get update failed, see $dl/apt-update.log"
      (cd "$dl" && apt-get download prometheus >apt.log 2>&1) ||
        die "apt-get download prometheus failed, see $dl/apt.log"
    else
      die "promtool not found and 'apt-get download prometheus' failed (see $dl/apt.log). Run 'apt-get update' as root, or install promtool (apt-get install prometheus)."
    fi
  fi
  rm -rf "$PROM_DEB_DIR"
  dpkg-deb -x "$dl"/prometheus_*.deb "$PROM_DEB_DIR" || die "could not unpack the prometheus .deb"
  rm -rf "$dl"
  [ -x "$PROM_DEB_DIR/usr/bin/promtool" ] || die "the prometheus package holds no usr/bin/promtool"
  PROMTOOL="$ROOT/$PROM_DEB_DIR/usr/bin/promtool"
}

ensure_venv
PY="$VENV/bin/python"

# The KDEDUP_* names the binary reads, from its source: every clap `env = "KDEDUP_..."`, and
# the logging variables src/telemetry.rs reads itself. Test-only hooks (src/crash.rs) are
# left out on purpose: they have no business in a manifest.
KDEDUP_KNOWN_ENV="$(
  {
    grep -rhoE 'env = "KDEDUP_[A-Z0-9_]+"' src
    grep -hoE 'env::var\("KDEDUP_[A-Z0-9_]+"\)' src/telemetry.rs
  } | grep -oE 'KDEDUP_[A-Z0-9_]+' | sort -u | tr '\n' ' '
)"
for must in KDEDUP_BROKERS KDEDUP_DATABASE_URL KDEDUP_SHUTDOWN_TIMEOUT KDEDUP_MIGRATE_ON_START KDEDUP_LOG; do
  case " $KDEDUP_KNOWN_ENV " in
    *" $must "*) ;;
    *) die "could not find $must among the variables src/ reads (found: $KDEDUP_KNOWN_ENV)" ;;
  esac
done
export KDEDUP_KNOWN_ENV

# The Python half of the checks, written out on every run so it always matches this script.
cat >"$WORK/check_deploy.py" <<'PYEOF'
"""Helpers for scripts/check-deploy.sh; see the comments there."""
import json
import os
import re
import sys

import yaml

# Every KDEDUP_* variable the binary reads, collected from src/ by check-deploy.sh
# (clap's `env = "KDEDUP_..."` attributes and telemetry's own reads); KDEDUP_KAFKA_* pass
# through to librdkafka. tests/it/deploy.rs asks the compiled binary the same question.
ALLOWED_ENV = set(os.environ.get("KDEDUP_KNOWN_ENV", "").split())
SECRET_ENV = {"KDEDUP_DATABASE_URL", "KDEDUP_KAFKA_SASL_USERNAME", "KDEDUP_KAFKA_SASL_PASSWORD"}
SUBCOMMANDS = {"run", "migrate", "replay", "prune", "inspect", "stats", "demo"}
CRD_KINDS = {("monitoring.coreos.com/v1", "PodMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}


def is_secret_name(name):
    return name in SECRET_ENV or "PASSWORD" in name or name.endswith("_SECRET")


def load_docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def where(doc):
    meta = doc.get("metadata", {})
    return "%s/%s" % (doc.get("kind"), meta.get("name") or meta.get("generateName") or "?")


def duration_seconds(text):
    total, pos = 0.0, 0
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    for m in re.finditer(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)", text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * units[m.group(2)]
        pos = m.end()
    if pos != len(text) or not text:
        raise ValueError("cannot parse duration %r" % text)
    return total


def check_crd(doc, errors):
    w, spec = where(doc), doc.get("spec") or {}
    if doc["kind"] == "PodMonitor":
        sel = spec.get("selector", {}).get("matchLabels")
        eps = spec.get("podMetricsEndpoints")
        if not sel:
            errors.append("%s: spec.selector.matchLabels is missing" % w)
        if not eps or not all(isinstance(e, dict) and e.get("port") for e in eps):
            errors.append("%s: every spec.podMetricsEndpoints entry needs a port name" % w)
        elif not any(e.get("port") == "metrics" and e.get("path", "/metrics") == "/metrics" for e in eps):
            errors.append("%s: no endpoint scrapes port 'metrics' at /metrics" % w)
    else:
        groups = spec.get("groups")
        if not isinstance(groups, list) or not groups:
            errors.append("%s: spec.groups is empty" % w)
            return
        for g in groups:
            if not g.get("name") or not isinstance(g.get("rules"), list):
                errors.append("%s: every group needs a name and rules" % w)
            for r in g.get("rules") or []:
                if not r.get("expr") or not (r.get("alert") or r.get("record")):
                    errors.append("%s: rule without expr or alert/record: %r" % (w, r))


def env_entries(container):
    return [e for e in container.get("env") or []]


def check_pod_spec(doc, pod, configmaps, errors):
    w = where(doc)
    init = pod.get("initContainers") or []
    main = pod.get("containers") or []
    kdedup = [c for c in init + main if "kdedup" in c.get("image", "")]
    if not kdedup:
        return
    for c in kdedup:
        cw = "%s container %s" % (w, c["name"])
        args = c.get("args") or c.get("command") or []
        if not args or args[0] not in SUBCOMMANDS:
            errors.append("%s: args must start with a subcommand of %s, got %r" % (cw, sorted(SUBCOMMANDS), args))
        for e in env_entries(c):
            name = e["name"]
            if name.startswith("KDEDUP_") and name not in ALLOWED_ENV and not name.startswith("KDEDUP_KAFKA_"):
                errors.append("%s: unknown variable %s" % (cw, name))
            if is_secret_name(name):
                ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                if "value" in e or not ref:
                    errors.append("%s: %s must come from a secretKeyRef, never an inline value" % (cw, name))
                elif ref.get("name") != "kdedup-secrets":
                    errors.append("%s: %s must come from Secret kdedup-secrets" % (cw, name))
        for src in c.get("envFrom") or []:
            if "secretRef" in src:
                continue
            cm = (src.get("configMapRef") or {}).get("name")
            if cm not in configmaps:
                errors.append("%s: envFrom ConfigMap %r is not in the rendered output" % (cw, cm))
        sc = c.get("securityContext") or {}
        psc = pod.get("securityContext") or {}
        want = {
            "runAsNonRoot": True, "runAsUser": 65532, "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
        }
        for k, v in want.items():
            if sc.get(k, psc.get(k)) != v:
                errors.append("%s: securityContext.%s must be %r" % (cw, k, v))
        if (sc.get("capabilities") or {}).get("drop") != ["ALL"]:
            errors.append("%s: securityContext.capabilities.drop must be [ALL]" % cw)
        if (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
            errors.append("%s: seccompProfile must be RuntimeDefault" % cw)
        if not (c.get("resources") or {}).get("limits", {}).get("memory"):
            errors.append("%s: needs a memory limit" % cw)

    if doc["kind"] != "Deployment":
        return
    sidecars = [c for c in init if "kdedup" in c.get("image", "")]
    if len(sidecars) != 1:
        errors.append("%s: expected kdedup once among initContainers (native sidecar), found %d" % (w, len(sidecars)))
        return
    s = sidecars[0]
    if s.get("restartPolicy") != "Always":
        errors.append("%s: the kdedup initContainer needs restartPolicy: Always (native sidecar)" % w)
    ports = {p.get("name"): p.get("containerPort") for p in s.get("ports") or []}
    if ports.get("metrics") != 9464:
        errors.append("%s: kdedup must expose containerPort 9464 named 'metrics'" % w)
    for probe, path in (("startupProbe", "/readyz"), ("livenessProbe", "/livez"), ("readinessProbe", "/readyz")):
        got = ((s.get(probe) or {}).get("httpGet") or {}).get("path")
        if got != path:
            errors.append("%s: kdedup %s must GET %s, has %r" % (w, probe, path, got))
    ann = (doc["spec"]["template"].get("metadata") or {}).get("annotations") or {}
    for k, v in (("prometheus.io/scrape", "true"), ("prometheus.io/port", "9464"), ("prometheus.io/path", "/metrics")):
        if ann.get(k) != v:
            errors.append("%s: pod annotation %s must be %r" % (w, k, v))
    timeout = None
    for src in s.get("envFrom") or []:
        cm = configmaps.get((src.get("configMapRef") or {}).get("name"), {})
        timeout = cm.get("KDEDUP_SHUTDOWN_TIMEOUT", timeout)
    grace = pod.get("terminationGracePeriodSeconds", 30)
    if timeout is None:
        errors.append("%s: KDEDUP_SHUTDOWN_TIMEOUT is not set in kdedup's ConfigMap" % w)
    elif duration_seconds(timeout) >= grace:
        errors.append("%s: KDEDUP_SHUTDOWN_TIMEOUT=%s must be below terminationGracePeriodSeconds=%s" % (w, timeout, grace))


def cmd_validate(versions, paths):
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError, ValidationError

    errors, count, versions = [], 0, versions.split()
    docs_by_path = {path: load_docs(path) for path in paths}
    # Stand-alone manifests (jobs/) use the ConfigMap that the kustomizations create.
    all_configmaps = {}
    for docs in docs_by_path.values():
        for d in docs:
            if d.get("kind") == "ConfigMap":
                all_configmaps.setdefault(d["metadata"]["name"], d.get("data") or {})
    for path, docs in docs_by_path.items():
        configmaps = {d["metadata"]["name"]: d.get("data") or {} for d in docs if d.get("kind") == "ConfigMap"}
        configmaps = configmaps or all_configmaps
        for doc in docs:
            count += 1
            w = "%s: %s" % (path, where(doc))
            key = (doc.get("apiVersion"), doc.get("kind"))
            if doc.get("kind") == "Secret":
                errors.append("%s: Secrets must not be shipped; reference kdedup-secrets instead" % w)
            if key in CRD_KINDS:
                print("    %s: CRD %s has no core schema, skipped; checked structurally" % (w, key[1]))
                check_crd(doc, errors)
            else:
                for v in versions:
                    try:
                        kubernetes_validate.validate(doc, v, strict=True)
                    except ValidationError as e:
                        loc = "/".join(str(p) for p in e.absolute_path) or "(root)"
                        errors.append("%s (Kubernetes %s): %s: %s" % (w, v, loc, e.message))
                    except SchemaNotFoundError as e:
                        errors.append("%s: %s" % (w, e.message))
            if doc.get("kind") == "ConfigMap":
                for k in (doc.get("data") or {}):
                    if k.startswith("KDEDUP_") and k not in ALLOWED_ENV and not k.startswith("KDEDUP_KAFKA_"):
                        errors.append("%s: unknown variable %s" % (w, k))
                    if is_secret_name(k):
                        errors.append("%s: %s is a secret and must not be in a ConfigMap" % (w, k))
            pod = None
            if doc.get("kind") in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
                pod = doc["spec"]["template"]["spec"]
            if pod is not None:
                pod_errors = []
                check_pod_spec(doc, pod, configmaps, pod_errors)
                errors.extend("%s: %s" % (path, e) for e in pod_errors)
        # Migrations (rendered kustomizations only): a ConfigMap that turns migrate-on-start
        # off needs a Job running `kdedup migrate` beside it, and such a Job needs it off.
        if any(d.get("kind") == "Deployment" for d in docs):
            migrate_jobs = [
                d for d in docs if d.get("kind") == "Job" and any(
                    (c.get("args") or c.get("command") or [None])[0] == "migrate"
                    for c in d["spec"]["template"]["spec"].get("containers") or [])
            ]
            off = any(str(cm.get("KDEDUP_MIGRATE_ON_START", "true")).lower() == "false"
                      for cm in configmaps.values())
            if off and not migrate_jobs:
                errors.append("%s: KDEDUP_MIGRATE_ON_START=false, but no Job runs `kdedup migrate`" % path)
            if migrate_jobs and not off:
                errors.append("%s: a Job runs `kdedup migrate`, but KDEDUP_MIGRATE_ON_START is not false"
                              " (the sidecars would need DDL rights too)" % path)
    for e in errors:
        print("    ERROR " + e, file=sys.stderr)
    print("    %d objects checked against Kubernetes %s" % (count, ", ".join(versions)))
    return 1 if errors else 0


def rules_groups(path):
    with open(path) as f:
        return yaml.safe_load(f)["groups"]


PROMETHEUS_RULE_HEADER = """\
# GENERATED from deploy/prometheus/kdedup-alerts.yaml by `scripts/check-deploy.sh --sync-rules`.
# Edit that file, not this one; the check fails when the two differ.
# Your Prometheus may only load PrometheusRules with a given label (its ruleSelector, e.g.
# `release: kube-prometheus-stack`): add it in an overlay.
"""


def cmd_sync_rules(rules_path, out_path):
    obj = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "kdedup", "labels": {"app.kubernetes.io/name": "kdedup"}},
        "spec": {"groups": rules_groups(rules_path)},
    }

    class Dumper(yaml.SafeDumper):
        pass

    def str_rep(dumper, data):
        style = "|" if "\n" in data else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)

    Dumper.add_representer(str, str_rep)
    with open(out_path, "w") as f:
        f.write(PROMETHEUS_RULE_HEADER)
        yaml.dump(obj, f, Dumper=Dumper, sort_keys=False, width=4096, default_flow_style=False)
    print("    wrote %s" % out_path)
    return 0


def cmd_compare_rules(rules_path, rendered):
    want = rules_groups(rules_path)
    status, found = 0, 0
    for path in rendered:
        for doc in load_docs(path):
            if doc.get("kind") != "PrometheusRule":
                continue
            found += 1
            if doc["spec"].get("groups") != want:
                print("    ERROR %s: PrometheusRule/%s differs from %s; run scripts/check-deploy.sh --sync-rules"
                      % (path, doc["metadata"]["name"], rules_path), file=sys.stderr)
                status = 1
    if not found:
        print("    ERROR no PrometheusRule in the rendered output", file=sys.stderr)
        return 1
    if status == 0:
        print("    %d rendered PrometheusRule(s) carry the same rules as %s" % (found, rules_path))
    return status


def cmd_strip_annotations(rules_path, out_path):
    # promtool test compares annotations too; the tests only assert which alerts fire with
    # which labels, while `promtool check rules` validates the annotation templates.
    with open(rules_path) as f:
        doc = yaml.safe_load(f)
    for g in doc["groups"]:
        for r in g["rules"]:
            r.pop("annotations", None)
    with open(out_path, "w") as f:
        yaml.safe_dump(doc, f, sort_keys=False)
    return 0


def panels_of(dash):
    for p in dash.get("panels", []):
        yield p
        for q in p.get("panels", []) or []:
            yield q


def cmd_grafana(path, out_rules):
    errors = []
    try:
        with open(path) as f:
            dash = json.load(f)
    except (OSError, ValueError) as e:
        print("    ERROR %s does not parse as JSON: %s" % (path, e), file=sys.stderr)
        return 1
    if dash.get("schemaVersion") != 39:
        errors.append("schemaVersion must be 39, is %r" % dash.get("schemaVersion"))
    tvars = {v.get("name"): v for v in dash.get("templating", {}).get("list", [])}
    ds = tvars.get("DS_PROMETHEUS")
    if not ds or ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        errors.append("templating needs a datasource variable DS_PROMETHEUS of query 'prometheus'")
    ids, rules = set(), []
    for p in panels_of(dash):
        if p.get("id") in ids:
            errors.append("duplicate panel id %r" % p.get("id"))
        ids.add(p.get("id"))
        if p.get("type") == "row":
            continue
        if (p.get("datasource") or {}).get("uid") != "${DS_PROMETHEUS}":
            errors.append("panel %r: datasource uid must be ${DS_PROMETHEUS}" % p.get("title"))
        if not p.get("targets"):
            errors.append("panel %r has no targets" % p.get("title"))
        for t in p.get("targets", []):
            expr = t.get("expr", "")
            if not expr.strip():
                errors.append("panel %r target %r has no expr" % (p.get("title"), t.get("refId")))
                continue
            if (t.get("datasource") or {}).get("uid") != "${DS_PROMETHEUS}":
                errors.append("panel %r target %r: datasource uid must be ${DS_PROMETHEUS}" % (p.get("title"), t.get("refId")))
            # Substitute Grafana's variables so promtool can parse the PromQL.
            e = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m").replace("$__range", "1h")
            e = re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*(?::[a-z]+)?\}?", ".*", e)
            rules.append({"record": "dashboard:panel_%s_%s" % (p.get("id"), t.get("refId", "A")), "expr": e})
    for e in errors:
        print("    ERROR %s: %s" % (path, e), file=sys.stderr)
    with open(out_rules, "w") as f:
        yaml.safe_dump({"groups": [{"name": "dashboard-queries", "rules": rules}]}, f, sort_keys=False)
    print("    %s: %d panels, %d queries" % (path, len(ids), len(rules)))
    return 1 if errors else 0


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    fn = {
        "validate": lambda: cmd_validate(args[0], args[1:]),
        "sync-rules": lambda: cmd_sync_rules(*args),
        "compare-rules": lambda: cmd_compare_rules(args[0], args[1:]),
        "strip-annotations": lambda: cmd_strip_annotations(*args),
        "grafana": lambda: cmd_grafana(*args),
    }[cmd]
    sys.exit(fn())
PYEOF

if [ "$sync_rules" = 1 ]; then
  say "syncing $PROMETHEUS_RULE from $RULES"
  "$PY" "$WORK/check_deploy.py" sync-rules "$RULES" "$PROMETHEUS_RULE"
fi

# --- 1. render -----------------------------------------------------------------------------

say "rendering kustomizations"
rendered=()
rm -f "$WORK"/rendered-*.yaml
targets=(deploy/kubernetes/base)
for d in deploy/kubernetes/overlays/*/; do
  [ -d "$d" ] && targets+=("${d%/}")
done
[ "${#targets[@]}" -gt 1 ] || die "no overlay directories under deploy/kubernetes/overlays/"
for d in "${targets[@]}"; do
  [ -f "$d/kustomization.yaml" ] || die "$d has no kustomization.yaml"
  out="$WORK/rendered-$(echo "$d" | tr '/' '_').yaml"
  kubectl kustomize "$d" >"$out" 2>"$out.err" || {
    cat "$out.err" >&2
    die "kubectl kustomize $d failed"
  }
  if [ -s "$out.err" ]; then
    sed 's/^/    kustomize: /' "$out.err"
  fi
  echo "    $d -> $(grep -c '^kind:' "$out") objects"
  rendered+=("$out")
done

# --- 2. validate ---------------------------------------------------------------------------

say "validating objects (kubernetes-validate $KUBERNETES_VALIDATE_VERSION, strict)"
jobs=(deploy/kubernetes/jobs/*.yaml)
[ -e "${jobs[0]}" ] || die "no Job manifests under deploy/kubernetes/jobs/"
"$PY" "$WORK/check_deploy.py" validate "$KUBE_VERSIONS" "${rendered[@]}" "${jobs[@]}" ||
  die "Kubernetes objects failed validation (see ERROR lines above)"

# --- 3. Prometheus rules -------------------------------------------------------------------

say "checking Prometheus rules"
ensure_promtool
"$PROMTOOL" check rules "$RULES" | sed 's/^/    /' || die "promtool check rules $RULES failed"
"$PY" "$WORK/check_deploy.py" compare-rules "$RULES" "${rendered[@]}" ||
  die "the PrometheusRule does not carry the rules of $RULES"

"$PY" "$WORK/check_deploy.py" strip-annotations "$RULES" "$WORK/alerts-no-annotations.yaml"
cat >"$WORK/alerts-test.yaml" <<'EOF'
rule_files:
  - alerts-no-annotations.yaml
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'up{job="orders/kdedup", instance="10.0.0.1:9464"}'
        values: '0x15'
      - series: 'up{job="orders/kdedup", instance="10.0.0.2:9464"}'
        values: '1x15'
      - series: 'up{job="node-exporter", instance="10.0.0.3:9100"}'
        values: '0x15'
    alert_rule_test:
      - eval_time: 3m
        alertname: KdedupTargetDown
        exp_alerts: []
      - eval_time: 10m
        alertname: KdedupTargetDown
        exp_alerts:
          - exp_labels: {severity: critical, job: orders/kdedup, instance: "10.0.0.1:9464"}

  - interval: 1m
    input_series:
      - series: 'kdedup_postgres_up{job="orders/kdedup", instance="a"}'
        values: '1 1 0x10'
      - series: 'kdedup_broker_up{job="orders/kdedup", instance="a"}'
        values: '1 1 1 0x10'
      - series: 'kdedup_postgres_up{job="orders/kdedup", instance="b"}'
        values: '1x12'
      - series: 'kdedup_broker_up{job="orders/kdedup", instance="b"}'
        values: '1x12'
      - series: 'kdedup_consumer_joined{job="orders/kdedup", instance="a"}'
        values: '0x20'
      - series: 'kdedup_consumer_joined{job="orders/kdedup", instance="b"}'
        values: '0 0 1x18'
    alert_rule_test:
      - eval_time: 15m
        alertname: KdedupNotInGroup
        exp_alerts:
          - exp_labels: {severity: critical, job: orders/kdedup, instance: a}
      - eval_time: 10m
        alertname: KdedupPostgresDown
        exp_alerts:
          - exp_labels: {severity: critical, job: orders/kdedup, instance: a}
      - eval_time: 10m
        alertname: KdedupBrokerDown
        exp_alerts:
          - exp_labels: {severity: critical, job: orders/kdedup, instance: a}

  - interval: 1m
    input_series:
      # a: stuck, lag but no consumption. b: consuming. c: stand-by, no partitions, no lag.
      - series: 'kdedup_events_consumed_total{job="orders/kdedup", instance="a", topic="orders"}'
        values: '500x40'
      - series: 'kdedup_consumer_lag{job="orders/kdedup", instance="a", topic="orders", partition="0"}'
        values: '50x40'
      - series: 'kdedup_events_consumed_total{job="orders/kdedup", instance="b", topic="orders"}'
        values: '0+100x40'
      - series: 'kdedup_consumer_lag{job="orders/kdedup", instance="b", topic="orders", partition="1"}'
        values: '50x40'
      - series: 'kdedup_events_consumed_total{job="orders/kdedup", instance="c", topic="orders"}'
        values: '0x40'
    alert_rule_test:
      - eval_time: 5m
        alertname: KdedupNoProgress
        exp_alerts: []
      - eval_time: 30m
        alertname: KdedupNoProgress
        exp_alerts:
          - exp_labels: {severity: critical, job: orders/kdedup, instance: a}

  # From here on, the rules join kdedup_config_info. Two kdedup Deployments share
  # namespace "orders" and so the PodMonitor's job "orders/kdedup": orders-app (pods a, b)
  # and audit-app (pods c, d), each with its own group, schema and output topic. The
  # anchored series below are their config info, reused by the later tests.
  - interval: 1m
    input_series:
      - &info_a {series: 'kdedup_config_info{job="orders/kdedup", namespace="orders", pod="orders-app-a", instance="a", group_id="orders-app-kdedup", schema="kdedup_orders", scope="orders-app-kdedup", sink="kafka", output_topic="orders.deduped"}', values: '1x150'}
      - &info_b {series: 'kdedup_config_info{job="orders/kdedup", namespace="orders", pod="orders-app-b", instance="b", group_id="orders-app-kdedup", schema="kdedup_orders", scope="orders-app-kdedup", sink="kafka", output_topic="orders.deduped"}', values: '1x150'}
      - &info_c {series: 'kdedup_config_info{job="orders/kdedup", namespace="orders", pod="audit-app-c", instance="c", group_id="audit-app-kdedup", schema="kdedup_audit", scope="audit-app-kdedup", sink="kafka", output_topic="audit.deduped"}', values: '1x150'}
      - &info_d {series: 'kdedup_config_info{job="orders/kdedup", namespace="orders", pod="audit-app-d", instance="d", group_id="audit-app-kdedup", schema="kdedup_audit", scope="audit-app-kdedup", sink="kafka", output_topic="audit.deduped"}', values: '1x150'}
      # orders-app on topic orders: growing past 1000. audit-app reads orders too: high
      # but flat, so it must not fire (the old per-job sum grew with orders-app's lag and
      # fired without saying which group).
      - series: 'kdedup_consumer_lag{job="orders/kdedup", namespace="orders", pod="orders-app-a", instance="a", topic="orders", partition="0"}'
        values: '0+100x45'
      - series: 'kdedup_consumer_lag{job="orders/kdedup", namespace="orders", pod="orders-app-b", instance="b", topic="orders", partition="1"}'
        values: '2000x45'
      - series: 'kdedup_consumer_lag{job="orders/kdedup", namespace="orders", pod="audit-app-c", instance="c", topic="orders", partition="0"}'
        values: '5000x45'
      # Topic payments: each group stays below 1000 (audit-app's grows slowly, orders-app's
      # is flat); summed per job they would be above it and growing.
      - series: 'kdedup_consumer_lag{job="orders/kdedup", namespace="orders", pod="orders-app-b", instance="b", topic="payments", partition="0"}'
        values: '600x45'
      - series: 'kdedup_consumer_lag{job="orders/kdedup", namespace="orders", pod="audit-app-d", instance="d", topic="payments", partition="0"}'
        values: '600+5x45'
    alert_rule_test:
      - eval_time: 10m
        alertname: KdedupConsumerLagGrowing
        exp_alerts: []
      - eval_time: 40m
        alertname: KdedupConsumerLagGrowing
        exp_alerts:
          - exp_labels: {severity: warning, namespace: orders, job: orders/kdedup, group_id: orders-app-kdedup, schema: kdedup_orders, output_topic: orders.deduped, topic: orders}

  - interval: 1m
    input_series:
      - *info_a
      - *info_b
      - *info_c
      - *info_d
      # orders-app, topic orders: the oldest waiting message is 400s old from minute 6 on.
      - series: 'kdedup_consumer_lag_seconds{job="orders/kdedup", namespace="orders", pod="orders-app-a", instance="a", topic="orders", partition="0"}'
        values: '0x5 400x30'
      - series: 'kdedup_consumer_lag_seconds{job="orders/kdedup", namespace="orders", pod="orders-app-b", instance="b", topic="orders", partition="1"}'
        values: '0x35'
      # audit-app, same topic: below 5 minutes, and one 4-minute blip above it.
      - series: 'kdedup_consumer_lag_seconds{job="orders/kdedup", namespace="orders", pod="audit-app-c", instance="c", topic="orders", partition="0"}'
        values: '200x35'
      - series: 'kdedup_consumer_lag_seconds{job="orders/kdedup", namespace="orders", pod="audit-app-d", instance="d", topic="orders", partition="1"}'
        values: '0x5 900x3 0x26'
    alert_rule_test:
      - eval_time: 10m
        alertname: KdedupConsumerLagSecondsHigh
        exp_alerts: []
      - eval_time: 25m
        alertname: KdedupConsumerLagSecondsHigh
        exp_alerts:
          - exp_labels: {severity: warning, namespace: orders, job: orders/kdedup, group_id: orders-app-kdedup, schema: kdedup_orders, output_topic: orders.deduped, topic: orders}

  - interval: 1m
    input_series:
      - *info_a
      - *info_c
      - series: 'kdedup_events_dead_lettered_total{job="orders/kdedup", namespace="orders", pod="orders-app-a", instance="a", reason="missing_id"}'
        values: '0+60x30'
      # id_too_long: 0.067/s in each Deployment, 0.13/s summed per job.
      - series: 'kdedup_events_dead_lettered_total{job="orders/kdedup", namespace="orders", pod="orders-app-a", instance="a", reason="id_too_long"}'
        values: '0+4x30'
      - series: 'kdedup_events_dead_lettered_total{job="orders/kdedup", namespace="orders", pod="audit-app-c", instance="c", reason="id_too_long"}'
        values: '0+4x30'
    alert_rule_test:
      - eval_time: 5m
        alertname: KdedupDeadLetterRateHigh
        exp_alerts: []
      - eval_time: 25m
        alertname: KdedupDeadLetterRateHigh
        exp_alerts:
          - exp_labels: {severity: warning, namespace: orders, job: orders/kdedup, group_id: orders-app-kdedup, schema: kdedup_orders, output_topic: orders.deduped, reason: missing_id}

  - interval: 1m
    input_series:
      - *info_a
      - *info_b
      - *info_c
      - *info_d
      # Every replica reports its schema's outbox. orders-app: growing, and stale from
      # minute 6. audit-app: large but flat, and fresh.
      - series: 'kdedup_outbox_backlog{job="orders/kdedup", namespace="orders", pod="orders-app-a", instance="a"}'
        values: '0+200x45'
      - series: 'kdedup_outbox_backlog{job="orders/kdedup", namespace="orders", pod="orders-app-b", instance="b"}'
        values: '0+200x45'
      - series: 'kdedup_outbox_oldest_age_seconds{job="orders/kdedup", namespace="orders", pod="orders-app-a", instance="a"}'
        values: '0+60x45'
      - series: 'kdedup_outbox_oldest_age_seconds{job="orders/kdedup", namespace="orders", pod="orders-app-b", instance="b"}'
        values: '0+60x45'
      - series: 'kdedup_outbox_backlog{job="orders/kdedup", namespace="orders", pod="audit-app-c", instance="c"}'
        values: '5000x45'
      - series: 'kdedup_outbox_oldest_age_seconds{job="orders/kdedup", namespace="orders", pod="audit-app-c", instance="c"}'
        values: '2x45'
      - series: 'kdedup_outbox_backlog{job="orders/kdedup", namespace="orders", pod="audit-app-d", instance="d"}'
        values: '5000x45'
      - series: 'kdedup_outbox_oldest_age_seconds{job="orders/kdedup", namespace="orders", pod="audit-app-d", instance="d"}'
        values: '2x45'
    alert_rule_test:
      - eval_time: 40m
        alertname: KdedupOutboxBacklogGrowing
        exp_alerts:
          - exp_labels: {severity: warning, namespace: orders, job: orders/kdedup, group_id: orders-app-kdedup, schema: kdedup_orders, output_topic: orders.deduped}
      - eval_time: 3m
        alertname: KdedupOutboxStale
        exp_alerts: []
      - eval_time: 15m
        alertname: KdedupOutboxStale
        exp_alerts:
          - exp_labels: {severity: warning, namespace: orders, job: orders/kdedup, group_id: orders-app-kdedup, schema: kdedup_orders, output_topic: orders.deduped}

  - interval: 1m
    input_series:
      # Two Postgres-sink Deployments in one namespace; orders-app's statement fails.
      - series: 'kdedup_config_info{job="orders/kdedup", namespace="orders", pod="orders-app-p", instance="p", group_id="orders-app-kdedup", schema="kdedup_orders", scope="orders-app-kdedup", sink="postgres", output_topic="shop.orders"}'
        values: '1x25'
      - series: 'kdedup_config_info{job="orders/kdedup", namespace="orders", pod="audit-app-q", instance="q", group_id="audit-app-kdedup", schema="kdedup_audit", scope="audit-app-kdedup", sink="postgres", output_topic="shop.audit"}'
        values: '1x25'
      - series: 'kdedup_sink_errors_total{job="orders/kdedup", namespace="orders", pod="orders-app-p", instance="p", sqlstate_class="42"}'
        values: '0x5 0+6x20'
      - series: 'kdedup_sink_errors_total{job="orders/kdedup", namespace="orders", pod="audit-app-q", instance="q", sqlstate_class="42"}'
        values: '3x25'
    alert_rule_test:
      - eval_time: 4m
        alertname: KdedupSinkFailing
        exp_alerts: []
      - eval_time: 20m
        alertname: KdedupSinkFailing
        exp_alerts:
          - exp_labels: {severity: critical, namespace: orders, job: orders/kdedup, group_id: orders-app-kdedup, schema: kdedup_orders, output_topic: shop.orders, sqlstate_class: "42"}

  - interval: 1m
    input_series:
      # Two HTTP-sink Deployments in one job and namespace; orders-app's app refuses events.
      - &info_h1 {series: 'kdedup_config_info{job="orders/kdedup", namespace="orders", pod="orders-app-h", instance="h", group_id="orders-app-kdedup", schema="kdedup_orders", scope="orders-app-kdedup", sink="http", output_topic="http://127.0.0.1:8080/events"}', values: '1x40'}
      - &info_h2 {series: 'kdedup_config_info{job="orders/kdedup", namespace="orders", pod="audit-app-i", instance="i", group_id="audit-app-kdedup", schema="kdedup_audit", scope="audit-app-kdedup", sink="http", output_topic="http://127.0.0.1:8080/audit"}', values: '1x40'}
      - series: 'kdedup_http_failed_total{job="orders/kdedup", namespace="orders", pod="orders-app-h", instance="h", reason="http_rejected"}'
        values: '0x5 0+10x30'
      - series: 'kdedup_events_forwarded_total{job="orders/kdedup", namespace="orders", pod="orders-app-h", instance="h"}'
        values: '0+100x35'
      # audit-app: 1 in 101 failed, under the 5% threshold; added to orders-app's (the old
      # per-job rule), its many successes would have hidden orders-app's failures.
      - series: 'kdedup_http_failed_total{job="orders/kdedup", namespace="orders", pod="audit-app-i", instance="i", reason="http_rejected"}'
        values: '0x5 0+1x30'
      - series: 'kdedup_events_forwarded_total{job="orders/kdedup", namespace="orders", pod="audit-app-i", instance="i"}'
        values: '0+1000x35'
    alert_rule_test:
      - eval_time: 10m
        alertname: KdedupHttpFailing
        exp_alerts: []
      - eval_time: 30m
        alertname: KdedupHttpFailing
        exp_alerts:
          - exp_labels: {severity: warning, namespace: orders, job: orders/kdedup, group_id: orders-app-kdedup, schema: kdedup_orders, output_topic: "http://127.0.0.1:8080/events"}

  - interval: 1m
    input_series:
      - *info_h1
      - *info_h2
      - series: 'kdedup_http_processing_expired_rows{job="orders/kdedup", namespace="orders", pod="orders-app-h", instance="h"}'
        values: '0x5 3x25'
      - series: 'kdedup_http_processing_expired_rows{job="orders/kdedup", namespace="orders", pod="audit-app-i", instance="i"}'
        values: '0x5 2x5 0x20'
    alert_rule_test:
      - eval_time: 12m
        alertname: KdedupHttpStuckProcessing
        exp_alerts: []
      - eval_time: 25m
        alertname: KdedupHttpStuckProcessing
        exp_alerts:
          - exp_labels: {severity: warning, namespace: orders, job: orders/kdedup, group_id: orders-app-kdedup, schema: kdedup_orders, output_topic: "http://127.0.0.1:8080/events"}

  - interval: 1m
    input_series:
      - *info_a
      - *info_c
      - series: 'kdedup_relay_delivery_failures_total{job="orders/kdedup", namespace="orders", pod="orders-app-a", instance="a"}'
        values: '0x5 0+30x25'
      - series: 'kdedup_relay_delivery_failures_total{job="orders/kdedup", namespace="orders", pod="audit-app-c", instance="c"}'
        values: '7x30'
    alert_rule_test:
      - eval_time: 10m
        alertname: KdedupRelayFailing
        exp_alerts: []
      - eval_time: 25m
        alertname: KdedupRelayFailing
        exp_alerts:
          - exp_labels: {severity: warning, namespace: orders, job: orders/kdedup, group_id: orders-app-kdedup, schema: kdedup_orders, output_topic: orders.deduped}

  - interval: 1m
    input_series:
      # orders-app and audit-app: each replica publishes the streams of its own partitions,
      # so both replicas of each schema are active. Four active relays in one job, two per
      # output topic, are healthy (the old per-job count, and later the per-topic count of
      # relays, fired on it).
      - *info_a
      - *info_b
      - *info_c
      - *info_d
      - series: 'kdedup_relay_active{job="orders/kdedup", namespace="orders", pod="orders-app-a", instance="a"}'
        values: '1x20'
      - series: 'kdedup_relay_active{job="orders/kdedup", namespace="orders", pod="orders-app-b", instance="b"}'
        values: '1x20'
      - series: 'kdedup_relay_active{job="orders/kdedup", namespace="orders", pod="audit-app-c", instance="c"}'
        values: '1x20'
      - series: 'kdedup_relay_active{job="orders/kdedup", namespace="orders", pod="audit-app-d", instance="d"}'
        values: '1x20'
      # payments-app: e and i publish schema kdedup_payments; pod f drifted to another
      # schema and holds no partitions (relay inactive) until minute 6, when it gets some
      # and publishes them from its own schema.
      - series: 'kdedup_config_info{job="payments/kdedup", namespace="payments", pod="payments-app-e", instance="e", group_id="payments-kdedup", schema="kdedup_payments", scope="payments-kdedup", sink="kafka", output_topic="payments.deduped"}'
        values: '1x20'
      - series: 'kdedup_config_info{job="payments/kdedup", namespace="payments", pod="payments-app-i", instance="i", group_id="payments-kdedup", schema="kdedup_payments", scope="payments-kdedup", sink="kafka", output_topic="payments.deduped"}'
        values: '1x20'
      - series: 'kdedup_config_info{job="payments/kdedup", namespace="payments", pod="payments-app-f", instance="f", group_id="payments-kdedup", schema="kdedup_payments_v2", scope="payments-kdedup", sink="kafka", output_topic="payments.deduped"}'
        values: '1x20'
      - series: 'kdedup_relay_active{job="payments/kdedup", namespace="payments", pod="payments-app-e", instance="e"}'
        values: '1x20'
      - series: 'kdedup_relay_active{job="payments/kdedup", namespace="payments", pod="payments-app-i", instance="i"}'
        values: '1x20'
      - series: 'kdedup_relay_active{job="payments/kdedup", namespace="payments", pod="payments-app-f", instance="f"}'
        values: '0x5 1x15'
      # Across namespaces (two jobs): a canary of the ledger in its own namespace (and
      # database), with the same schema name, publishes to the same output topic as the
      # ledger.
      - series: 'kdedup_config_info{job="ledger/kdedup", namespace="ledger", pod="ledger-g", instance="g", group_id="ledger-kdedup", schema="kdedup", scope="ledger-kdedup", sink="kafka", output_topic="ledger.deduped"}'
        values: '1x20'
      - series: 'kdedup_config_info{job="ledger-canary/kdedup", namespace="ledger-canary", pod="ledger-h", instance="h", group_id="ledger-canary-kdedup", schema="kdedup", scope="ledger-canary-kdedup", sink="kafka", output_topic="ledger.deduped"}'
        values: '1x20'
      - series: 'kdedup_relay_active{job="ledger/kdedup", namespace="ledger", pod="ledger-g", instance="g"}'
        values: '0x5 1x15'
      - series: 'kdedup_relay_active{job="ledger-canary/kdedup", namespace="ledger-canary", pod="ledger-h", instance="h"}'
        values: '0x5 1x15'
    alert_rule_test:
      - eval_time: 4m
        alertname: KdedupOutputFedFromTwoSchemas
        exp_alerts: []
      - eval_time: 8m
        alertname: KdedupOutputFedFromTwoSchemas
        exp_alerts: []
      - eval_time: 15m
        alertname: KdedupOutputFedFromTwoSchemas
        exp_alerts:
          - exp_labels: {severity: critical, namespace: payments, job: payments/kdedup, pod: payments-app-e, instance: e, group_id: payments-kdedup, schema: kdedup_payments, output_topic: payments.deduped}
          - exp_labels: {severity: critical, namespace: payments, job: payments/kdedup, pod: payments-app-i, instance: i, group_id: payments-kdedup, schema: kdedup_payments, output_topic: payments.deduped}
          - exp_labels: {severity: critical, namespace: payments, job: payments/kdedup, pod: payments-app-f, instance: f, group_id: payments-kdedup, schema: kdedup_payments_v2, output_topic: payments.deduped}
          - exp_labels: {severity: critical, namespace: ledger, job: ledger/kdedup, pod: ledger-g, instance: g, group_id: ledger-kdedup, schema: kdedup, output_topic: ledger.deduped}
          - exp_labels: {severity: critical, namespace: ledger-canary, job: ledger-canary/kdedup, pod: ledger-h, instance: h, group_id: ledger-canary-kdedup, schema: kdedup, output_topic: ledger.deduped}

  - interval: 1m
    input_series:
      - *info_a
      - *info_c
      # a finds a running sidecar that conflicts with it from minute 6; c finds none.
      - series: 'kdedup_config_conflicts{job="orders/kdedup", namespace="orders", pod="orders-app-a", instance="a"}'
        values: '0x5 1x15'
      - series: 'kdedup_config_conflicts{job="orders/kdedup", namespace="orders", pod="audit-app-c", instance="c"}'
        values: '0x20'
    alert_rule_test:
      - eval_time: 7m
        alertname: KdedupConfigConflict
        exp_alerts: []
      - eval_time: 12m
        alertname: KdedupConfigConflict
        exp_alerts:
          - exp_labels: {severity: critical, namespace: orders, job: orders/kdedup, pod: orders-app-a, instance: a, group_id: orders-app-kdedup, schema: kdedup_orders, output_topic: orders.deduped}

  - interval: 1m
    input_series:
      - *info_a
      - *info_c
      # orders-app: its rows age to 60s past a 1-day TTL and stay there (pruned).
      - series: 'kdedup_ttl_seconds{job="orders/kdedup", namespace="orders", pod="orders-app-a", instance="a"}'
        values: '86400x60'
      - series: 'kdedup_oldest_row_age_seconds{job="orders/kdedup", namespace="orders", pod="orders-app-a", instance="a"}'
        values: '86000+60x6 86460x54'
      # audit-app: 7-day TTL, 6-day-old rows: healthy.
      - series: 'kdedup_ttl_seconds{job="orders/kdedup", namespace="orders", pod="audit-app-c", instance="c"}'
        values: '604800x60'
      - series: 'kdedup_oldest_row_age_seconds{job="orders/kdedup", namespace="orders", pod="audit-app-c", instance="c"}'
        values: '518400+60x60'
    alert_rule_test:
      - eval_time: 59m
        alertname: KdedupPrunerNotKeepingUp
        exp_alerts: []
  - interval: 1m
    input_series:
      - *info_a
      - *info_c
      # orders-app: 1-day TTL, rows growing older from just below it: an hour past the
      # TTL at minute 67, fires 30 minutes later.
      - series: 'kdedup_ttl_seconds{job="orders/kdedup", namespace="orders", pod="orders-app-a", instance="a"}'
        values: '86400x120'
      - series: 'kdedup_oldest_row_age_seconds{job="orders/kdedup", namespace="orders", pod="orders-app-a", instance="a"}'
        values: '86000+60x120'
      # audit-app: 7-day TTL, 6-day-old rows. Per job, the largest age (6 days) against the
      # largest TTL (7 days) hid orders-app's stopped pruner.
      - series: 'kdedup_ttl_seconds{job="orders/kdedup", namespace="orders", pod="audit-app-c", instance="c"}'
        values: '604800x120'
      - series: 'kdedup_oldest_row_age_seconds{job="orders/kdedup", namespace="orders", pod="audit-app-c", instance="c"}'
        values: '518400+60x120'
    alert_rule_test:
      - eval_time: 90m
        alertname: KdedupPrunerNotKeepingUp
        exp_alerts: []
      - eval_time: 100m
        alertname: KdedupPrunerNotKeepingUp
        exp_alerts:
          - exp_labels: {severity: warning, namespace: orders, job: orders/kdedup, group_id: orders-app-kdedup, schema: kdedup_orders, output_topic: orders.deduped}

  - interval: 1m
    input_series:
      - *info_a
      - *info_b
      - *info_c
      - *info_d
      # orders-app: a holds the pruner lock and runs a round a minute; b stands by.
      - series: 'kdedup_prune_round_duration_seconds_count{job="orders/kdedup", namespace="orders", pod="orders-app-a", instance="a"}'
        values: '0+1x120'
      - series: 'kdedup_prune_round_duration_seconds_count{job="orders/kdedup", namespace="orders", pod="orders-app-b", instance="b"}'
        values: '0x120'
      # audit-app: KDEDUP_PRUNER=false on both replicas, no round ever.
      - series: 'kdedup_prune_round_duration_seconds_count{job="orders/kdedup", namespace="orders", pod="audit-app-c", instance="c"}'
        values: '0x120'
      - series: 'kdedup_prune_round_duration_seconds_count{job="orders/kdedup", namespace="orders", pod="audit-app-d", instance="d"}'
        values: '0x120'
      # billing: its pruner stops after 30 minutes (rounds keep failing).
      - series: 'kdedup_config_info{job="billing/kdedup", namespace="billing", pod="billing-e", instance="e", group_id="billing-kdedup", schema="kdedup", scope="billing-kdedup", sink="kafka", output_topic="billing.deduped"}'
        values: '1x120'
      - series: 'kdedup_prune_round_duration_seconds_count{job="billing/kdedup", namespace="billing", pod="billing-e", instance="e"}'
        values: '0+1x30 30x90'
    alert_rule_test:
      - eval_time: 10m
        alertname: KdedupPrunerStopped
        exp_alerts: []
      - eval_time: 80m
        alertname: KdedupPrunerStopped
        exp_alerts:
          - exp_labels: {severity: warning, namespace: orders, schema: kdedup_audit}
      - eval_time: 110m
        alertname: KdedupPrunerStopped
        exp_alerts:
          - exp_labels: {severity: warning, namespace: orders, schema: kdedup_audit}
          - exp_labels: {severity: warning, namespace: billing, schema: kdedup}

  - interval: 1m
    input_series:
      - *info_a
      - *info_c
      - series: 'kdedup_payload_mismatches_total{job="orders/kdedup", namespace="orders", pod="orders-app-a", instance="a", action="skipped"}'
        values: '0x10 1x20'
      - series: 'kdedup_payload_mismatches_total{job="orders/kdedup", namespace="orders", pod="orders-app-a", instance="a", action="dead_lettered"}'
        values: '0x30'
      # audit-app's mismatches were long ago.
      - series: 'kdedup_payload_mismatches_total{job="orders/kdedup", namespace="orders", pod="audit-app-c", instance="c", action="skipped"}'
        values: '3x30'
    alert_rule_test:
      - eval_time: 9m
        alertname: KdedupPayloadMismatch
        exp_alerts: []
      - eval_time: 15m
        alertname: KdedupPayloadMismatch
        exp_alerts:
          - exp_labels: {severity: warning, namespace: orders, job: orders/kdedup, group_id: orders-app-kdedup, schema: kdedup_orders, output_topic: orders.deduped, action: skipped}

  - interval: 1m
    input_series:
      # a runs the current build; b an older one without kdedup_config_info.
      - *info_a
      - series: 'kdedup_build_info{job="orders/kdedup", namespace="orders", pod="orders-app-a", instance="a", version="0.2.0", rdkafka_version="2.10.0"}'
        values: '1x30'
      - series: 'kdedup_build_info{job="orders/kdedup", namespace="orders", pod="orders-app-b", instance="b", version="0.1.0", rdkafka_version="2.10.0"}'
        values: '1x30'
    alert_rule_test:
      - eval_time: 10m
        alertname: KdedupConfigInfoMissing
        exp_alerts: []
      - eval_time: 20m
        alertname: KdedupConfigInfoMissing
        exp_alerts:
          - exp_labels: {severity: warning, namespace: orders, job: orders/kdedup, pod: orders-app-b, instance: b, version: 0.1.0, rdkafka_version: 2.10.0}
  - interval: 1m
    input_series:
      - series: 'kdedup_ttl_seconds{job="orders/kdedup", namespace="orders", pod="p", instance="a"}'
        values: '604800x30'
      - series: 'kdedup_input_retention_seconds{job="orders/kdedup", namespace="orders", pod="p", instance="a", topic="orders"}'
        values: '1209600x30'
      - series: 'kdedup_input_retention_seconds{job="orders/kdedup", namespace="orders", pod="p", instance="a", topic="audit"}'
        values: '86400x30'
      - series: 'kdedup_input_retention_seconds{job="orders/kdedup", namespace="orders", pod="p", instance="a", topic="ledger"}'
        values: '-1x30'
    alert_rule_test:
      - eval_time: 20m
        alertname: KdedupTtlShorterThanRetention
        exp_alerts:
          - exp_labels: {severity: warning, job: orders/kdedup, namespace: orders, pod: p, instance: a, topic: orders}
          - exp_labels: {severity: warning, job: orders/kdedup, namespace: orders, pod: p, instance: a, topic: ledger}
EOF
(cd "$WORK" && "$PROMTOOL" test rules alerts-test.yaml) >"$WORK/promtool-test.log" 2>&1 || {
  cat "$WORK/promtool-test.log" >&2
  die "promtool test rules: an alert does not behave as its unit test expects"
}
echo "    promtool test rules: $(grep -c 'alertname:' "$WORK/alerts-test.yaml") alert assertions passed"

# --- 4. Grafana ----------------------------------------------------------------------------

say "checking the Grafana dashboard"
"$PY" "$WORK/check_deploy.py" grafana "$DASHBOARD" "$WORK/dashboard-queries.yaml" ||
  die "$DASHBOARD failed its checks"
"$PROMTOOL" check rules "$WORK/dashboard-queries.yaml" >"$WORK/dashboard-promtool.log" 2>&1 || {
  cat "$WORK/dashboard-promtool.log" >&2
  die "a PromQL query in $DASHBOARD does not parse"
}
echo "    every dashboard query parses"

say "deploy checks passed"
