//! Postgres: connection pool, embedded migrations, and the gate transaction.
//!
//! All kdedup tables live in one schema (`--db-schema`), reached through the connection's
//! `search_path`, so the SQL below never names the schema and the application's tables
//! are never touched.
//!
//! The gate is one statement: insert the batch's `(scope, event_id)` rows (keyed by
//! [`event_key`], a 16-byte digest of the two), doing nothing on conflict with a live row, and insert outbox rows for exactly the rows that were
//! inserted. The statement commits with the batch, so a crash leaves both or neither.
//! The same statement adds the batch's decisions to the per-scope totals in
//! `gate_counters` (read by `kdedup stats`).

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use sha2::{Digest, Sha256};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection};
use uuid::Uuid;

use crate::config::DbConfig;

/// Migrations under `migrations/`, compiled into the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

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
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("postgres error: {0}")]
    Sqlx(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("no answer from postgres within {0:?}")]
    Timeout(Duration),
}

impl DbError {
    /// Whether waiting and retrying can help (connection trouble, conflicts between
    /// replicas). Anything else still gets retried by the pipeline, but is logged as an
    /// error an operator must look at.
    pub fn is_transient(&self) -> bool {
        match self {
            DbError::Sqlx(sqlx::Error::Database(db)) => {
                matches!(
                    db.code().as_deref(),
                    Some(sqlstate::SERIALIZATION_FAILURE)
                        | Some(sqlstate::DEADLOCK_DETECTED)
                        | Some(sqlstate::ADMIN_SHUTDOWN)
                        | Some(sqlstate::CANNOT_CONNECT_NOW)
                        | Some(sqlstate::TOO_MANY_CONNECTIONS)
                ) || db.code().is_some_and(|c| c.starts_with("08"))
            }
            DbError::Sqlx(
                sqlx::Error::Io(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::Tls(_)
                | sqlx::Error::Protocol(_),
            ) => true,
            DbError::Timeout(_) => true,
            _ => false,
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

    /// A data exception (SQLSTATE class 22): the rows, not the connection, are at fault.
    pub fn data_exception(&self) -> Option<(String, String)> {
        match self {
            DbError::Sqlx(sqlx::Error::Database(db)) => db
                .code()
                .filter(|c| c.starts_with(sqlstate::DATA_EXCEPTION_CLASS))
                .map(|c| (c.into_owned(), db.message().to_string())),
            _ => None,
        }
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
    fn of(cfg: &DbConfig, e: &DbError) -> Option<Self> {
        e.configuration_problem().map(|fix| ConnectConfigError {
            url: crate::config::redact_url(&cfg.url),
            cause: e.to_string(),
            fix,
        })
    }

    /// `e` as a [`ConnectConfigError`] when it is one, else `e` with what was being done.
    pub fn or_context(cfg: &DbConfig, e: DbError) -> anyhow::Error {
        match Self::of(cfg, &e) {
            Some(config) => config.into(),
            None => anyhow::Error::new(e).context(format!(
                "connecting to Postgres ({})",
                crate::config::redact_url(&cfg.url)
            )),
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

/// Connects once, outside the pool, and reports how: the first thing every command that
/// talks to Postgres does, so that a setting the server refuses is reported as one (with
/// the fix), not retried. Transient failures (connection refused, the server starting)
/// are returned as `Ok(Err(_))` for the caller to retry.
pub async fn check_connection(
    cfg: &DbConfig,
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

pub fn connect_options(cfg: &DbConfig) -> Result<PgConnectOptions, DbError> {
    let opts = PgConnectOptions::from_str(&cfg.url)?
        .application_name("kdedup")
        .options([("search_path", cfg.schema.as_str())])
        // Statement text can carry event ids; keep it at debug level.
        .log_statements(tracing::log::LevelFilter::Debug)
        .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_secs(5));
    Ok(opts)
}

/// A pool whose connections all use kdedup's schema. Connects lazily, so a database that is
/// down at start is retried by the callers instead of failing the process.
pub fn pool(cfg: &DbConfig) -> Result<PgPool, DbError> {
    Ok(PgPoolOptions::new()
        .max_connections(cfg.max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(connect_options(cfg)?))
}

/// A single connection outside the pool, for session-level advisory locks.
pub async fn dedicated_connection(cfg: &DbConfig) -> Result<PgConnection, DbError> {
    Ok(PgConnection::connect_with(&connect_options(cfg)?).await?)
}

/// Creates the schema (if missing) and applies the embedded migrations into it.
pub async fn migrate(pool: &PgPool, schema: &str) -> Result<(), DbError> {
    debug_assert!(crate::config::validate_schema(schema).is_ok());
    let mut tx = pool.begin().await?;
    // Serialise concurrent starts: CREATE SCHEMA IF NOT EXISTS can still race.
    sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext('schema:' || $2))")
        .bind(ADVISORY_LOCK_CLASS)
        .bind(schema)
        .execute(&mut *tx)
        .await?;
    // The name was validated against [a-z_][a-z0-9_]*, so quoting it is enough.
    sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""))
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// The key of `(scope, event_id)` in `processed_events`: the first 16 bytes of
/// SHA-256(len(scope) as u32 big-endian || scope || event_id). The SQL function
/// `event_key(scope, event_id)` (migration 3) computes the same value; the reasons for a
/// digest key are written there.
pub fn event_key(scope: &str, event_id: &str) -> Uuid {
    let mut h = Sha256::new();
    h.update((scope.len() as u32).to_be_bytes());
    h.update(scope.as_bytes());
    h.update(event_id.as_bytes());
    let digest = h.finalize();
    let mut key = [0u8; 16];
    key.copy_from_slice(&digest[..16]);
    Uuid::from_bytes(key)
}

/// One first-sighting candidate sent to the gate. Duplicates inside a batch are removed
/// before this point, so each `(scope, event_id)` appears once per call.
#[derive(Debug, Clone)]
pub struct GateRow {
    pub scope: String,
    pub event_id: String,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub timestamp_ms: Option<i64>,
    pub payload_hash: Vec<u8>,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<u8>,
}

/// What the gate decided for one row, in the order the rows were given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GateOutcome {
    /// First sighting: recorded and queued in the outbox.
    Forwarded,
    /// Already recorded. `first` is where it was first seen, when visible to this
    /// transaction (a replica that committed the same id a moment ago may not be).
    Duplicate {
        first: Option<FirstSighting>,
        /// The first payload differed from this one.
        payload_differs: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirstSighting {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

// Gate rows are inserted in event_key order: two replicas inserting overlapping ids then lock
// them in the same order, which rules out deadlocks between their transactions. Outbox
// rows are inserted in input order, which is the order the relay publishes in.
const GATE_SQL: &str = r#"
WITH batch AS (
    SELECT *
    FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int4[], $5::int8[], $6::int8[],
                $7::bytea[], $8::bytea[], $9::bytea[], $10::bytea[], $14::uuid[])
         WITH ORDINALITY
         AS b(scope, event_id, source_topic, source_partition, source_offset,
              source_timestamp_ms, payload_hash, key, value, headers, event_key, ord)
),
gate AS (
    INSERT INTO processed_events
        (event_key, scope, event_id, source_topic, source_partition, source_offset,
         payload_hash, first_seen_at, expires_at)
    SELECT event_key, scope, event_id, source_topic, source_partition, source_offset,
           payload_hash, now(), now() + make_interval(secs => $11)
    FROM batch
    ORDER BY event_key
    -- An expired row is treated as absent even before the pruner deleted it: the id is
    -- accepted again as new, which is what a TTL means.
    ON CONFLICT (event_key) DO UPDATE
        SET source_topic = EXCLUDED.source_topic,
            source_partition = EXCLUDED.source_partition,
            source_offset = EXCLUDED.source_offset,
            payload_hash = EXCLUDED.payload_hash,
            first_seen_at = EXCLUDED.first_seen_at,
            expires_at = EXCLUDED.expires_at
        WHERE processed_events.expires_at <= now()
    RETURNING event_key
),
queued AS (
    INSERT INTO outbox
        (scope, event_id, source_topic, source_partition, source_offset,
         source_timestamp_ms, key, value, headers)
    SELECT b.scope, b.event_id, b.source_topic, b.source_partition, b.source_offset,
           b.source_timestamp_ms, b.key, b.value, b.headers
    FROM batch b
    JOIN gate g ON g.event_key = b.event_key
    ORDER BY b.ord
    RETURNING 1
),
decided AS (
    SELECT b.ord, b.scope,
           g.event_key IS NOT NULL AS inserted,
           pe.source_topic, pe.source_partition, pe.source_offset,
           (pe.event_key IS NOT NULL AND pe.payload_hash IS DISTINCT FROM b.payload_hash)
               AS payload_differs
    FROM batch b
    LEFT JOIN gate g ON g.event_key = b.event_key
    LEFT JOIN processed_events pe
           ON g.event_key IS NULL AND pe.event_key = b.event_key
),
-- Running totals for `kdedup stats`, one upsert per scope in this batch. A duplicate is a
-- row not inserted whose payload matches the first one (a reused id with another payload
-- is a mismatch, not a duplicate), plus the in-batch duplicates the caller removed before
-- this statement ($12 scopes, $13 counts). The counters row of a scope is a hot row: the
-- transactions of all replicas gating that scope take its lock at the end of this
-- statement and keep it until their COMMIT, so they serialise there for one round trip.
-- Scopes are locked in order, and only after every gate row, so this cannot deadlock.
counted AS (
    INSERT INTO gate_counters AS c (scope, duplicates, forwarded)
    SELECT scope, sum(duplicates)::int8, sum(forwarded)::int8
    FROM (
        SELECT scope, (NOT inserted AND NOT payload_differs)::int AS duplicates,
               inserted::int AS forwarded
        FROM decided
        UNION ALL
        SELECT scope, n, 0 FROM UNNEST($12::text[], $13::int8[]) AS d(scope, n)
    ) t
    GROUP BY scope
    ORDER BY scope
    ON CONFLICT (scope) DO UPDATE
        SET duplicates = c.duplicates + EXCLUDED.duplicates,
            forwarded = c.forwarded + EXCLUDED.forwarded,
            updated_at = now()
    RETURNING 1
)
SELECT ord, inserted, source_topic, source_partition, source_offset, payload_differs
FROM decided
ORDER BY ord
"#;

/// `(ord, inserted, first topic, first partition, first offset, payload differs)`.
type GateResultRow = (i64, bool, Option<String>, Option<i32>, Option<i64>, bool);

/// Runs the gate for `rows` in one transaction and commits it. Returns one outcome per row.
///
/// `in_batch_duplicates` counts, per scope, the duplicates the caller dropped from the batch
/// before the gate (same id twice in one batch); they are added to the `gate_counters`
/// totals in the same statement.
pub async fn gate(
    pool: &PgPool,
    rows: &[GateRow],
    ttl: Duration,
    in_batch_duplicates: &BTreeMap<String, i64>,
) -> Result<Vec<GateOutcome>, DbError> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let (dup_scopes, dup_counts): (Vec<&str>, Vec<i64>) = in_batch_duplicates
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(s, n)| (s.as_str(), *n))
        .unzip();
    let mut scopes = Vec::with_capacity(rows.len());
    let mut ids = Vec::with_capacity(rows.len());
    let mut topics = Vec::with_capacity(rows.len());
    let mut partitions = Vec::with_capacity(rows.len());
    let mut offsets = Vec::with_capacity(rows.len());
    let mut timestamps = Vec::with_capacity(rows.len());
    let mut hashes = Vec::with_capacity(rows.len());
    let mut keys = Vec::with_capacity(rows.len());
    let mut values = Vec::with_capacity(rows.len());
    let mut headers = Vec::with_capacity(rows.len());
    let mut event_keys = Vec::with_capacity(rows.len());
    for r in rows {
        event_keys.push(event_key(&r.scope, &r.event_id));
        scopes.push(r.scope.as_str());
        ids.push(r.event_id.as_str());
        topics.push(r.topic.as_str());
        partitions.push(r.partition);
        offsets.push(r.offset);
        timestamps.push(r.timestamp_ms);
        hashes.push(r.payload_hash.as_slice());
        keys.push(r.key.as_deref());
        values.push(r.value.as_deref());
        headers.push(r.headers.as_slice());
    }
    let mut tx = pool.begin().await?;
    let result: Vec<GateResultRow> = sqlx::query_as(GATE_SQL)
        .bind(&scopes)
        .bind(&ids)
        .bind(&topics)
        .bind(&partitions)
        .bind(&offsets)
        .bind(&timestamps)
        .bind(&hashes)
        .bind(&keys)
        .bind(&values)
        .bind(&headers)
        .bind(ttl.as_secs_f64())
        .bind(&dup_scopes)
        .bind(&dup_counts)
        .bind(&event_keys)
        .fetch_all(&mut *tx)
        .await?;
    crate::crash::gate_delay().await;
    crate::crash::reached(crate::crash::Point::BeforeDbCommit);
    tx.commit().await?;
    debug_assert_eq!(result.len(), rows.len());
    Ok(result
        .into_iter()
        .map(|(_, inserted, topic, partition, offset, differs)| {
            if inserted {
                GateOutcome::Forwarded
            } else {
                let first = match (topic, partition, offset) {
                    (Some(topic), Some(partition), Some(offset)) => Some(FirstSighting {
                        topic,
                        partition,
                        offset,
                    }),
                    _ => None,
                };
                GateOutcome::Duplicate {
                    payload_differs: first.is_some() && differs,
                    first,
                }
            }
        })
        .collect())
}

/// How many of `keys` (scope, event_id) the gate holds and has not expired.
pub async fn live_ids(pool: &PgPool, keys: &[(String, String)]) -> Result<usize, DbError> {
    if keys.is_empty() {
        return Ok(0);
    }
    let event_keys: Vec<Uuid> = keys.iter().map(|(s, i)| event_key(s, i)).collect();
    let n: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM processed_events
         WHERE event_key = ANY($1) AND expires_at > now()",
    )
    .bind(&event_keys)
    .fetch_one(pool)
    .await?;
    Ok(n as usize)
}

/// Rows waiting in the outbox.
pub async fn outbox_backlog(pool: &PgPool) -> Result<i64, DbError> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(pool)
        .await?)
}

/// Cheap liveness check used by readiness.
pub async fn ping(pool: &PgPool) -> Result<(), DbError> {
    sqlx::query("SELECT 1").execute(pool).await?;
    Ok(())
}
