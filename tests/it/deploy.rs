//! The rendered Kubernetes manifests and the binary agree: every KDEDUP_* variable the
//! manifests set is one `kdedup` reads, and the probes and scrape port match the admin
//! server. (Schema validation and promtool checks run in scripts/check-deploy.sh.)

use std::path::Path;
use std::process::Command;

fn render(dir: &str) -> String {
    let out = Command::new("kubectl")
        .args(["kustomize", dir])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("kubectl is needed to render deploy/kubernetes");
    assert!(
        out.status.success(),
        "kubectl kustomize {dir}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn overlays() -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes/overlays");
    let mut dirs = vec!["deploy/kubernetes/base".to_string()];
    for e in std::fs::read_dir(root).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        dirs.push(format!("deploy/kubernetes/overlays/{name}"));
    }
    dirs
}

/// Every `KDEDUP_*` token used as a key (`KDEDUP_X: v`) or an env name (`name: KDEDUP_X`).
fn variables(yaml: &str) -> Vec<String> {
    let mut vars = Vec::new();
    for line in yaml.lines() {
        let t = line.trim().trim_start_matches("- ");
        let candidate = if let Some(rest) = t.strip_prefix("name: ") {
            rest.trim()
        } else if let Some((k, _)) = t.split_once(':') {
            k.trim()
        } else {
            continue;
        };
        if candidate.starts_with("KDEDUP_") {
            vars.push(candidate.trim_matches('"').to_string());
        }
    }
    vars
}

#[test]
fn every_variable_the_manifests_set_is_read_by_the_binary() {
    for dir in overlays() {
        let yaml = render(&dir);
        let vars = variables(&yaml);
        assert!(
            vars.iter().any(|v| v == "KDEDUP_BROKERS"),
            "{dir} sets no KDEDUP_BROKERS"
        );
        for v in vars {
            assert!(
                kdedup::cli::env::is_known_env_var(&v),
                "{dir} sets {v}, which kdedup does not read"
            );
        }
    }
    // The stand-alone Jobs (`kubectl create -f`), which no kustomization renders.
    let jobs = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes/jobs");
    for e in std::fs::read_dir(jobs).unwrap() {
        let path = e.unwrap().path();
        let yaml = std::fs::read_to_string(&path).unwrap();
        for v in variables(&yaml) {
            assert!(
                kdedup::cli::env::is_known_env_var(&v),
                "{} sets {v}, which kdedup does not read",
                path.display()
            );
        }
    }
}

#[test]
fn probes_and_scrape_port_match_the_admin_server() {
    let default_port = {
        use clap::CommandFactory;
        let cmd = kdedup::cli::Cli::command();
        let run = cmd.find_subcommand("run").unwrap();
        let arg = run
            .get_arguments()
            .find(|a| a.get_id() == "metrics_addr")
            .unwrap();
        let default = arg.get_default_values()[0].to_str().unwrap().to_string();
        default.rsplit_once(':').unwrap().1.to_string()
    };
    // The routes the admin server really serves.
    let admin = include_str!("../../src/admin.rs");
    for path in ["/livez", "/readyz", "/metrics"] {
        assert!(
            admin.contains(&format!(".route(\"{path}\"")),
            "src/admin.rs serves no {path}"
        );
    }
    for dir in overlays() {
        let yaml = render(&dir);
        // The port kdedup listens on: KDEDUP_METRICS_ADDR from the ConfigMap, else the default.
        let port = yaml
            .lines()
            .find_map(|l| l.trim().strip_prefix("KDEDUP_METRICS_ADDR:"))
            .map(|v| {
                v.trim()
                    .trim_matches('"')
                    .rsplit_once(':')
                    .unwrap()
                    .1
                    .to_string()
            })
            .unwrap_or_else(|| default_port.clone());
        assert!(
            yaml.contains("path: /livez"),
            "{dir}: no liveness probe on /livez"
        );
        assert!(
            yaml.contains("path: /readyz"),
            "{dir}: no readiness probe on /readyz"
        );
        assert!(
            yaml.contains(&format!("containerPort: {port}")),
            "{dir}: metrics port is not {port}"
        );
        assert!(
            yaml.contains(&format!("prometheus.io/port: \"{port}\"")),
            "{dir}: scrape annotation port is not {port}"
        );
        assert!(
            yaml.contains("restartPolicy: Always"),
            "{dir}: kdedup is not a native sidecar"
        );
    }
}
