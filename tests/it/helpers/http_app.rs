//! A real HTTP application for the HTTP sink's tests: it records every request and applies
//! each `Idempotency-Key` once, as a correct application does (a repeat is answered 200
//! and not applied again; a key already being processed is answered 409). It can be told
//! to answer chosen event ids with a status (400, 429 with Retry-After, 500, ...), to
//! hang, to be slow, or to go down (its port refuses connections) and come back.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use tokio_util::sync::CancellationToken;

/// One request as the application received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub key: String,
    pub event_id: String,
    pub source: String,
    pub content_type: String,
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
    pub at: Instant,
}

/// How the application answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Applies the event (201; 200 for a key already applied), unless its id was told to
    /// fail ([`HttpApp::fail_id`]).
    Ok,
    /// Never answers.
    Hang,
}

#[derive(Default)]
struct Inner {
    received: Vec<Received>,
    /// Keys applied, in the order they were applied.
    applied: Vec<String>,
    applied_set: HashSet<String>,
    /// Keys with a request being processed now.
    processing: HashSet<String>,
    /// Keys that arrived while a request with the same key was being processed.
    concurrent: Vec<String>,
    in_flight: usize,
    max_in_flight: usize,
    /// Event ids answered with a status (not applied) while listed, for `n` more times
    /// (u32::MAX: for ever), with a `Retry-After` (seconds) when set.
    fail_ids: HashMap<String, (u16, u32, Option<u64>)>,
}

#[derive(Clone)]
pub struct HttpApp {
    inner: Arc<Mutex<Inner>>,
    mode: Arc<Mutex<Mode>>,
    /// Time each request takes before its answer.
    latency: Arc<Mutex<Duration>>,
    pub addr: SocketAddr,
    server: Arc<Mutex<Option<Serving>>>,
}

/// The server task while it listens, and how to stop it.
type Serving = (CancellationToken, tokio::task::JoinHandle<()>);

impl HttpApp {
    /// Listens on a free port of 127.0.0.1.
    pub async fn start() -> HttpApp {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = HttpApp {
            inner: Default::default(),
            mode: Arc::new(Mutex::new(Mode::Ok)),
            latency: Arc::new(Mutex::new(Duration::ZERO)),
            addr,
            server: Default::default(),
        };
        app.serve(listener);
        app
    }

    pub fn url(&self) -> String {
        format!("http://{}/events", self.addr)
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        let stop = CancellationToken::new();
        let router = Router::new()
            .route("/events", post(handle))
            .with_state(self.clone());
        let s = stop.clone();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(async move { s.cancelled().await })
                .await;
        });
        *self.server.lock().unwrap() = Some((stop, task));
    }

    /// Stops listening: new connections are refused (requests in progress are cut).
    pub async fn go_down(&self) {
        let server = self.server.lock().unwrap().take();
        if let Some((stop, task)) = server {
            stop.cancel();
            task.abort();
            let _ = task.await;
        }
    }

    /// Listens again on the same port.
    pub async fn come_back(&self) {
        let listener = loop {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        self.serve(listener);
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    pub fn set_latency(&self, latency: Duration) {
        *self.latency.lock().unwrap() = latency;
    }

    /// Answers requests for `event_id` with `status` (not applied), `times` times
    /// (u32::MAX: until [`HttpApp::accept_all`]), with `Retry-After: <secs>` when given.
    pub fn fail_id(&self, event_id: &str, status: u16, times: u32, retry_after: Option<u64>) {
        self.inner
            .lock()
            .unwrap()
            .fail_ids
            .insert(event_id.to_string(), (status, times, retry_after));
    }

    /// Forgets every [`HttpApp::fail_id`].
    pub fn accept_all(&self) {
        self.inner.lock().unwrap().fail_ids.clear();
    }

    pub fn received(&self) -> Vec<Received> {
        self.inner.lock().unwrap().received.clone()
    }

    /// Keys applied, in order.
    pub fn applied(&self) -> Vec<String> {
        self.inner.lock().unwrap().applied.clone()
    }

    pub fn applied_count(&self) -> usize {
        self.inner.lock().unwrap().applied.len()
    }

    /// Keys that arrived while the same key was being processed.
    pub fn concurrent(&self) -> Vec<String> {
        self.inner.lock().unwrap().concurrent.clone()
    }

    pub fn max_in_flight(&self) -> usize {
        self.inner.lock().unwrap().max_in_flight
    }

    /// Keys received more than once.
    pub fn repeated_keys(&self) -> HashSet<String> {
        let mut seen = HashSet::new();
        let mut repeated = HashSet::new();
        for r in self.inner.lock().unwrap().received.iter() {
            if !seen.insert(r.key.clone()) {
                repeated.insert(r.key.clone());
            }
        }
        repeated
    }
}

async fn handle(State(app): State<HttpApp>, headers: HeaderMap, body: Bytes) -> Response {
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let received = Received {
        key: text("idempotency-key"),
        event_id: text("kdedup-event-id"),
        source: text("kdedup-source"),
        content_type: text("content-type"),
        headers: headers
            .iter()
            .filter_map(|(n, v)| Some((n.as_str().to_string(), v.to_str().ok()?.to_string())))
            .collect(),
        body: body.to_vec(),
        at: Instant::now(),
    };
    let key = received.key.clone();
    let event_id = received.event_id.clone();
    let busy = {
        let mut inner = app.inner.lock().unwrap();
        inner.received.push(received);
        inner.in_flight += 1;
        inner.max_in_flight = inner.max_in_flight.max(inner.in_flight);
        let busy = !inner.processing.insert(key.clone());
        if busy {
            inner.concurrent.push(key.clone());
        }
        busy
    };
    // Counted down however this request ends (an answer, or the server going down).
    struct Done(HttpApp, String, bool);
    impl Drop for Done {
        fn drop(&mut self) {
            let mut inner = self.0.inner.lock().unwrap();
            inner.in_flight -= 1;
            if !self.2 {
                inner.processing.remove(&self.1);
            }
        }
    }
    let _done = Done(app.clone(), key.clone(), busy);
    if busy {
        return (StatusCode::CONFLICT, "this key is being processed").into_response();
    }
    let latency = *app.latency.lock().unwrap();
    let mode = app.mode.lock().unwrap().clone();
    match mode {
        Mode::Hang => {
            std::future::pending::<()>().await;
            unreachable!()
        }
        Mode::Ok => {}
    }
    {
        let mut inner = app.inner.lock().unwrap();
        if let Some((status, times, retry_after)) = inner.fail_ids.get_mut(&event_id) {
            let (status, retry_after) = (*status, *retry_after);
            if *times != u32::MAX {
                *times -= 1;
            }
            if *times == 0 {
                inner.fail_ids.remove(&event_id);
            }
            let mut resp = (
                StatusCode::from_u16(status).unwrap(),
                format!("event {event_id} refused with {status}"),
            )
                .into_response();
            if let Some(secs) = retry_after {
                resp.headers_mut()
                    .insert("retry-after", secs.to_string().parse().unwrap());
            }
            return resp;
        }
    }
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let mut inner = app.inner.lock().unwrap();
    if inner.applied_set.insert(key.clone()) {
        inner.applied.push(key);
        (
            StatusCode::CREATED,
            [("x-app", "applied")],
            format!("{{\"applied\":\"{event_id}\"}}"),
        )
            .into_response()
    } else {
        (StatusCode::OK, [("x-app", "repeat")], "already applied").into_response()
    }
}
