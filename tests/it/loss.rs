//! Lock-loss detection under real faults: every fault is injected at least 20 times (set
//! `PGLOCK_LOSS_INJECTIONS` for more), on guards from a pool and from a `Session`, and each time
//! the loss signal must fire within the documented bound. Each fault test prints its latency
//! figures (p50 / p99 / max); see docs/reliability.md for the command and the table.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use pglock::{
    AdvisoryKey, AdvisoryLock, AdvisoryLockGuard, HealthCheck, LockScope, LossReason, LossSignal,
    Session,
};
use rand::Rng;
use tokio::time::Instant;
use tokio_postgres::{Client, Config, NoTls};

use crate::harness::{connect, database_url, TestDb};
use crate::support::{StopMode, TcpProxy, ThrowawayCluster};

/// The health check of these tests: a probe every 200 ms, each given 100 ms.
const HEALTH: HealthCheck =
    HealthCheck::new(Duration::from_millis(200), Duration::from_millis(100));

/// The health check of the tests whose fault leaves the connection answering (the lock alone is
/// gone): their premise is that a live connection answers a probe within its timeout, which
/// 100 ms does not ensure on a loaded machine (a starved client or backend, and the probe times
/// out: a false alarm, reported as `ProbeTimedOut`). One second does; the lock's loss is still
/// seen by the first probe after it, within `interval` plus the probe's round trip.
const PATIENT: HealthCheck = HealthCheck::new(Duration::from_millis(200), Duration::from_secs(1));

/// What the tests allow on top of `HEALTH.detection_bound()`: the time the Tokio runtime takes
/// to run the monitor and the waiting test task, on a shared 2-core machine running the suite
/// in parallel. The documented bound is "detection_bound() plus scheduling delay".
const SCHEDULING: Duration = Duration::from_millis(150);

/// Every test ends well before this (per 20 injections), or fails instead of hanging.
const TEST_LIMIT: Duration = Duration::from_secs(25);

/// Injections per fault and per kind of connection.
fn injections() -> usize {
    std::env::var("PGLOCK_LOSS_INJECTIONS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(20)
        .max(20)
}

/// Fails the test instead of hanging it.
async fn bounded<F: Future>(test: F) -> F::Output {
    let limit = TEST_LIMIT * (injections() / 20) as u32;
    tokio::time::timeout(limit, test)
        .await
        .expect("the test hung")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Source {
    /// A guard on a deadpool connection: loss is seen by the probe.
    Pool,
    /// A guard on a `Session::connect` session: pglock also sees the connection task end.
    Session,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Source::Pool => "pool",
            Source::Session => "session",
        })
    }
}

const SOURCES: [Source; 2] = [Source::Pool, Source::Session];

/// Where holders connect: the shared test server (possibly through a proxy) or a cluster.
#[derive(Clone)]
struct Endpoint {
    config: Config,
    url: String,
    health: HealthCheck,
}

