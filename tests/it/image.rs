//! The container image, built here (`scripts/image.sh`: buildah, FROM scratch, the same
//! layout as the Dockerfile) and run with podman the way Kubernetes runs the sidecar:
//! read-only root, every capability dropped, `no-new-privileges`, uid 65532, against the
//! real broker and a Postgres that requires TLS.
//!
//! Podman here needs `scripts/podman-containers.conf` (runc, cgroupfs, no default
//! ulimits); `--network host` reaches the loopback services.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::helpers::*;

const IMAGE: &str = "localhost/kdedup:test";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn podman(args: &[&str]) -> Output {
    Command::new("podman")
        .env(
            "CONTAINERS_CONF",
            root().join("scripts/podman-containers.conf"),
        )
        .args(args)
        .output()
        .expect("podman (scripts/image.sh installs it)")
}

fn podman_ok(args: &[&str]) -> String {
    let out = podman(args);
    assert!(
        out.status.success(),
        "podman {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Removes the container when the test ends, however it ends.
struct Container(String);

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman(&["rm", "--force", "--time", "0", &self.0]);
    }
}

fn proc_status(pid: &str, field: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{field}:"))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_image_runs_as_a_hardened_sidecar_forwards_once_over_tls_and_stops_cleanly() {
    let kafka = Cluster::shared();
    // Build: the release binary and the image, as `make image` does.
    let built = Command::new(root().join("scripts/image.sh"))
        .arg(IMAGE)
        .output()
        .expect("scripts/image.sh");
    let printed = String::from_utf8_lossy(&built.stdout).to_string();
    assert!(
        built.status.success(),
        "image build failed: {printed}{}",
        String::from_utf8_lossy(&built.stderr)
    );
    println!("built {printed}");
    assert!(printed.starts_with(IMAGE), "{printed}");

    // The image's configuration is the sidecar's.
    let config: serde_json::Value =
        serde_json::from_str(&podman_ok(&["image", "inspect", IMAGE])).unwrap();
    let config = &config[0]["Config"];
    assert_eq!(config["User"], "65532:65532");
    assert_eq!(config["Entrypoint"][0], "/usr/local/bin/kdedup");
    assert_eq!(config["Cmd"][0], "run");
    for label in [
        "org.opencontainers.image.version",
        "org.opencontainers.image.revision",
        "org.opencontainers.image.source",
        "org.opencontainers.image.licenses",
    ] {
        assert!(
            config["Labels"][label]
                .as_str()
                .is_some_and(|v| !v.is_empty()),
            "label {label} in {}",
            config["Labels"]
        );
    }
    // The binary runs from it; there is no shell to exec into.
    let version = podman_ok(&["run", "--rm", IMAGE, "--version"]);
    assert!(version.starts_with("kdedup "), "{version}");
    for sh in ["/bin/sh", "/bin/bash", "/usr/bin/sh"] {
        let shell = podman(&["run", "--rm", "--entrypoint", sh, IMAGE, "-c", "true"]);
        let err = String::from_utf8_lossy(&shell.stderr);
        assert!(
            shell.status.code() == Some(127) && err.contains("no such file"),
            "{sh} in the image? {:?} {err}",
            shell.status
        );
    }

    let t = names("image");
    kafka.create_topic(&t.input, 2).await;
    let tls_dir = std::env::var("KDEDUP_TEST_TLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root().join(".tmp/pg-tls"));
    let tls_port = std::env::var("KDEDUP_TEST_TLS_PG_PORT").unwrap_or_else(|_| "5433".into());
    let port = free_port();
    let name = t.schema.replace('_', "-");
    let ca_mount = format!(
        "{}:/etc/kdedup/pg-ca/ca.crt:ro",
        tls_dir.join("ca.crt").display()
    );
    let envs = [
        format!("KDEDUP_BROKERS={}", kafka.brokers),
        format!("KDEDUP_GROUP_ID={}", t.group),
        format!("KDEDUP_INPUT_TOPICS={}", t.input),
        format!("KDEDUP_OUTPUT_TOPIC={}", t.output),
        format!(
            "KDEDUP_DATABASE_URL=postgres://postgres@localhost:{tls_port}/test?sslmode=verify-full&sslrootcert=/etc/kdedup/pg-ca/ca.crt"
        ),
        format!("KDEDUP_DB_SCHEMA={}", t.schema),
        format!("KDEDUP_METRICS_ADDR=127.0.0.1:{port}"),
        "KDEDUP_SHUTDOWN_TIMEOUT=5s".into(),
        "KDEDUP_TOPIC_REPLICATION_FACTOR=1".into(),
        "KDEDUP_KAFKA_SESSION_TIMEOUT_MS=6000".into(),
        "KDEDUP_KAFKA_HEARTBEAT_INTERVAL_MS=500".into(),
        "KDEDUP_LOG_FORMAT=json".into(),
    ];
    let mut args: Vec<&str> = vec![
        "run",
        "--detach",
        "--name",
        &name,
        "--network",
        "host",
        "--read-only",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        "--user",
        "65532:65532",
        "--volume",
        &ca_mount,
    ];
    for e in &envs {
        args.push("--env");
        args.push(e);
    }
    args.push(IMAGE);
    let _ = podman(&["rm", "--force", &name]);
    podman_ok(&args);
    let container = Container(name.clone());
    let logs = || {
        let out = podman(&["logs", &container.0]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };

    // Probes, as the kubelet and Prometheus use them.
    let deadline = Instant::now() + Duration::from_secs(90);
    while !matches!(http_get(port, "/readyz"), Some((200, _))) {
        assert!(
            Instant::now() < deadline,
            "/readyz never 200: {:?}\n{}",
            http_get(port, "/readyz"),
            logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(http_get(port, "/livez").map(|(c, _)| c), Some(200));
    let metrics = http_get(port, "/metrics").expect("/metrics").1;
    assert!(metrics.contains("kdedup_build_info"), "{metrics}");

    // As Kubernetes runs it: uid/gid 65532, no capabilities, no_new_privs, read-only root.
    let pid = podman_ok(&["inspect", "--format", "{{.State.Pid}}", &name]);
    assert!(proc_status(&pid, "Uid").starts_with("65532"), "Uid");
    assert!(proc_status(&pid, "Gid").starts_with("65532"), "Gid");
    assert_eq!(proc_status(&pid, "CapEff"), "0000000000000000");
    assert_eq!(proc_status(&pid, "CapBnd"), "0000000000000000");
    assert_eq!(proc_status(&pid, "NoNewPrivs"), "1");
    assert_eq!(
        podman_ok(&[
            "inspect",
            "--format",
            "{{.HostConfig.ReadonlyRootfs}}",
            &name
        ]),
        "true"
    );

    // Events flow through, each id forwarded once.
    let msgs: Vec<In> = (0..300)
        .map(|i| In::event(i % 2, &format!("img-{}", i % 200), i as u64))
        .collect();
    kafka.produce(&t.input, &msgs).await;
    let out = kafka.read_topic(&t.output, 200, Duration::from_secs(60));
    let ids: std::collections::HashSet<&str> = out
        .iter()
        .filter_map(|m| m.header("kdedup-event-id"))
        .collect();
    assert_eq!(out.len(), 200, "each distinct id once");
    assert_eq!(ids.len(), 200);

    // TLS to Postgres from inside the image: Postgres sees the sidecar's connections
    // encrypted.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&format!(
            "postgres://postgres@localhost:{tls_port}/test?sslmode=verify-full&sslrootcert={}",
            tls_dir.join("ca.crt").display()
        ))
        .await
        .expect("the TLS cluster (scripts/pg-tls.sh)");
    let ssl: Vec<bool> = sqlx::query_scalar(
        "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
         WHERE a.application_name = 'kdedup'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(!ssl.is_empty() && ssl.iter().all(|s| *s), "{ssl:?}");
    assert!(logs().contains("connected to Postgres over TLS"));

    // SIGTERM (what the kubelet sends): drained and exit 0 within the 5 s deadline.
    let stopping = Instant::now();
    podman_ok(&["kill", "--signal", "TERM", &name]);
    let code = podman_ok(&["wait", &name]);
    let took = stopping.elapsed();
    assert_eq!(code, "0", "exit code after SIGTERM\n{}", logs());
    assert!(took < Duration::from_secs(8), "stopped in {took:?}");
    assert!(logs().contains("stopped cleanly"));
    println!("image check: ready, 200 forwarded once, TLS, SIGTERM -> exit 0 in {took:?}");
    let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", t.schema))
        .execute(&pool)
        .await;
    drop(container);
}
