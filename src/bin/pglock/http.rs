//! `--http ADDR`: health, leadership and metrics for orchestrators and dashboards.
//!
//! `run` and `leader` publish where they are ([`Phase`]) through a [`State`]; with `--http`, a
//! task serves it with hyper, for as long as pglock runs:
//!
//! - `GET /healthz`: 200 while pglock's database session is healthy (waiting, holding, standing
//!   by, leading), 503 before the first contact and once the session is lost;
//! - `GET /leader` (`pglock leader` only): 200 while this instance leads, else 503;
//! - `GET /metrics`: the library's metrics, in Prometheus' text format, from the recorder of
//!   metrics-exporter-prometheus installed here.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use crate::format::rfc3339;
use crate::output::{Output, Scrubber};

/// A client has this long to send its request's head (a slow or idle client does not keep a
/// connection forever).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections served at once; more wait to be accepted. Probes and scrapes are few.
const MAX_CONNECTIONS: usize = 32;

/// How often the recorder's histograms are drained when nobody scrapes them.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Which command serves: `/leader` exists for `pglock leader` only.
#[derive(Clone, Debug)]
pub enum Role {
    Run,
    Leader { name: String },
}

/// Where pglock is, as the endpoints report it.
#[derive(Clone, Debug)]
pub enum Phase {
    /// Not in contact with the database yet.
    Connecting,
    /// `run`: connected; the lock is busy and pglock waits for it.
    Waiting,
    /// `run`: the lock is held.
    Holding { since: SystemTime, backend_pid: i32 },
    /// `leader`: connected; another instance leads (`led_by`, as seen at `seen`, when known).
    StandingBy {
        led_by: Option<String>,
        seen: SystemTime,
    },
    /// `leader`: this instance leads.
    Leading {
        term: i64,
        since: SystemTime,
        backend_pid: i32,
    },
    /// The session was lost (the lock or leadership with it), or a campaign failed; until the
    /// next contact with the database.
    Lost { reason: String, at: SystemTime },
}

impl Phase {
    fn healthy(&self) -> bool {
        !matches!(self, Phase::Connecting | Phase::Lost { .. })
    }
}

/// Publishes the [`Phase`] for the endpoints (a no-op without `--http`, as nobody listens).
pub struct State {
    phase: watch::Sender<Phase>,
    /// Reasons come from errors, which may quote a connection string: scrubbed like stderr.
    scrubber: Scrubber,
}

impl State {
    pub fn waiting(&self) {
        self.phase.send_replace(Phase::Waiting);
    }

    pub fn holding(&self, backend_pid: i32) {
        self.phase.send_replace(Phase::Holding {
            since: SystemTime::now(),
            backend_pid,
        });
    }

    pub fn standing_by(&self, led_by: Option<String>) {
        self.phase.send_replace(Phase::StandingBy {
            led_by: led_by.map(|text| self.scrubber.scrub(text)),
            seen: SystemTime::now(),
        });
    }

    pub fn leading(&self, term: i64, backend_pid: i32) {
        self.phase.send_replace(Phase::Leading {
            term,
            since: SystemTime::now(),
            backend_pid,
        });
    }

    pub fn lost(&self, reason: &str) {
        self.phase.send_replace(Phase::Lost {
            reason: self.scrubber.scrub(reason.to_owned()),
            at: SystemTime::now(),
        });
    }
}

/// The state `run` or `leader` publishes, served on `addr` if given: binds the address,
/// installs the Prometheus recorder, and spawns the server on the current runtime.
///
/// # Errors
///
/// The exit code after saying why, if the address cannot be bound or a recorder is already
/// installed.
pub async fn start(addr: Option<SocketAddr>, role: Role, out: &Output) -> Result<State, i32> {
    let (phase, phases) = watch::channel(Phase::Connecting);
    let state = State {
        phase,
        scrubber: out.scrubber(),
    };
    let Some(addr) = addr else {
        return Ok(state);
    };
    let listener = TcpListener::bind(addr).await.map_err(|error| {
        out.error(format_args!("cannot serve --http on {addr}: {error}"));
        crate::exit::SOFTWARE
    })?;
    let metrics = install_recorder().map_err(|error| {
        out.error(format_args!("cannot record metrics: {error}"));
        crate::exit::SOFTWARE
    })?;
    let bound = listener.local_addr().unwrap_or(addr);
    let endpoints = match role {
        Role::Run => "/healthz, /metrics",
        Role::Leader { .. } => "/healthz, /leader, /metrics",
    };
    out.info(format_args!("serving {endpoints} on http://{bound}"));
    let served = Arc::new(Served {
        role,
        phases,
        metrics,
    });
    tokio::spawn(serve(listener, served));
    Ok(state)
}

/// The Prometheus recorder, global, with histogram buckets for pglock's `_seconds` metrics,
/// and its upkeep.
fn install_recorder() -> Result<PrometheusHandle, Box<dyn std::error::Error>> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Suffix("_seconds".to_owned()),
            pglock::metrics::SECONDS_BUCKETS,
        )?
        .install_recorder()?;
    pglock::metrics::describe();
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(UPKEEP_EVERY);
        loop {
            every.tick().await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

/// What the server answers from.
struct Served {
    role: Role,
    phases: watch::Receiver<Phase>,
    metrics: PrometheusHandle,
}

async fn serve(listener: TcpListener, served: Arc<Served>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        // A failed accept (out of file descriptors, a connection reset before it was taken)
        // concerns that connection only.
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let served = served.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let served = served.clone();
                async move { Ok::<_, Infallible>(served.answer(&request)) }
            });
            // A connection that fails (a client gone, a malformed request) ends alone.
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            drop(slot);
        });
    }
}

