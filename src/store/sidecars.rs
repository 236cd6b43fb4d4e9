//! The sidecar registry (`kdedup_sidecars`): what each running sidecar of a schema serves,
//! read across every schema of the database for the drift checks of `kdedup run`.

use sqlx::PgPool;

/// What one sidecar serves, as it records itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    pub group_id: String,
    pub scope: String,
    pub sink: String,
    pub output: String,
    pub input_topics: Vec<String>,
}

/// Another sidecar's row, from this schema or another.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Peer {
    pub schema: String,
    pub instance: String,
    pub host: String,
    pub group_id: String,
    pub scope: String,
    pub sink: String,
    pub output: String,
    /// Seconds since its last heartbeat.
    pub seen_ago_s: f64,
}

/// Inserts or refreshes this process's row, in the pool's schema.
pub async fn heartbeat(
    pool: &PgPool,
    instance: &str,
    host: &str,
    served: &Served,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO kdedup_sidecars (instance, group_id, scope, sink, output, input_topics, version, host)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         ON CONFLICT (instance) DO UPDATE SET last_seen_at = now()",
    )
    .bind(instance)
    .bind(&served.group_id)
    .bind(&served.scope)
    .bind(&served.sink)
    .bind(&served.output)
    .bind(&served.input_topics)
    .bind(env!("CARGO_PKG_VERSION"))
    .bind(host)
    .execute(pool)
    .await?;
    Ok(())
}

/// Deletes this process's row (a clean stop) and rows not seen for `forget_after_s`.
pub async fn forget(pool: &PgPool, instance: &str, forget_after_s: f64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "DELETE FROM kdedup_sidecars
         WHERE instance = $1 OR last_seen_at < now() - make_interval(secs => $2)",
    )
    .bind(instance)
    .bind(forget_after_s)
    .execute(pool)
    .await?;
    Ok(())
}

/// Whether the registry exists in the pool's schema (it does not before `kdedup migrate`).
pub async fn exists(pool: &PgPool) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT to_regclass('kdedup_sidecars') IS NOT NULL")
        .fetch_one(pool)
        .await
}

/// Every other sidecar seen within `within_s`, in every schema of the database whose
/// registry this role may read. A schema whose registry cannot be read (no privilege, an
/// older shape) is left out rather than failing the check.
pub async fn peers(pool: &PgPool, instance: &str, within_s: f64) -> Result<Vec<Peer>, sqlx::Error> {
    let schemas: Vec<String> = sqlx::query_scalar(
        "SELECT n.nspname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.relname = 'kdedup_sidecars' AND c.relkind = 'r'
           AND has_schema_privilege(n.oid, 'USAGE') AND has_table_privilege(c.oid, 'SELECT')
         ORDER BY 1",
    )
    .fetch_all(pool)
    .await?;
    let mut peers = Vec::new();
    for schema in schemas {
        // The name comes from the catalog, not from configuration; quoted as an identifier.
        let sql = format!(
            "SELECT $3::text AS schema, instance, host, group_id, scope, sink, output,
                    extract(epoch FROM now() - last_seen_at)::float8 AS seen_ago_s
             FROM \"{}\".kdedup_sidecars
             WHERE instance <> $1 AND last_seen_at > now() - make_interval(secs => $2)",
            schema.replace('"', "\"\"")
        );
        match sqlx::query_as::<_, Peer>(&sql)
            .bind(instance)
            .bind(within_s)
            .bind(&schema)
            .fetch_all(pool)
            .await
        {
            Ok(rows) => peers.extend(rows),
            Err(sqlx::Error::Database(e)) => {
                tracing::debug!(schema, error = %e, "sidecar registry of this schema not readable; left out")
            }
            Err(e) => return Err(e),
        }
    }
    Ok(peers)
}
