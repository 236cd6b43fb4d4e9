//! Postgres: connections, embedded migrations, errors, and every statement kdedup runs.
//!
//! All kdedup tables live in one schema (`--db-schema`), reached through the connection's
//! `search_path`, so the SQL never names the schema and the application's tables are never
//! touched. Statements live in the submodule of the table they serve: [`gate`] (the gate
//! statement), [`delivery`] (the HTTP sink's status gate after the gate: final statuses,
//! leases), [`outbox`] (the Kafka sink's outbox), [`prune`], [`stats`] (gauges),
//! [`inspect`] (`kdedup inspect` / `kdedup stats`), and [`lock`] (one active relay or pruner per schema).
//! [`lane`] is the connection each gate lane keeps for its transactions.

/// The `gate_counters` upsert from a gate transaction's totals bound as three arrays at
/// the given parameter numbers: scopes (in name order, so concurrent upserts lock their
/// rows in one order), duplicates and forwarded counts. Used by the statement of its own
/// (`store::gate`) and inside the outbox write (`store::outbox`).
macro_rules! counters_upsert {
    ($scopes:literal, $duplicates:literal, $forwarded:literal) => {
        concat!(
            "INSERT INTO gate_counters AS c (scope, duplicates, forwarded)
SELECT * FROM UNNEST($",
            $scopes,
            "::text[], $",
            $duplicates,
            "::int8[], $",
            $forwarded,
            "::int8[]) ORDER BY 1
ON CONFLICT (scope) DO UPDATE
    SET duplicates = c.duplicates + EXCLUDED.duplicates,
        forwarded = c.forwarded + EXCLUDED.forwarded,
        updated_at = now()"
        )
    };
}

pub mod app_rows;
pub mod delivery;
pub mod gate;
pub mod inspect;
pub mod lane;
pub mod lock;
pub mod outbox;
pub mod prune;
pub mod relay;
pub mod sidecars;
pub mod stats;

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection};

use tracing::{info, warn};

use crate::settings::DbSettings;

/// Migrations under `migrations/`, compiled into the binary. Migrations applied by a newer
/// binary are not an error: a rollback to this binary, or an old replica still running in a
/// rolling update, keeps working on a schema one release ahead (which is why migrations
/// from the sidecar registry on must be additive, deploy/UPGRADING.md), and [`migrate`]
/// says so.
fn migrator() -> sqlx::migrate::Migrator {
    let mut migrator = sqlx::migrate!("./migrations");
    migrator.set_ignore_missing(true);
    migrator
}

/// First key of every advisory lock kdedup takes ("kddp"); the second is per purpose+schema.
pub const ADVISORY_LOCK_CLASS: i32 = 0x6b64_6470;

/// SQLSTATE codes the gate treats specially.
pub mod sqlstate {
    pub const SERIALIZATION_FAILURE: &str = "40001";
    pub const DEADLOCK_DETECTED: &str = "40P01";
    pub const ADMIN_SHUTDOWN: &str = "57P01";
    pub const CANNOT_CONNECT_NOW: &str = "57P03";
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    pub const INSUFFICIENT_PRIVILEGE: &str = "42501";
    pub const INVALID_AUTHORIZATION: &str = "28000";
    pub const INVALID_PASSWORD: &str = "28P01";
    pub const INVALID_CATALOG_NAME: &str = "3D000";
    /// Class 22, data exception: a value this database cannot store (a NUL byte in text,
    /// a character its encoding lacks). Retrying the same rows cannot help.
    pub const DATA_EXCEPTION_CLASS: &str = "22";
    /// Classes the sink statement's rows can be at fault with: 21 cardinality (an upsert
    /// that would touch one row twice), 22 data, 23 integrity (CHECK, NOT NULL, foreign
    /// and unique keys).
    pub const SINK_DATA_CLASSES: [&str; 3] = ["21", "22", "23"];
}

/// The rows, not the connection, are at fault: Postgres refused their data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub sqlstate: String,
    pub message: String,
    /// Refused by the sink statement (`--sink postgres`), not by the gate's own tables.
    pub by_sink: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("postgres error: {0}")]
    Sqlx(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("no answer from postgres within {0:?}")]
    Timeout(Duration),
    /// The statement that follows the gate (`--sink postgres`) failed.
    #[error("the sink statement failed: {0}")]
    Sink(sqlx::Error),
}

fn transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => {
            matches!(
                db.code().as_deref(),
                Some(sqlstate::SERIALIZATION_FAILURE)
                    | Some(sqlstate::DEADLOCK_DETECTED)
                    | Some(sqlstate::ADMIN_SHUTDOWN)
                    | Some(sqlstate::CANNOT_CONNECT_NOW)
                    | Some(sqlstate::TOO_MANY_CONNECTIONS)
            ) || db.code().is_some_and(|c| c.starts_with("08"))
        }
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_) => true,
        _ => false,
    }
}