impl Endpoint {
    /// The shared test database at `port` (a proxy's) or its own port, with `app` as the
    /// application name, so the leak check of the test sees these sessions.
    fn shared(app: &str, port: Option<u16>) -> Self {
        let base: Config = database_url().parse().expect("DATABASE_URL");
        let host = match base.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
            _ => "127.0.0.1".to_owned(),
        };
        let port = port.unwrap_or_else(|| base.get_ports().first().copied().unwrap_or(5432));
        let host = if port == base.get_ports().first().copied().unwrap_or(5432) {
            host
        } else {
            "127.0.0.1".to_owned() // proxies listen on the loopback
        };
        let mut url = format!(
            "host={host} port={port} user={} dbname={} application_name={app}",
            base.get_user().unwrap_or("postgres"),
            base.get_dbname().unwrap_or("test"),
        );
        if let Some(password) = base.get_password() {
            url.push_str(&format!(" password={}", String::from_utf8_lossy(password)));
        }
        Endpoint {
            config: url.parse().unwrap(),
            url,
            health: HEALTH,
        }
    }

    /// The same endpoint, with `health` on its holders' locks and sessions.
    fn with_health(mut self, health: HealthCheck) -> Self {
        self.health = health;
        self
    }

    fn cluster(cluster: &ThrowawayCluster, app: &str) -> Self {
        let url = format!("{}?application_name={app}", cluster.url());
        Endpoint {
            config: url.parse().unwrap(),
            url,
            health: HEALTH,
        }
    }

    fn pool(&self, size: usize) -> Pool {
        let manager = Manager::from_config(
            self.config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        Pool::builder(manager)
            .max_size(size)
            .wait_timeout(Some(Duration::from_secs(10)))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .unwrap()
    }

    async fn session(&self) -> Arc<Session> {
        Arc::new(
            Session::connect(&self.url)
                .await
                .expect("connect a session")
                .with_health_check(self.health),
        )
    }

    /// A held lock on a fresh connection of `source`, watched.
    async fn hold(&self, source: Source, key: AdvisoryKey) -> Holder {
        let lock = match source {
            Source::Pool => AdvisoryLock::new(self.pool(1), key),
            Source::Session => AdvisoryLock::new(self.session().await, key),
        };
        let guard = lock.health_check(self.health).lock().await.expect("lock");
        let signal = AdvisoryLockGuard::loss_signal(&guard);
        Holder {
            source,
            pid: AdvisoryLockGuard::backend_pid(&guard),
            guard,
            signal,
        }
    }
}

struct Holder {
    source: Source,
    pid: i32,
    guard: AdvisoryLockGuard,
    signal: LossSignal,
}

impl Holder {
    /// Waits for the loss signal; returns the latency from `since` and the reason.
    async fn loss_after(&mut self, since: Instant) -> (Duration, LossReason) {
        let limit = HEALTH.detection_bound() * 20 + Duration::from_secs(2);
        let reason = tokio::time::timeout(limit, self.signal.lost())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{} holder (backend {}): loss not reported within {limit:?}",
                    self.source, self.pid
                )
            });
        (since.elapsed(), reason)
    }
}