impl Served {
    fn answer(&self, request: &Request<Incoming>) -> Response<Full<Bytes>> {
        let path = request.uri().path();
        let known = matches!(
            (path, &self.role),
            ("/healthz" | "/metrics", _) | ("/leader", Role::Leader { .. })
        );
        if !known {
            return respond(
                StatusCode::NOT_FOUND,
                "text/plain; charset=utf-8",
                not_found(&self.role),
            );
        }
        if request.method() != Method::GET && request.method() != Method::HEAD {
            let mut response = respond(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain; charset=utf-8",
                "only GET and HEAD\n".to_owned(),
            );
            response
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
            return response;
        }
        // hyper sends no body in answer to HEAD, and keeps the length GET would have.
        match path {
            "/metrics" => respond(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                self.metrics.render(),
            ),
            "/leader" => self.leader(),
            _ => self.health(),
        }
    }

    /// `/healthz`: the session's health, with the phase it is in.
    fn health(&self) -> Response<Full<Bytes>> {
        let phase = self.phases.borrow().clone();
        let mut body = json!({
            "healthy": phase.healthy(),
            "state": phase_name(&phase),
        });
        match &phase {
            Phase::Lost { reason, at } => {
                body["reason"] = json!(reason);
                body["since"] = json!(rfc3339(*at, false));
            }
            Phase::Holding { since, backend_pid }
            | Phase::Leading {
                since, backend_pid, ..
            } => {
                body["since"] = json!(rfc3339(*since, false));
                body["backend_pid"] = json!(backend_pid);
            }
            _ => {}
        }
        let status = match phase.healthy() {
            true => StatusCode::OK,
            false => StatusCode::SERVICE_UNAVAILABLE,
        };
        respond_json(status, &body)
    }

    /// `/leader`: 200 while leading, 503 otherwise, with who leads as far as this instance
    /// knows.
    fn leader(&self) -> Response<Full<Bytes>> {
        let Role::Leader { name } = &self.role else {
            unreachable!("/leader is served for `pglock leader` only");
        };
        let phase = self.phases.borrow().clone();
        let body = match &phase {
            Phase::Leading {
                term,
                since,
                backend_pid,
            } => json!({
                "name": name,
                "leader": true,
                "term": term,
                "since": rfc3339(*since, false),
                "backend_pid": backend_pid,
            }),
            Phase::StandingBy { led_by, seen } => json!({
                "name": name,
                "leader": false,
                "state": phase_name(&phase),
                "led_by": led_by,
                "led_by_seen_at": led_by.as_ref().map(|_| rfc3339(*seen, false)),
            }),
            _ => json!({
                "name": name,
                "leader": false,
                "state": phase_name(&phase),
                "led_by": Value::Null,
            }),
        };
        let status = match phase {
            Phase::Leading { .. } => StatusCode::OK,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        };
        respond_json(status, &body)
    }
}

fn phase_name(phase: &Phase) -> &'static str {
    match phase {
        Phase::Connecting => "connecting",
        Phase::Waiting => "waiting",
        Phase::Holding { .. } => "holding",
        Phase::StandingBy { .. } => "standing_by",
        Phase::Leading { .. } => "leading",
        Phase::Lost { .. } => "lost",
    }
}

fn not_found(role: &Role) -> String {
    match role {
        Role::Run => "not found; pglock run serves /healthz and /metrics\n".to_owned(),
        Role::Leader { .. } => {
            "not found; pglock leader serves /healthz, /leader and /metrics\n".to_owned()
        }
    }
}

fn respond_json(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    respond(status, "application/json", format!("{body}\n"))
}

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    // A probe or a scrape must see the present, never a cached answer.
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// `--http`'s value: `HOST:PORT` with an IP address (`0.0.0.0:9090`, `[::]:9090`,
/// `127.0.0.1:9090`), `localhost:PORT`, or `:PORT` for every IPv4 interface.
pub fn parse_addr(text: &str) -> Result<SocketAddr, String> {
    let expanded = match text.strip_prefix(':') {
        Some(port) => format!("0.0.0.0:{port}"),
        None => match text.strip_prefix("localhost:") {
            Some(port) => format!("127.0.0.1:{port}"),
            None => text.to_owned(),
        },
    };
    expanded.parse().map_err(|_| {
        format!("expected IP:PORT, [IPv6]:PORT, localhost:PORT or :PORT (e.g. 0.0.0.0:9090), not {text:?}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(parse_addr(":9090").unwrap().to_string(), "0.0.0.0:9090");
        assert_eq!(
            parse_addr("localhost:80").unwrap().to_string(),
            "127.0.0.1:80"
        );
        assert_eq!(parse_addr("[::]:9090").unwrap().to_string(), "[::]:9090");
        assert!(parse_addr("9090").is_err());
        assert!(parse_addr("example.com:80").is_err());
    }
}
