//! One active worker per schema (the relay, the pruner): a session-level advisory lock on
//! a connection of its own.
//!
//! The holder does all its queries on the lock's connection, so losing the connection
//! (and with it the lock) also stops it from writing anything. Closing the connection
//! releases the lock; other replicas stand by and try again.

use std::time::Duration;

use sqlx::PgConnection;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{dedicated_connection, ADVISORY_LOCK_CLASS};
use crate::retry::Backoff;
use crate::settings::DbSettings;

/// A named singleton role in one schema, e.g. `relay` or `pruner`.
pub struct SingletonLock {
    /// The purpose; with the schema it makes the lock's second key.
    pub role: &'static str,
    pub db: DbSettings,
    /// How long a standby waits before it tries the lock again.
    pub standby_retry: Duration,
}

/// Why [`SingletonLock::acquire`] returned without the lock.
pub struct Stopped;

impl SingletonLock {
    /// Waits until this process holds the lock (returning the connection that holds it)
    /// or `stop` fires. Says once, at INFO, that it stands by and for which schema.
    pub async fn acquire(&self, stop: &CancellationToken) -> Result<PgConnection, Stopped> {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        let mut said_standby = false;
        loop {
            if stop.is_cancelled() {
                return Err(Stopped);
            }
            let mut conn = match dedicated_connection(&self.db).await {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, role = self.role, "cannot reach Postgres; retrying");
                    sleep_or_stop(backoff.next_delay(), stop).await;
                    continue;
                }
            };
            let locked: Result<bool, sqlx::Error> =
                sqlx::query_scalar("SELECT pg_try_advisory_lock($1, hashtext($2 || ':' || $3))")
                    .bind(ADVISORY_LOCK_CLASS)
                    .bind(self.role)
                    .bind(&self.db.schema)
                    .fetch_one(&mut conn)
                    .await;
            match locked {
                Ok(true) => return Ok(conn),
                Ok(false) => {
                    if !said_standby {
                        // Who holds it: the backend of the other replica's lock connection.
                        let holder = self.holder(&mut conn).await.unwrap_or_default();
                        info!(
                            role = self.role,
                            schema = self.db.schema,
                            holder = holder.as_deref().unwrap_or("unknown"),
                            "another replica holds this role for the schema; standing by until it lets go"
                        );
                        said_standby = true;
                    }
                    backoff.reset();
                    sleep_or_stop(self.standby_retry, stop).await;
                }
                Err(e) => {
                    warn!(error = %e, role = self.role, "lock query failed; retrying");
                    sleep_or_stop(backoff.next_delay(), stop).await;
                }
            }
        }
    }
}

impl SingletonLock {
    /// The holder of the lock as Postgres sees it: `pid <backend pid> from <client
    /// address>, since <connection start>`, the address being the other replica's pod.
    async fn holder(&self, conn: &mut PgConnection) -> Result<Option<String>, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT format('pid %s from %s, since %s', a.pid, coalesce(host(a.client_addr), 'a local socket'),
                           date_trunc('second', a.backend_start))
             FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
             WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
               AND l.classid::int8 = ($1::int8 & 4294967295)
               AND l.objid::int8 = (hashtext($2 || ':' || $3)::int8 & 4294967295)
             LIMIT 1",
        )
        .bind(ADVISORY_LOCK_CLASS)
        .bind(self.role)
        .bind(&self.db.schema)
        .fetch_optional(conn)
        .await
    }
}

/// Sleeps for `d`, or less when `stop` fires.
pub async fn sleep_or_stop(d: Duration, stop: &CancellationToken) {
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = tokio::time::sleep(d) => {}
    }
}
