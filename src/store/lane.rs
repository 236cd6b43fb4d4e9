//! The connection a gate lane keeps for its own transactions, outside the pool.
//!
//! sqlx's pool tests a connection with a round trip when it lends it out and again when it
//! takes it back, so a gate transaction through the pool is six round trips: test, BEGIN,
//! the gate statement, the forwarding write, COMMIT, test. A lane runs one transaction at a
//! time, back to back, on a connection of its own: four.
//!
//! A connection that an error may have broken, or whose use was dropped half-way (a
//! timeout, a stop), is closed, and the next use connects again. One idle for longer than
//! [`TEST_AFTER_IDLE`] is tested first, as the pool tests every connection, so a restart
//! of Postgres between two quiet batches costs a reconnect, not a failed attempt.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgPool};
use sqlx::{Connection, PgConnection};
use tokio::sync::{Mutex, MutexGuard};
use tracing::debug;

use super::DbError;

/// A connection unused for longer than this is tested before a transaction.
pub const TEST_AFTER_IDLE: Duration = Duration::from_secs(2);

/// A gate lane's own connection: connected on first use, kept between transactions.
pub struct LaneConnection {
    options: Arc<PgConnectOptions>,
    /// The connection and when its last use ended.
    held: Mutex<Option<(PgConnection, Instant)>>,
}

/// The lane's connection, lent for one use: [`Lent::give_back`] keeps it for the next;
/// dropped without that, it is closed.
pub struct Lent<'a> {
    held: MutexGuard<'a, Option<(PgConnection, Instant)>>,
    conn: PgConnection,
}

impl LaneConnection {
    /// A connection with the pool's settings (schema, TLS, timeouts), outside the pool.
    pub fn new(pool: &PgPool) -> Self {
        LaneConnection {
            options: pool.connect_options(),
            held: Mutex::new(None),
        }
    }

    /// The connection, tested first if it has been idle, connected if there is none.
    pub async fn lend(&self) -> Result<Lent<'_>, DbError> {
        let mut held = self.held.lock().await;
        let kept = match held.take() {
            Some((conn, last)) if last.elapsed() < TEST_AFTER_IDLE => Some(conn),
            Some((mut conn, _)) => match conn.ping().await {
                Ok(()) => Some(conn),
                Err(e) => {
                    debug!(error = %e, "gate lane's idle connection is gone; connecting again");
                    None
                }
            },
            None => None,
        };
        let conn = match kept {
            Some(conn) => conn,
            None => PgConnection::connect_with(&self.options).await?,
        };
        Ok(Lent { held, conn })
    }
}

impl Lent<'_> {
    pub fn conn(&mut self) -> &mut PgConnection {
        &mut self.conn
    }

    /// Ends the use that had `result`: the connection is kept unless the error may have
    /// left it broken.
    pub fn give_back<T>(mut self, result: &Result<T, DbError>) {
        if result.as_ref().err().map_or(true, leaves_connection_usable) {
            *self.held = Some((self.conn, Instant::now()));
        }
    }
}

/// Errors after which a connection is still in a known state: the server refused a
/// statement and the transaction was rolled back, the session carries on. Anything else
/// (I/O, TLS, protocol, a timeout mid-statement, the server ending the session) may have
/// broken it.
fn leaves_connection_usable(e: &DbError) -> bool {
    match e {
        DbError::Sqlx(sqlx::Error::Database(db)) | DbError::Sink(sqlx::Error::Database(db)) => {
            // Class 08: connection exception; 57: operator intervention (shutdown,
            // terminated session, cancelled statement).
            !db.code()
                .is_some_and(|c| c.starts_with("08") || c.starts_with("57"))
        }
        _ => false,
    }
}
