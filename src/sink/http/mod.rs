//! The HTTP sink: each first-seen event is POSTed to the application (as Dapr and
//! Knative deliver to an app on localhost), behind a status gate, since a request cannot
//! join the gate transaction.
//!
//! Contract:
//! - **Lock on first touch.** The gate commits the event's row `PROCESSING`, leased to
//!   this replica ([`crate::store::gate::GateStatement::leased`]), before any request
//!   leaves. Only `PROCESSED` suppresses a later copy. A copy meeting a live lease held
//!   elsewhere waits until that delivery ended ([`crate::store::gate::GateOutcome::Busy`]);
//!   it is never sent at the same time.
//! - **Always a final status.** `PROCESSED` on a 2xx (with the answer's status, headers
//!   and bounded body), `FAILED` on a refusal or once out of attempts (then dead-lettered
//!   as `http_rejected` / `http_failed`). A stop gives the lease up (it expires at once);
//!   a crash leaves it to expire. Either way the offset was not stored, the event comes
//!   back, and the gate takes the row over: the delivery is retried with the same key.
//! - **Idempotency-Key** is the row's key ([`crate::store::gate::event_key`]): the same on
//!   every attempt of every replica, distinct across scopes. The one window in which the
//!   application sees an event twice is a crash after a request and before its
//!   `PROCESSED` was written; it then sees the same key.
//! - **Order and concurrency.** Events with the same Kafka key (a null key: the same
//!   partition) are sent one at a time, in input order; the rest go at once, at most
//!   `--http-concurrency` requests in flight over every lane. A lane gates its next batch
//!   while the previous one is delivered ([`Sink::pipelined`]: two batches in hand); each
//!   call of [`Sink::deliver`] registers its chains when it is made, after the chains of
//!   the same keys registered before it ([`Tail`]), so a retrying event holds back only
//!   the later events of its key, in its batch and the next. A copy held by another
//!   delivery ([`Pending::held`]) takes its place in its chain: the events after it wait
//!   until it is taken over and delivered, or ended elsewhere (at most
//!   [`Inner::held_wait`]). A batch's offsets are stored once every event of it is final,
//!   and only after the batch before it.
//! - **Leases** last `--http-lease` and are renewed while a batch is delivered, for the
//!   rows not final yet. A request starts only while at least `--http-timeout` of the
//!   lease is left, so none can still be running when another replica may take over.
//! - **Postgres cost.** Per event delivered: the gate's insert (one statement per batch)
//!   and one update to the final status (one statement for whatever outcomes came in
//!   while the previous one was written). A delivery longer than a third of the lease
//!   adds a renewal (one statement per batch per renewal).

mod attempt;
mod chain;
mod metrics;
pub mod request;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use prometheus::IntCounter;
use sqlx::PgPool;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use uuid::Uuid;

use self::chain::{chains, Chain, EndTail, HeldElsewhere, Tail, Tails};
pub use self::metrics::HttpMetrics;
use super::{Delivered, Pending, Sink};
use crate::metrics::Metrics;
use crate::model::identity::Rejection;
use crate::retry::Backoff;
use crate::settings::HttpSinkSettings;
use crate::store::delivery::{self, Final};
use crate::store::gate::{event_key, GateRow, GateStatement};

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// The HTTP sink of one process (shared by its lanes, or by a replay).
#[derive(Clone)]
pub struct HttpSink {
    inner: Arc<Inner>,
}

struct Inner {
    settings: HttpSinkSettings,
    uri: hyper::Uri,
    client: HttpClient,
    /// `--http-concurrency`, over every lane.
    permits: Semaphore,
    pool: PgPool,
    /// This process's lease owner name: host, pid and a random part, so a restarted
    /// process does not mistake its predecessor's leases for its own.
    owner: String,
    metrics: HttpMetrics,
    /// `kdedup_events_forwarded_total`: a `PROCESSED` written.
    forwarded: IntCounter,
    /// The last registered chain of each key, until it ended: a lane delivers its next
    /// batch while the previous one is still delivered ([`Sink::pipelined`]), and a
    /// key's events wait for that key's earlier ones.
    tails: Tails,
}

