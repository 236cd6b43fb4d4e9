//! A broker of a test's own: tansu with Postgres storage, which survives its own restart.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{database_url, free_port, log_dir, pg, unique, Cluster};

/// The tables of tansu 0.6.0's Postgres storage engine. tansu 0.6.0 does not create them
/// (its `pg.rs` only runs the queries under `tansu-storage/src/sql/`; the DDL it ships in
/// `src/ddl/` is SQLite's), so this is that DDL in Postgres types, with the column types
/// its binary `COPY` into `record` and `header` and its parameters need, plus the
/// `record.transaction_id` that its Postgres-only `src/pg/record_fetch.sql` reads.
const TANSU_PG_SCHEMA: &str = include_str!("tansu-postgres.sql");

/// The tansu binary `scripts/services.sh` installs.
fn tansu_bin() -> PathBuf {
    let home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cargo")
        });
    home.join("bin/tansu")
}

/// `database_url()` with another database name.
fn database_url_for(db: &str) -> String {
    let url = database_url();
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b.to_string(), format!("?{q}")),
        None => (url.clone(), String::new()),
    };
    let (server, _) = base.rsplit_once('/').expect("database url with a path");
    format!("{server}/{db}{query}")
}

/// A tansu broker of one test's own, on a free port, storing everything in a fresh
/// Postgres database, so that it can be SIGKILLed and restarted on the same port and
/// database with its topics, records, committed offsets and producer state intact.
/// Dropping it kills the broker and drops the database.
pub struct Tansu {
    pub port: u16,
    pub db: String,
    pub log: PathBuf,
    pub restarts: usize,
    child: Option<Child>,
}

impl Tansu {
    pub async fn start(name: &str) -> Tansu {
        let bin = tansu_bin();
        assert!(
            bin.exists(),
            "{} is missing: run scripts/services.sh broker",
            bin.display()
        );
        let db = unique(&format!("tansu_{name}")).to_lowercase();
        let admin = pg().await;
        sqlx::query(&format!("CREATE DATABASE \"{db}\""))
            .execute(&admin)
            .await
            .expect("create the broker's database");
        admin.close().await;
        let own = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(&database_url_for(&db))
            .await
            .expect("connect to the broker's database");
        sqlx::raw_sql(TANSU_PG_SCHEMA)
            .execute(&own)
            .await
            .expect("create tansu's tables");
        own.close().await;
        let log = log_dir().join(format!("{db}.tansu.log"));
        let mut t = Tansu {
            port: free_port(),
            db,
            log,
            restarts: 0,
            child: None,
        };
        t.spawn();
        t.wait_up(Duration::from_secs(30)).await;
        t
    }

    /// The broker as a [`Cluster`] to create topics on, produce to and read from.
    pub fn cluster(&self) -> Cluster {
        Cluster {
            brokers: format!("127.0.0.1:{}", self.port),
        }
    }

    /// tansu's Postgres client tries TLS first and rejects the local server's snake-oil
    /// certificate (issued to `localhost`), so TLS is off for it.
    fn storage_url(&self) -> String {
        let url = database_url_for(&self.db);
        if url.contains("sslmode=") {
            url
        } else if url.contains('?') {
            format!("{url}&sslmode=disable")
        } else {
            format!("{url}?sslmode=disable")
        }
    }

    fn spawn(&mut self) {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let listener = format!("tcp://127.0.0.1:{}", self.port);
        let child = Command::new(tansu_bin())
            .arg("broker")
            .args(["--listener-url", &listener])
            .args(["--advertised-listener-url", &listener])
            .args(["--storage-engine", &self.storage_url()])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::from(file.try_clone().unwrap()))
            .stderr(Stdio::from(file))
            .spawn()
            .expect("spawn tansu");
        self.child = Some(child);
    }

    /// Waits until the broker answers a metadata request.
    async fn wait_up(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("tansu exited ({status}); see {}", self.log.display());
            }
            let cluster = self.cluster();
            let up = tokio::task::spawn_blocking(move || cluster.answers())
                .await
                .unwrap();
            if up {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "tansu did not come up on {}; see {}",
                self.cluster().brokers,
                self.log.display()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(Child::try_wait), Some(Ok(None)))
    }

    /// SIGKILL: no shutdown of any kind, open requests die with their connections.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the broker again on the same port and database, and waits until it answers.
    pub async fn start_again(&mut self) {
        assert!(self.child.is_none(), "tansu is still running");
        self.spawn();
        self.restarts += 1;
        self.wait_up(Duration::from_secs(30)).await;
    }

    /// `kill` followed by `start_again` after `down`.
    pub async fn restart(&mut self, down: Duration) {
        self.kill();
        tokio::time::sleep(down).await;
        self.start_again().await;
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        self.kill();
        let _ = Command::new("psql")
            .args([&database_url(), "-qc"])
            .arg(format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                self.db
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