impl DbError {
    /// Whether waiting and retrying can help (connection trouble, conflicts between
    /// replicas). Anything else still gets retried by the pipeline, but is logged as an
    /// error an operator must look at.
    pub fn is_transient(&self) -> bool {
        match self {
            DbError::Sqlx(e) | DbError::Sink(e) => transient(e),
            DbError::Timeout(_) => true,
            DbError::Migrate(_) => false,
        }
    }

    /// The SQLSTATE of a server error.
    pub fn sqlstate(&self) -> Option<String> {
        match self {
            DbError::Sqlx(sqlx::Error::Database(db)) | DbError::Sink(sqlx::Error::Database(db)) => {
                db.code().map(|c| c.into_owned())
            }
            _ => None,
        }
    }

    /// For an error that says the connection settings are wrong (not that the server is
    /// away), what to fix. Retrying such an error only hides it, so start-up gives up on
    /// it at once.
    pub fn configuration_problem(&self) -> Option<&'static str> {
        match self {
            DbError::Sqlx(sqlx::Error::Tls(_)) => Some(
                "TLS to Postgres failed: check sslmode, sslrootcert (the CA that signed the server's certificate), \
                 sslcert/sslkey in the URL, and for verify-full that the URL's host is a name in the certificate",
            ),
            DbError::Sqlx(sqlx::Error::Configuration(_)) => Some(
                "the connection settings are unusable: check the URL and every file it names (sslrootcert, sslcert, sslkey)",
            ),
            DbError::Sqlx(sqlx::Error::Database(db)) => match db.code().as_deref() {
                Some(sqlstate::INVALID_PASSWORD) | Some(sqlstate::INVALID_AUTHORIZATION) => Some(
                    "Postgres refused the login: check the user and password in the URL, and the server's \
                     pg_hba.conf (a server that requires TLS refuses sslmode=disable)",
                ),
                Some(sqlstate::INVALID_CATALOG_NAME) => {
                    Some("the database named in the URL does not exist: create it or correct the name")
                }
                _ => None,
            },
            _ => None,
        }
    }

    /// Whether the rows are at fault, not the connection: a data exception (SQLSTATE class
    /// 22) anywhere, or for the sink statement any of [`sqlstate::SINK_DATA_CLASSES`].
    /// Retrying the same rows cannot help; splitting the batch finds them.
    pub fn refused(&self) -> Option<Refused> {
        let (db, by_sink) = match self {
            DbError::Sqlx(sqlx::Error::Database(db)) => (db, false),
            DbError::Sink(sqlx::Error::Database(db)) => (db, true),
            _ => return None,
        };
        let code = db.code()?;
        let rows_at_fault = match by_sink {
            false => code.starts_with(sqlstate::DATA_EXCEPTION_CLASS),
            true => sqlstate::SINK_DATA_CLASSES
                .iter()
                .any(|c| code.starts_with(c)),
        };
        rows_at_fault.then(|| Refused {
            sqlstate: code.into_owned(),
            message: db.message().to_string(),
            by_sink,
        })
    }
}

/// A Postgres connection that cannot work as configured: the cause, the setting and the
/// fix, with the URL redacted.
#[derive(Debug, thiserror::Error)]
#[error("connecting to Postgres ({url}) failed: {cause}. Setting: --database-url / KDEDUP_DATABASE_URL. Fix: {fix}")]
pub struct ConnectConfigError {
    pub url: String,
    pub cause: String,
    pub fix: &'static str,
}

impl ConnectConfigError {
    /// The configuration problem `e` is, if it is one.
    fn of(cfg: &DbSettings, e: &DbError) -> Option<Self> {
        e.configuration_problem().map(|fix| ConnectConfigError {
            url: cfg.url.to_string(),
            cause: e.to_string(),
            fix,
        })
    }

    /// `e` as a [`ConnectConfigError`] when it is one, else `e` with what was being done.
    pub fn or_context(cfg: &DbSettings, e: DbError) -> anyhow::Error {
        match Self::of(cfg, &e) {
            Some(config) => config.into(),
            None => anyhow::Error::new(e).context(format!("connecting to Postgres ({})", cfg.url)),
        }
    }
}

/// Whether the connection is encrypted, as Postgres sees it (`pg_stat_ssl`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionSecurity {
    pub ssl: bool,
    pub version: Option<String>,
    pub cipher: Option<String>,
}