impl HttpSink {
    /// The sink for `settings`, its metrics registered on `metrics`' registry.
    pub fn new(settings: &HttpSinkSettings, pool: PgPool, metrics: &Metrics) -> Self {
        let uri: hyper::Uri = settings
            .url
            .expose()
            .parse()
            .expect("--http-url is checked at validation");
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(settings.timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(settings.concurrency)
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        let host = std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".into());
        let owner = format!(
            "{host}/{}/{:08x}",
            std::process::id(),
            rand::random::<u32>()
        );
        info!(url = %settings.url, owner, concurrency = settings.concurrency, "HTTP sink ready");
        HttpSink {
            inner: Arc::new(Inner {
                settings: settings.clone(),
                uri,
                client,
                permits: Semaphore::new(settings.concurrency),
                pool,
                owner,
                metrics: HttpMetrics::register(metrics),
                forwarded: metrics.events_forwarded.clone(),
                tails: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The gate statement of this sink: the status gate, leased to this process.
    pub fn gate_statement(&self) -> GateStatement {
        GateStatement::leased(self.inner.owner.clone(), self.inner.settings.lease)
    }

    /// Exports the `PROCESSING` rows past their lease every `every`, until `stop`.
    pub async fn watch_leases(self, every: Duration, stop: CancellationToken) {
        loop {
            match delivery::expired_leases(&self.inner.pool).await {
                Ok(n) => self.inner.metrics.processing_expired.set(n),
                Err(e) => debug!(error = %e, "cannot count expired leases"),
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    }
}

impl Sink for HttpSink {
    fn statement(&self) -> GateStatement {
        self.gate_statement()
    }

    fn committed(&self, _first_seen: usize, _sequenced: Vec<(GateRow, i64)>) {
        // Counted as forwarded when PROCESSED is written, not at the gate.
    }

    fn taken_over(&self, rows: usize) {
        self.inner.metrics.lease_takeovers.inc_by(rows as u64);
    }

    fn deliver<'a>(
        &'a self,
        rows: Vec<Pending<'a>>,
        gated_since: Instant,
        stop: &'a CancellationToken,
    ) -> BoxFuture<'a, Option<Delivered>> {
        // Registered now, not when the future first runs: the order of the calls is the
        // order of each key's deliveries.
        let (rows, held): (Vec<&GateRow>, Vec<_>) =
            rows.into_iter().map(|p| (p.row, p.held)).unzip();
        let chains = self.inner.register(&rows, held);
        Box::pin(self.inner.deliver(rows, chains, gated_since, stop))
    }

    fn pipelined(&self) -> bool {
        true
    }
}

/// How one event's delivery ended, as far as this process goes.
#[derive(Debug)]
enum Outcome {
    /// A 2xx.
    Processed {
        attempts: u32,
        status: u16,
        headers: String,
        body: Vec<u8>,
    },
    /// Refused (`rejected`) or out of attempts.
    Failed {
        attempts: u32,
        rejected: bool,
        status: Option<u16>,
        error: String,
    },
    /// A stop came first (before the first attempt, or between two).
    Stopped {
        attempts: u32,
        last_error: Option<String>,
    },
    /// Another replica took the row over before this one sent anything more (this one's
    /// lease expired): that replica delivers it.
    Lost,
    /// A row held by another delivery that ended it there (or a stop came first): nothing
    /// to deliver here.
    Elsewhere,
}

/// This process's lease on a batch's rows: until when a request may start.
struct LeaseClock {
    /// A request may start while this is at least `--http-timeout` away.
    safe_until: Mutex<Instant>,
    /// Rows still held and not final, by index in the batch.
    held: Mutex<HashSet<usize>>,
    /// Rows taken over from another delivery after the batch was gated, until the next
    /// renewal: until when their own lease is safe (it began when they were taken over,
    /// and a renewal may have passed them by).
    taken: Mutex<HashMap<usize, Instant>>,
    renewed: tokio::sync::Notify,
}

impl LeaseClock {
    fn safe_until(&self) -> Instant {
        *self.safe_until.lock().expect("lease lock")
    }

    /// Until when a request for row `i` may start.
    fn safe_until_for(&self, i: usize) -> Instant {
        let batch = self.safe_until();
        match self.taken.lock().expect("lease lock").get(&i) {
            Some(&own) => own.min(batch),
            None => batch,
        }
    }

    fn holds(&self, i: usize) -> bool {
        self.held.lock().expect("lease lock").contains(&i)
    }

    /// Row `i`, held elsewhere, was taken over by the gate; its lease is safe until
    /// `safe_until`.
    fn take(&self, i: usize, safe_until: Instant) {
        self.taken.lock().expect("lease lock").insert(i, safe_until);
        self.held.lock().expect("lease lock").insert(i);
    }
}

impl Inner {
    /// Margin kept between the lease's end as this process counts it and as Postgres
    /// does (clocks, the time a statement takes).
    fn margin(&self) -> Duration {
        (self.settings.lease / 10).min(Duration::from_secs(2))
    }

    /// The chains of `rows`, each after the chain of its key registered before it; `held`
    /// (one per row) go with their rows.
    fn register(&self, rows: &[&GateRow], mut held: Vec<Option<HeldElsewhere>>) -> Vec<Chain> {
        let mut tails = self.tails.lock().expect("tails lock");
        chains(rows)
            .into_iter()
            .map(|(key, rows)| {
                let tail = Arc::new(Tail::default());
                let after = tails.insert(key.clone(), tail.clone());
                Chain {
                    key,
                    rows: rows.into_iter().map(|i| (i, held[i].take())).collect(),
                    after,
                    tail,
                }
            })
            .collect()
    }

    /// Longest the later events of a key wait behind a copy held elsewhere before they go
    /// first: one and a half leases, more than a dead holder's lease can outlast the gate
    /// (it was renewed last before this batch was gated). Reached only when two deliveries
    /// hold copies the other waits for (two replicas given one key's events in opposite
    /// orders): both then go on.
    fn held_wait(&self) -> Duration {
        self.settings.lease + self.settings.lease / 2
    }

    async fn deliver(
        &self,
        rows: Vec<&GateRow>,
        chains: Vec<Chain>,
        gated_since: Instant,
        stop: &CancellationToken,
    ) -> Option<Delivered> {
        if rows.is_empty() {
            return Some(Vec::new());
        }
        let keys: Vec<Uuid> = rows
            .iter()
            .map(|r| event_key(&r.scope, &r.event_id))
            .collect();
        let elsewhere: HashSet<usize> = chains
            .iter()
            .flat_map(|c| c.rows.iter().filter(|(_, h)| h.is_some()).map(|(i, _)| *i))
            .collect();
        let lease = LeaseClock {
            safe_until: Mutex::new(gated_since + self.settings.lease - self.margin()),
            held: Mutex::new((0..rows.len()).filter(|i| !elsewhere.contains(i)).collect()),
            taken: Mutex::new(HashMap::new()),
            renewed: tokio::sync::Notify::new(),
        };
        let mut outcomes: Vec<Option<Outcome>> = (0..rows.len()).map(|_| None).collect();
        let (done_tx, done_rx) = mpsc::unbounded_channel::<(usize, Outcome)>();
        let chains = futures::future::join_all(chains.into_iter().map(|chain| {
            let done = done_tx.clone();
            let (rows, keys, lease) = (&rows, &keys, &lease);
            async move {
                let _end = EndTail {
                    tails: &self.tails,
                    key: &chain.key,
                    tail: &chain.tail,
                };
                if let Some(after) = &chain.after {
                    after.wait().await;
                }
                let mut stopped = false;
                // In input order; a row held elsewhere past `held_wait` goes to the back
                // (the later rows go first), to wait without a bound.
                let mut queue: std::collections::VecDeque<_> =
                    chain.rows.into_iter().map(|(i, h)| (i, h, true)).collect();
                while let Some((i, held, bounded)) = queue.pop_front() {
                    if let Some(mut held) = held {
                        let resolved = match bounded {
                            true => match tokio::time::timeout(self.held_wait(), &mut held).await {
                                Ok(resolved) => resolved,
                                Err(_elapsed) => {
                                    row_event!(warn, rows[i], waited_s = self.held_wait().as_secs(),
                                          "a copy of this event is still held by another delivery; the later events of its key go first");
                                    queue.push_back((i, Some(held), false));
                                    continue;
                                }
                            },
                            false => (&mut held).await,
                        };
                        if !self.taken_over(i, resolved.ok().flatten(), lease) {
                            let _ = done.send((i, Outcome::Elsewhere));
                            continue;
                        }
                    }
                    let outcome = match stopped {
                        true => Outcome::Stopped {
                            attempts: 0,
                            last_error: None,
                        },
                        false => self.deliver_one(rows[i], keys[i], i, lease, stop).await,
                    };
                    stopped |= matches!(outcome, Outcome::Stopped { .. });
                    let _ = done.send((i, outcome));
                }
            }
        }));
        drop(done_tx);
        let work = async {
            tokio::join!(
                chains,
                self.write_outcomes(done_rx, &keys, &lease, &mut outcomes)
            )
        };
        tokio::select! {
            _ = work => {}
            _ = self.renew(&keys, &lease, stop) => unreachable!("renews until the work is done"),
        }
        self.finish_stopped(&rows, &keys, &mut outcomes, stop).await
    }

    /// Whether a row held elsewhere is this batch's to deliver now: `since` is when the
    /// gate took it over (see [`Pending::held`]).
    fn taken_over(&self, i: usize, since: Option<Instant>, lease: &LeaseClock) -> bool {
        match since {
            Some(since) => {
                lease.take(i, since + self.settings.lease - self.margin());
                true
            }
            None => false,
        }
    }

    /// Writes outcomes as they come, grouped: one statement for whatever came in while
    /// the previous one ran. Retried until written (a stop included: the drain writes
    /// the outcomes of the requests it let finish).
    async fn write_outcomes(
        &self,
        mut done: mpsc::UnboundedReceiver<(usize, Outcome)>,
        keys: &[Uuid],
        lease: &LeaseClock,
        outcomes: &mut [Option<Outcome>],
    ) {
        while let Some(first) = done.recv().await {
            let mut batch = vec![first];
            while let Ok(more) = done.try_recv() {
                batch.push(more);
            }
            let finals: Vec<Final> = batch
                .iter()
                .filter_map(|(i, o)| final_of(keys[*i], o))
                .collect();
            if !finals.is_empty() {
                let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
                let written = loop {
                    match delivery::finish(&self.pool, &self.owner, &finals).await {
                        Ok(written) => break written,
                        Err(e) => {
                            let delay = backoff.next_delay();
                            warn!(error = %e, rows = finals.len(), retry_in_ms = delay.as_millis() as u64,
                                  "writing delivery outcomes failed; retrying");
                            tokio::time::sleep(delay).await;
                        }
                    }
                };
                let written: HashSet<Uuid> = written.into_iter().collect();
                for (i, o) in batch.iter_mut() {
                    if final_of(keys[*i], o).is_none() {
                        continue;
                    }
                    if !written.contains(&keys[*i]) {
                        self.metrics.leases_lost.inc();
                        *o = Outcome::Lost;
                        continue;
                    }
                    match o {
                        Outcome::Processed { .. } => self.forwarded.inc(),
                        Outcome::Failed { rejected, .. } => {
                            let reason = if *rejected {
                                "http_rejected"
                            } else {
                                "http_failed"
                            };
                            self.metrics.failed.with_label_values(&[reason]).inc();
                        }
                        _ => {}
                    }
                }
            }
            let mut held = lease.held.lock().expect("lease lock");
            for (i, o) in batch {
                if !matches!(o, Outcome::Stopped { .. }) {
                    held.remove(&i);
                }
                outcomes[i] = Some(o);
            }
        }
    }

    /// Renews the lease on the rows still held whenever less than two thirds of it is
    /// left; never returns (dropped when the batch's work is done).
    async fn renew(&self, keys: &[Uuid], lease: &LeaseClock, stop: &CancellationToken) {
        let length = self.settings.lease;
        let mut backoff = Backoff::new(Duration::from_millis(100), length / 10);
        loop {
            let due = lease.safe_until() + self.margin() - length * 2 / 3;
            tokio::time::sleep_until(due.into()).await;
            let held: Vec<usize> = lease
                .held
                .lock()
                .expect("lease lock")
                .iter()
                .copied()
                .collect();
            if held.is_empty() || (stop.is_cancelled() && lease.safe_until() <= Instant::now()) {
                // Nothing to renew, or stopping with a lease that has run out: nothing
                // will be sent any more.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            let held_keys: Vec<Uuid> = held.iter().map(|&i| keys[i]).collect();
            let sent = Instant::now();
            match delivery::renew(&self.pool, &self.owner, &held_keys, length).await {
                Ok(still) => {
                    backoff.reset();
                    let still: HashSet<Uuid> = still.into_iter().collect();
                    let mut h = lease.held.lock().expect("lease lock");
                    let mut taken = lease.taken.lock().expect("lease lock");
                    for i in held {
                        taken.remove(&i);
                        if !still.contains(&keys[i]) {
                            h.remove(&i);
                        }
                    }
                    drop((h, taken));
                    *lease.safe_until.lock().expect("lease lock") = sent + length - self.margin();
                    lease.renewed.notify_waiters();
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    warn!(error = %e, rows = held_keys.len(), retry_in_ms = delay.as_millis() as u64,
                          "renewing delivery leases failed; no request starts until it succeeds");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Gives up the leases of the deliveries a stop cut short; the batch's result, or
    /// `None` when any was cut short.
    async fn finish_stopped(
        &self,
        rows: &[&GateRow],
        keys: &[Uuid],
        outcomes: &mut [Option<Outcome>],
        stop: &CancellationToken,
    ) -> Option<Delivered> {
        let stopped: Vec<(Uuid, i32, Option<String>)> = outcomes
            .iter()
            .zip(keys)
            .filter_map(|(o, k)| match o {
                Some(Outcome::Stopped {
                    attempts,
                    last_error,
                }) => Some((*k, *attempts as i32, last_error.clone())),
                _ => None,
            })
            .collect();
        if !stopped.is_empty() {
            debug_assert!(stop.is_cancelled());
            match delivery::release(&self.pool, &self.owner, &stopped).await {
                Ok(n) => info!(
                    rows = n,
                    "stopping: leases of undelivered events given up; they are redelivered"
                ),
                Err(e) => warn!(error = %e, rows = stopped.len(),
                                "stopping: cannot give up the leases of undelivered events; they are taken over once the leases expire"),
            }
            return None;
        }
        Some(
            outcomes
                .iter_mut()
                .zip(rows)
                .map(|(o, row)| match o.take() {
                    Some(Outcome::Failed {
                        attempts,
                        rejected,
                        status,
                        error,
                    }) => Some(Rejection::HttpFailed {
                        rejected,
                        attempts,
                        status,
                        error,
                        scope: row.scope.clone(),
                        event_id: row.event_id.clone(),
                    }),
                    _ => None,
                })
                .collect(),
        )
    }
}

/// The final status write for an outcome, if it has one.
fn final_of(event_key: Uuid, o: &Outcome) -> Option<Final> {
    match o {
        Outcome::Processed {
            attempts,
            status,
            headers,
            body,
        } => Some(Final {
            event_key,
            processed: true,
            attempts: *attempts as i32,
            response_status: Some(i32::from(*status)),
            response_headers: Some(headers.clone()),
            response_body: Some(body.clone()),
            last_error: None,
        }),
        Outcome::Failed {
            attempts,
            status,
            error,
            ..
        } => Some(Final {
            event_key,
            processed: false,
            attempts: *attempts as i32,
            response_status: status.map(i32::from),
            response_headers: None,
            response_body: None,
            last_error: Some(match status {
                Some(s) => format!("HTTP {s}: {error}"),
                None => error.clone(),
            }),
        }),
        Outcome::Stopped { .. } | Outcome::Lost | Outcome::Elsewhere => None,
    }
}