/// A pause that puts an injection at a random point of the probe cycle.
async fn stagger() {
    let ms = rand::thread_rng().gen_range(0..HEALTH.interval.as_millis() as u64);
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

/// Detection latencies of one fault, per kind of connection, under a health check.
struct Latencies {
    samples: HashMap<Source, Vec<Duration>>,
    health: HealthCheck,
}

impl Default for Latencies {
    fn default() -> Self {
        Latencies::under(HEALTH)
    }
}

impl Latencies {
    fn under(health: HealthCheck) -> Self {
        Latencies {
            samples: HashMap::new(),
            health,
        }
    }

    /// Records one detection and checks it against the bound and the expected reason.
    fn record(
        &mut self,
        fault: &str,
        source: Source,
        latency: Duration,
        reason: &LossReason,
        expected: fn(&LossReason) -> bool,
    ) {
        assert!(
            expected(reason),
            "{fault} on a {source} guard reported an unexpected reason: {reason:?}"
        );
        let bound = self.health.detection_bound() + SCHEDULING;
        assert!(
            latency <= bound,
            "{fault} on a {source} guard detected after {latency:?}, beyond the bound {bound:?} ({reason})"
        );
        self.samples.entry(source).or_default().push(latency);
    }

    /// Prints p50 / p99 / max per kind, and checks the number of injections.
    fn report(mut self, fault: &str) {
        for source in SOURCES {
            let Some(samples) = self.samples.get_mut(&source) else {
                continue;
            };
            samples.sort();
            let n = samples.len();
            assert!(n >= 20, "{fault}/{source}: only {n} injections");
            let pick = |q: f64| samples[((q * n as f64).ceil() as usize).clamp(1, n) - 1];
            eprintln!(
                "LOSS-LATENCY | {fault:<24} | {source:<7} | {n:>4} | {:>7.1} ms | {:>7.1} ms | {:>7.1} ms | {:?}",
                ms(pick(0.50)),
                ms(pick(0.99)),
                ms(samples[n - 1]),
                self.health.detection_bound(),
            );
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn closed(reason: &LossReason) -> bool {
    matches!(reason, LossReason::ConnectionClosed { .. })
}

/// A server that ends a session (a restart, `pg_terminate_backend`, `idle_session_timeout`)
/// closes its connection, but the backend stops answering before the close reaches the client:
/// it is exiting. (A reset path is dead at once, but a client that runs late may pass its
/// probe's deadline before it reads the RST.) A probe sent in between gets no answer, and when the exit takes longer than
/// the probe's timeout, as on a loaded machine, the probe reports the loss first. Either reason
/// is right for these faults; the tests that accept a timed-out probe also check that the
/// backend is indeed gone (`ended_by_the_server`).
fn closed_or_unanswered(reason: &LossReason) -> bool {
    closed(reason) || matches!(reason, LossReason::ProbeTimedOut { .. })
}

/// For a loss reported by a timed-out probe: the backend `pid` has exited (within 5 s), so the
/// probe went unanswered because the server ended the session, not because it was slow.
async fn ended_by_the_server(db: &TestDb, pid: i32, reason: &LossReason) {
    if matches!(reason, LossReason::ProbeTimedOut { .. }) {
        db.wait_backend_gone(pid).await;
    }
}

/// Runs `holders` one task each, concurrently, collecting `(source, latency, reason)`.
async fn concurrently<F, Fut>(holders: Vec<Holder>, each: F) -> Vec<(Source, Duration, LossReason)>
where
    F: Fn(Holder) -> Fut,
    Fut: Future<Output = (Source, Duration, LossReason)> + Send + 'static,
{
    let tasks: Vec<_> = holders.into_iter().map(|h| tokio::spawn(each(h))).collect();
    let mut results = Vec::with_capacity(tasks.len());
    for task in tasks {
        results.push(task.await.expect("holder task"));
    }
    results
}

/// Holders per round and kind, so a test stays within its connection budget.
const ROUND: usize = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loss_on_backend_terminated() {
    bounded(async {
        let db = Arc::new(TestDb::new("loss_terminate").await);
        let endpoint = Endpoint::shared(&db.app, None);
        let mut latencies = Latencies::default();
        for _ in 0..injections().div_ceil(ROUND) {
            let mut holders = Vec::new();
            for source in SOURCES {
                for _ in 0..ROUND {
                    holders.push(endpoint.hold(source, db.key()).await);
                }
            }
            let results = concurrently(holders, |mut holder| {
                let db = db.clone();
                async move {
                    stagger().await;
                    let t0 = Instant::now();
                    db.terminate(holder.pid).await;
                    let (latency, reason) = holder.loss_after(t0).await;
                    ended_by_the_server(&db, holder.pid, &reason).await;
                    (holder.source, latency, reason)
                }
            })
            .await;
            for (source, latency, reason) in results {
                latencies.record(
                    "backend terminated",
                    source,
                    latency,
                    &reason,
                    closed_or_unanswered,
                );
            }
        }
        latencies.report("backend terminated");
        db.assert_no_locks().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loss_on_unlock_all_inside_the_session() {
    bounded(async {
        let db = Arc::new(TestDb::new("loss_unlock_all").await);
        let endpoint = Endpoint::shared(&db.app, None).with_health(PATIENT);
        let mut latencies = Latencies::under(PATIENT);
        for _ in 0..injections().div_ceil(ROUND) {
            let mut holders = Vec::new();
            for source in SOURCES {
                for _ in 0..ROUND {
                    holders.push(endpoint.hold(source, db.key()).await);
                }
            }
            let results = concurrently(holders, |mut holder| async move {
                stagger().await;
                let t0 = Instant::now();
                holder
                    .guard
                    .execute("SELECT pg_advisory_unlock_all()", &[])
                    .await
                    .unwrap();
                let (latency, reason) = holder.loss_after(t0).await;
                assert!(!holder.guard.is_closed(), "the connection itself is fine");
                assert!(AdvisoryLockGuard::is_lost(&holder.guard));
                let unlocked = AdvisoryLockGuard::unlock(holder.guard).await;
                assert!(
                    matches!(unlocked, Err(pglock::Error::NotHeld { .. })),
                    "{unlocked:?}"
                );
                (holder.source, latency, reason)
            })
            .await;
            for (source, latency, reason) in results {
                latencies.record("pg_advisory_unlock_all", source, latency, &reason, |r| {
                    *r == LossReason::LockMissing
                });
            }
        }
        latencies.report("pg_advisory_unlock_all");
        db.assert_no_locks().await;
    })
    .await;
}

/// Remembers, for every backend of a test, the last time it was seen alive (the time the
/// query that saw it was sent), so that the moment the server ended a session is known to
/// within one poll.
struct BackendWatcher {
    last_seen: Arc<Mutex<HashMap<i32, Instant>>>,
    task: tokio::task::JoinHandle<()>,
}

impl BackendWatcher {
    async fn start(app: &str) -> Self {
        let client = connect(&database_url()).await;
        let app = app.to_owned();
        let last_seen = Arc::new(Mutex::new(HashMap::new()));
        let seen = last_seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let sent = Instant::now();
                let Ok(rows) = client
                    .query(
                        "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
                        &[&app],
                    )
                    .await
                else {
                    return;
                };
                {
                    let mut seen = seen.lock().unwrap();
                    for row in rows {
                        seen.insert(row.get::<_, i32>(0), sent);
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        BackendWatcher { last_seen, task }
    }

    fn last_seen(&self, pid: i32) -> Option<Instant> {
        self.last_seen.lock().unwrap().get(&pid).copied()
    }
}

impl Drop for BackendWatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loss_on_idle_session_timeout() {
    bounded(async {
        let db = Arc::new(TestDb::new("loss_idle_timeout").await);
        let endpoint = Endpoint::shared(&db.app, None);
        let watcher = Arc::new(BackendWatcher::start(&db.app).await);
        // Shorter than the probe interval, so the session goes idle long enough between probes.
        let timeout = Duration::from_millis(60);
        let mut latencies = Latencies::default();
        for _ in 0..injections().div_ceil(ROUND) {
            let mut holders = Vec::new();
            for source in SOURCES {
                for _ in 0..ROUND {
                    holders.push(endpoint.hold(source, db.key()).await);
                }
            }
            let results = concurrently(holders, |mut holder| {
                let watcher = watcher.clone();
                let db = db.clone();
                async move {
                    stagger().await;
                    let sent = Instant::now();
                    holder
                        .guard
                        .batch_execute(&format!(
                            "SET idle_session_timeout = '{}ms'",
                            timeout.as_millis()
                        ))
                        .await
                        .unwrap();
                    // The server ends the session no earlier than `timeout` after the SET (later
                    // if a probe came in between), and no earlier than it was last seen alive.
                    let (_, reason) = holder.loss_after(sent).await;
                    let detected = Instant::now();
                    let ended_no_earlier_than = match watcher.last_seen(holder.pid) {
                        Some(seen) => seen.max(sent + timeout),
                        None => sent + timeout,
                    };
                    let latency = detected.saturating_duration_since(ended_no_earlier_than);
                    ended_by_the_server(&db, holder.pid, &reason).await;
                    (holder.source, latency, reason)
                }
            })
            .await;
            for (source, latency, reason) in results {
                latencies.record(
                    "idle_session_timeout",
                    source,
                    latency,
                    &reason,
                    closed_or_unanswered,
                );
            }
        }
        latencies.report("idle_session_timeout");
        db.assert_no_locks().await;
    })
    .await;
}

/// Holders that each reach the shared server through a proxy of their own.
async fn proxied_holders(db: &TestDb, per_source: usize) -> Vec<(Holder, TcpProxy)> {
    let target = {
        let base: Config = database_url().parse().unwrap();
        let port = base.get_ports().first().copied().unwrap_or(5432);
        std::net::SocketAddr::from(([127, 0, 0, 1], port))
    };
    let mut holders = Vec::new();
    for source in SOURCES {
        for _ in 0..per_source {
            let proxy = TcpProxy::start(target).await;
            let endpoint = Endpoint::shared(&db.app, Some(proxy.port()));
            holders.push((endpoint.hold(source, db.key()).await, proxy));
        }
    }
    holders
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loss_on_connection_reset() {
    bounded(async {
        let db = TestDb::new("loss_reset").await;
        let mut latencies = Latencies::default();
        for _ in 0..injections().div_ceil(ROUND) {
            let holders = proxied_holders(&db, ROUND).await;
            let tasks: Vec<_> = holders
                .into_iter()
                .map(|(mut holder, proxy)| {
                    tokio::spawn(async move {
                        stagger().await;
                        let t0 = Instant::now();
                        proxy.reset_all().await;
                        let (latency, reason) = holder.loss_after(t0).await;
                        // The path is dead, so a probe on it goes unanswered: when the client
                        // runs late (a loaded machine), its probe's deadline can pass before
                        // it reads the RST. Then the connection must still turn out closed.
                        if matches!(reason, LossReason::ProbeTimedOut { .. }) {
                            tokio::time::timeout(Duration::from_secs(5), async {
                                while !holder.guard.is_closed() {
                                    tokio::time::sleep(Duration::from_millis(5)).await;
                                }
                            })
                            .await
                            .expect("the reset connection closes");
                        }
                        (holder.source, latency, reason)
                    })
                })
                .collect();
            for task in tasks {
                let (source, latency, reason) = task.await.unwrap();
                latencies.record(
                    "connection reset",
                    source,
                    latency,
                    &reason,
                    closed_or_unanswered,
                );
            }
        }
        latencies.report("connection reset");
        db.assert_no_locks().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loss_on_blackhole_partition() {
    bounded(async {
        let db = Arc::new(TestDb::new("loss_blackhole").await);
        let mut latencies = Latencies::default();
        for _ in 0..injections().div_ceil(ROUND) {
            let holders = proxied_holders(&db, ROUND).await;
            let tasks: Vec<_> = holders
                .into_iter()
                .enumerate()
                .map(|(i, (mut holder, proxy))| {
                    let db = db.clone();
                    tokio::spawn(async move {
                        stagger().await;
                        let t0 = Instant::now();
                        proxy.blackhole();
                        let (latency, reason) = holder.loss_after(t0).await;
                        // The server still holds the lock behind the partition: the holder
                        // stopped before anyone else could take it.
                        let key = AdvisoryLockGuard::key(&holder.guard);
                        assert_eq!(db.holders(key).await, vec![holder.pid]);
                        // Then the partition heals (the queued unlock goes through) or the
                        // path closes (the server ends the session).
                        drop(holder.guard);
                        if i % 2 == 0 {
                            proxy.heal();
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        drop(proxy);
                        (holder.source, latency, reason)
                    })
                })
                .collect();
            for task in tasks {
                let (source, latency, reason) = task.await.unwrap();
                latencies.record("blackhole partition", source, latency, &reason, |r| {
                    matches!(r, LossReason::ProbeTimedOut { .. })
                });
            }
        }
        latencies.report("blackhole partition");
        db.assert_no_locks().await;
    })
    .await;
}

async fn show(client: &Client, name: &str) -> String {
    client
        .query_one(&format!("SHOW {name}"), &[])
        .await
        .unwrap()
        .get(0)
}

/// The advisory locks on a cluster, for the leak check of cluster tests.
async fn assert_no_locks_on(admin: &Client) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let n: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if n == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "{n} advisory locks leaked");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loss_on_server_restart() {
    bounded(async {
        let cluster = ThrowawayCluster::start().await;
        let endpoint = Endpoint::cluster(&cluster, "loss_restart");
        // Two holders of each kind per restart; fast and immediate restarts alternate.
        let per_restart = 2;
        let mut latencies = Latencies::default();
        for round in 0..injections().div_ceil(per_restart) {
            let mut holders = Vec::new();
            for source in SOURCES {
                for _ in 0..per_restart {
                    let key = AdvisoryKey::Single(rand::thread_rng().gen());
                    holders.push(endpoint.hold(source, key).await);
                }
            }
            let mode = if round % 2 == 0 {
                StopMode::Fast
            } else {
                StopMode::Immediate
            };
            stagger().await;
            let t0 = Instant::now();
            let waits: Vec<_> = holders
                .into_iter()
                .map(|mut holder| {
                    tokio::spawn(async move {
                        let (latency, reason) = holder.loss_after(t0).await;
                        (holder.source, latency, reason)
                    })
                })
                .collect();
            cluster.restart(mode).await;
            for wait in waits {
                let (source, latency, reason) = wait.await.unwrap();
                latencies.record(
                    "server restart",
                    source,
                    latency,
                    &reason,
                    closed_or_unanswered,
                );
            }
        }
        latencies.report("server restart");
        let admin = connect(&cluster.url()).await;
        assert_no_locks_on(&admin).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_do_not_disturb_the_lock() {
    bounded(async {
        let db = TestDb::new("loss_probe_harmless").await;
        let fast = HealthCheck::new(Duration::from_millis(2), Duration::from_millis(500));
        let pool = db.pool(2);
        let key = db.key();
        let guard = AdvisoryLock::new(&pool, key)
            .health_check(fast)
            .lock()
            .await
            .unwrap();
        let signal = AdvisoryLockGuard::loss_signal(&guard);
        tokio::time::sleep(Duration::from_millis(400)).await; // ~200 probes
        assert!(!signal.is_lost(), "{:?}", signal.reason());
        assert!(!AdvisoryLockGuard::is_lost(&guard));
        assert_eq!(
            db.holders(key).await,
            vec![AdvisoryLockGuard::backend_pid(&guard)]
        );
        // One unlock frees it: the probes took no count of their own.
        AdvisoryLockGuard::unlock(guard).await.unwrap();
        assert!(db.holders(key).await.is_empty());
        assert_eq!(signal.reason(), Some(LossReason::Released));

        // Transaction scope: the probe runs inside the guard's transaction, harmlessly.
        let lock = AdvisoryLock::new(&pool, key)
            .scope(LockScope::Transaction)
            .health_check(fast);
        let guard = lock.lock().await.unwrap();
        let signal = AdvisoryLockGuard::loss_signal(&guard);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!signal.is_lost(), "{:?}", signal.reason());
        let n: i32 = guard.query_one("SELECT 41 + 1", &[]).await.unwrap().get(0);
        assert_eq!(n, 42, "the transaction is intact");
        assert_eq!(db.holders(key).await.len(), 1);
        AdvisoryLockGuard::commit(guard).await.unwrap();
        assert!(db.holders(key).await.is_empty());
        db.assert_no_locks().await;
    })
    .await;
}

/// A failed statement in the transaction of a transaction-scoped lock makes PostgreSQL release
/// the lock at once (the transaction stays open, aborted): that is a loss. A session lock on a
/// connection whose transaction failed stays held: no loss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loss_on_failed_transaction_of_a_transaction_lock() {
    bounded(async {
        let db = TestDb::new("loss_xact_failed").await;
        let pool = db.pool(2);
        let xact_key = db.key();
        // The connections stay alive: a patient probe timeout, so that a probe answered late on
        // a loaded machine is not reported instead of the aborted transaction.
        let guard = AdvisoryLock::new(&pool, xact_key)
            .scope(LockScope::Transaction)
            .health_check(PATIENT)
            .lock()
            .await
            .unwrap();
        let session = db.session().await;
        let session_key = db.key();
        let session_guard = AdvisoryLock::new(session.clone(), session_key)
            .lock()
            .await
            .unwrap();
        let mut signal = AdvisoryLockGuard::loss_signal(&guard);
        let session_signal = AdvisoryLockGuard::loss_signal(&session_guard);
        tokio::time::sleep(PATIENT.interval).await;

        let t0 = Instant::now();
        assert!(guard.batch_execute("SELECT 1/0").await.is_err());
        // The backend sends the error before it aborts the transaction, which releases the
        // lock: on a loaded machine another connection may look in between.
        let released_by = Instant::now() + PATIENT.detection_bound();
        while !db.holders(xact_key).await.is_empty() {
            assert!(Instant::now() < released_by, "released at the error");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(signal.lost().await, LossReason::TransactionAborted);
        assert!(t0.elapsed() <= PATIENT.detection_bound() + SCHEDULING);
        AdvisoryLockGuard::rollback(guard).await.unwrap();

        session.batch_execute("BEGIN").await.unwrap();
        assert!(session.batch_execute("SELECT 1/0").await.is_err());
        tokio::time::sleep(PATIENT.detection_bound() * 2).await;
        assert!(!session_signal.is_lost(), "{:?}", session_signal.reason());
        assert_eq!(db.holders(session_key).await.len(), 1);
        session.batch_execute("ROLLBACK").await.unwrap();
        AdvisoryLockGuard::unlock(session_guard).await.unwrap();
        db.assert_no_locks().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_probe_per_connection_however_many_locks() {
    bounded(async {
        let cluster = ThrowawayCluster::builder()
            .setting("log_statement", "all")
            .start()
            .await;
        // The connection stays alive throughout: a patient probe timeout, so that a slow answer
        // on a loaded machine is not taken for a loss of every lock.
        let endpoint = Endpoint::cluster(&cluster, "loss_one_probe").with_health(PATIENT);
        let session = endpoint.session().await;
        let keys: Vec<AdvisoryKey> = (0..2_000).map(AdvisoryKey::Single).collect();
        let mut guards = Vec::new();
        for (i, &key) in keys.iter().enumerate() {
            let lock = AdvisoryLock::new(session.clone(), key);
            let guard = if i % 2 == 0 {
                lock.lock().await
            } else {
                lock.lock_shared().await
            };
            guards.push(guard.unwrap());
        }
        let logged_before = cluster.log().len();
        let started = Instant::now();
        let signals: Vec<LossSignal> = guards.iter().map(AdvisoryLockGuard::loss_signal).collect();
        // Long enough for two probes whatever the load: the first starts at once and answers
        // within its probe timeout (or its locks would be lost), the next starts no later than
        // that answer.
        tokio::time::sleep(PATIENT.probe_timeout + PATIENT.interval * 2).await;
        let elapsed = started.elapsed();
        assert!(signals.iter().all(|s| !s.is_lost()));
        let log = cluster.log();
        let log = &log[logged_before..];
        // Full probes check every watched lock; they run for locks no full probe has seen yet
        // (watching starts with the loss signals, all at once: one probe, or a few if locks
        // are registered while it runs). Cheap probes ask only for the backend's pid, one per
        // interval afterwards. Either way per connection, not per lock.
        let full = log.matches("pg_lock_status()").count();
        let cheap = log
            .lines()
            .filter(|line| line.ends_with(": SELECT pg_backend_pid()"))
            .count();
        let intervals = (elapsed.as_millis() / PATIENT.interval.as_millis()) as usize;
        assert!(
            full >= 1 && full <= intervals + 2 && cheap <= intervals + 1 && full + cheap >= 2,
            "{full} full and {cheap} cheap probes in {elapsed:?} for {} locks on one session",
            keys.len()
        );

        // A lock lost among many is told apart from the others.
        let (victim, _) = keys.split_first().unwrap();
        session
            .execute(
                "SELECT pg_advisory_unlock($1)",
                &[&match victim {
                    AdvisoryKey::Single(k) => *k,
                    _ => unreachable!(),
                }],
            )
            .await
            .unwrap();
        let mut first = signals[0].clone();
        let t0 = Instant::now();
        assert_eq!(first.lost().await, LossReason::LockMissing);
        assert!(t0.elapsed() <= PATIENT.detection_bound() + SCHEDULING);
        tokio::time::sleep(PATIENT.interval * 2).await;
        assert!(signals[1..].iter().all(|s| !s.is_lost()));

        drop(guards);
        assert!(signals[1..]
            .iter()
            .all(|s| s.reason() == Some(LossReason::Released)));
        let admin = connect(&cluster.url()).await;
        assert_no_locks_on(&admin).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitor_tasks_end_with_their_guards() {
    bounded(async {
        let db = TestDb::new("loss_no_task_leak").await;
        let pool = db.pool(2);
        let session = db.session().await;
        // Warm the pool so its connection tasks exist before counting.
        drop(AdvisoryLock::new(&pool, db.key()).lock().await.unwrap());
        tokio::time::sleep(Duration::from_millis(100)).await;
        let metrics = tokio::runtime::Handle::current().metrics();
        let baseline = metrics.num_alive_tasks();

        let pooled = AdvisoryLock::new(&pool, db.key())
            .health_check(HEALTH)
            .lock()
            .await
            .unwrap();
        let on_session = AdvisoryLock::new(session.clone(), db.key())
            .lock()
            .await
            .unwrap();
        let mut signals = vec![
            AdvisoryLockGuard::loss_signal(&pooled),
            AdvisoryLockGuard::loss_signal(&on_session),
        ];
        assert!(!AdvisoryLockGuard::is_lost(&pooled));
        assert_eq!(
            metrics.num_alive_tasks(),
            baseline + 2,
            "one monitor per connection"
        );

        drop(pooled);
        AdvisoryLockGuard::unlock(on_session).await.unwrap();
        for signal in &mut signals {
            assert_eq!(signal.lost().await, LossReason::Released);
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while metrics.num_alive_tasks() > baseline {
            assert!(
                Instant::now() < deadline,
                "{} tasks alive, {baseline} before the guards",
                metrics.num_alive_tasks()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The monitor of a session starts again for the next watched guard.
        let again = AdvisoryLock::new(session.clone(), db.key())
            .lock()
            .await
            .unwrap();
        let mut signal = AdvisoryLockGuard::loss_signal(&again);
        db.terminate(AdvisoryLockGuard::backend_pid(&again)).await;
        assert!(matches!(
            signal.lost().await,
            LossReason::ConnectionClosed { .. }
        ));
        drop(again);
        drop(session);
        db.assert_no_locks().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalives_are_set_on_both_ends() {
    bounded(async {
        let db = TestDb::new("loss_keepalives").await;
        let (idle, count, user_timeout) = ("5", "10", "10000");
        // A session pglock opens gets them at connect.
        let session = db.session().await;
        assert_eq!(show(session.client(), "tcp_keepalives_idle").await, idle);
        assert_eq!(show(session.client(), "tcp_keepalives_count").await, count);
        assert_eq!(
            show(session.client(), "tcp_user_timeout").await,
            user_timeout
        );

        // A pooled connection gets them when its monitor starts (with the first probe).
        let pool = db.pool(1);
        let slow = HealthCheck::new(Duration::from_secs(5), Duration::from_secs(3));
        let guard = AdvisoryLock::new(&pool, db.key())
            .health_check(slow)
            .lock()
            .await
            .unwrap();
        assert_eq!(show(&guard, "tcp_user_timeout").await, "0");
        assert!(!AdvisoryLockGuard::is_lost(&guard));
        let deadline = Instant::now() + Duration::from_secs(2);
        while show(&guard, "tcp_user_timeout").await != "24000" {
            assert!(Instant::now() < deadline, "server keepalives not applied");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(show(&guard, "tcp_keepalives_idle").await, "12");
        assert_eq!(show(&guard, "tcp_keepalives_interval").await, "2");
        drop(guard);
        drop(session);
        db.assert_no_locks().await;
    })
    .await;
}