impl ConnectionSecurity {
    /// Says once how the connection to Postgres is protected. Plaintext is a warning
    /// unless the URL asked for it (`sslmode=disable`): with libpq's default, `prefer`, a
    /// server without TLS is used in plaintext without a word.
    pub fn log(&self, db: &DbSettings) {
        let url = db.url.expose();
        if self.ssl {
            info!(
                tls_version = self.version.as_deref().unwrap_or("?"),
                cipher = self.cipher.as_deref().unwrap_or("?"),
                "connected to Postgres over TLS"
            );
        } else if url.contains("sslmode=disable") || url.contains("ssl-mode=disable") {
            info!("connected to Postgres without TLS (sslmode=disable)");
        } else {
            warn!("connected to Postgres WITHOUT TLS: the server offers none; set sslmode=verify-full (with sslrootcert) in KDEDUP_DATABASE_URL to require it");
        }
    }
}

/// Connects once, outside the pool, and reports how: the first thing every command that
/// talks to Postgres does, so that a setting the server refuses is reported as one (with
/// the fix), not retried. Transient failures (connection refused, the server starting)
/// are returned as `Ok(Err(_))` for the caller to retry.
pub async fn check_connection(
    cfg: &DbSettings,
) -> Result<Result<ConnectionSecurity, DbError>, ConnectConfigError> {
    let attempt = async {
        let mut conn = dedicated_connection(cfg).await?;
        let security: (bool, Option<String>, Option<String>) = sqlx::query_as(
            "SELECT ssl, version, cipher FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        )
        .fetch_optional(&mut conn)
        .await?
        .unwrap_or((false, None, None));
        let _ = conn.close().await;
        Ok::<_, DbError>(ConnectionSecurity {
            ssl: security.0,
            version: security.1,
            cipher: security.2,
        })
    };
    match attempt.await {
        Ok(security) => Ok(Ok(security)),
        Err(e) => match ConnectConfigError::of(cfg, &e) {
            Some(config) => Err(config),
            None => Ok(Err(e)),
        },
    }
}

pub fn connect_options(cfg: &DbSettings) -> Result<PgConnectOptions, DbError> {
    let opts = PgConnectOptions::from_str(cfg.url.expose())?
        .application_name("kdedup")
        // JIT compiles a plan in about a second: a loss for statements that run in
        // milliseconds, which is all kdedup runs (a fresh table's missing statistics can
        // push the gate statement's estimate over jit_above_cost).
        .options([("search_path", cfg.schema.as_str()), ("jit", "off")])
        // Statement text can carry event ids; keep it at debug level.
        .log_statements(tracing::log::LevelFilter::Debug)
        .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_secs(5));
    Ok(opts)
}

/// A pool whose connections all use kdedup's schema. Connects lazily, so a database that is
/// down at start is retried by the callers instead of failing the process.
pub fn pool(cfg: &DbSettings) -> Result<PgPool, DbError> {
    pool_of(cfg, cfg.max_connections)
}

/// The pool of `kdedup run`, whose gate lanes each hold one of `--db-max-connections`
/// of their own ([`lane::LaneConnection`]): the rest, and at least one, for everything
/// else.
pub fn pool_beside_lanes(cfg: &DbSettings, lanes: usize) -> Result<PgPool, DbError> {
    let lanes = u32::try_from(lanes).unwrap_or(u32::MAX);
    pool_of(cfg, cfg.max_connections.saturating_sub(lanes).max(1))
}

fn pool_of(cfg: &DbSettings, size: u32) -> Result<PgPool, DbError> {
    Ok(PgPoolOptions::new()
        .max_connections(size)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(connect_options(cfg)?))
}

/// A single connection outside the pool, for session-level advisory locks.
pub async fn dedicated_connection(cfg: &DbSettings) -> Result<PgConnection, DbError> {
    Ok(PgConnection::connect_with(&connect_options(cfg)?).await?)
}

/// Creates the schema (if missing) and applies the embedded migrations into it.
pub async fn migrate(pool: &PgPool, schema: &str) -> Result<(), DbError> {
    debug_assert!(schema
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'));
    let mut tx = pool.begin().await?;
    // Serialise concurrent starts: CREATE SCHEMA IF NOT EXISTS can still race.
    sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext('schema:' || $2))")
        .bind(ADVISORY_LOCK_CLASS)
        .bind(schema)
        .execute(&mut *tx)
        .await?;
    // A schema created beforehand (by a DBA, for a role without CREATE on the database)
    // is used as it is: CREATE SCHEMA IF NOT EXISTS would need that privilege even then.
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
            .bind(schema)
            .fetch_one(&mut *tx)
            .await?;
    if !exists {
        // The name was validated against [a-z_][a-z0-9_]*, so quoting it is enough.
        sqlx::query(&format!("CREATE SCHEMA \"{schema}\""))
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    let migrator = migrator();
    migrator.run(pool).await?;
    let known = migrator.iter().map(|m| m.version).max().unwrap_or(0);
    let newer: Vec<i64> = sqlx::query_scalar(
        "SELECT version FROM _sqlx_migrations WHERE version > $1 ORDER BY version",
    )
    .bind(known)
    .fetch_all(pool)
    .await?;
    if !newer.is_empty() {
        warn!(schema, newer_migrations = ?newer, this_binary_knows_up_to = known,
              "the schema has migrations of a newer kdedup applied: this binary runs on it when they are additive, as every migration after the sidecar registry is (deploy/UPGRADING.md), but upgrade it: it does not use what they added");
    }
    Ok(())
}

/// Migrations of this binary not applied to the pool's schema (all of them when it has
/// none): a sidecar started with `--migrate-on-start false` waits for them.
pub async fn unapplied_migrations(pool: &PgPool) -> Result<Vec<i64>, sqlx::Error> {
    let applied: Vec<i64> =
        if sqlx::query_scalar::<_, bool>("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
            .fetch_one(pool)
            .await?
        {
            sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
                .fetch_all(pool)
                .await?
        } else {
            Vec::new()
        };
    Ok(migrator()
        .iter()
        .map(|m| m.version)
        .filter(|v| !applied.contains(v))
        .collect())
}

/// Why a failed migration cannot succeed by retrying, and the fix: a privilege the role
/// lacks, a schema in a state the migrations do not expect, an applied migration that was
/// changed. `None` for failures that can heal (the connection, a lock timeout).
pub fn migration_cannot_heal(e: &DbError) -> Option<&'static str> {
    use sqlx::migrate::MigrateError as M;
    let db = match e {
        DbError::Migrate(M::VersionMismatch(_)) => {
            return Some(
                "an applied migration differs from the one in this binary (edited after it was applied): \
                 run the kdedup release that applied it, or restore the schema",
            )
        }
        DbError::Migrate(M::Dirty(_)) => {
            return Some("a migration was left half applied: see _sqlx_migrations in the schema and restore it")
        }
        // Creating the schema, or a migration's own statements.
        DbError::Sqlx(sqlx::Error::Database(db))
        | DbError::Migrate(M::Execute(sqlx::Error::Database(db)))
        | DbError::Migrate(M::ExecuteMigration(sqlx::Error::Database(db), _)) => db,
        _ => return e.configuration_problem(),
    };
    match db.code().as_deref() {
        Some(sqlstate::INSUFFICIENT_PRIVILEGE) => Some(
            "kdedup's role lacks a privilege the migrations need (CREATE on the schema, or on the database to create \
             the schema). Run `kdedup migrate` once as the schema's owner (deploy/kubernetes/overlays/example/migrate-job.yaml) \
             and set KDEDUP_MIGRATE_ON_START=false, or GRANT CREATE ON SCHEMA <schema> TO <role>",
        ),
        Some(code) if code.starts_with("42") => Some(
            "the schema holds objects the migrations do not expect (a table of the same name, a changed column): \
             point KDEDUP_DB_SCHEMA at a schema of kdedup's own",
        ),
        _ => e.configuration_problem(),
    }
}

/// Migrations that cannot succeed as configured: what failed, the cause and the fix.
#[derive(Debug, thiserror::Error)]
#[error(
    "applying kdedup's migrations to schema {schema} failed ({tries} tries): {cause}. Fix: {fix}"
)]
pub struct MigrateConfigError {
    pub schema: String,
    pub tries: u32,
    pub cause: String,
    pub fix: &'static str,
}

/// Whether kdedup's tables exist in the schema (a dry-run replay against a schema no
/// sidecar has migrated yet finds none).
pub async fn gate_table_exists(pool: &PgPool) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT to_regclass('processed_events') IS NOT NULL")
        .fetch_one(pool)
        .await
}

/// Drops `schema` with everything in it: only `kdedup demo` does this, to its own schema
/// (the command line refuses a name that does not start with `kdedup_demo`).
pub async fn drop_schema(pool: &PgPool, schema: &str) -> Result<(), sqlx::Error> {
    debug_assert!(schema.starts_with("kdedup_demo"));
    sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
        .execute(pool)
        .await?;
    Ok(())
}

/// Cheap liveness check used by readiness.
pub async fn ping(pool: &PgPool) -> Result<(), DbError> {
    sqlx::query("SELECT 1").execute(pool).await?;
    Ok(())
}
