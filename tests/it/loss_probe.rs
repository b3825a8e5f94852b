//! Which probe the loss monitor sends, and that each lock's own bound holds on a shared monitor.
//!
//! The monitor checks the server's lock table (`pg_lock_status()`, the full probe) only for
//! locks it has not checked yet, after the client was handed to the caller, and every
//! `HealthCheck::full_check_interval`; otherwise it sends `SELECT pg_backend_pid()`. These tests
//! watch the probes on the server (`pg_stat_activity`) and inject the losses each probe must
//! see. Timing allowances are a quarter of the bound checked, for a loaded 2-core machine.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use pglock::{AdvisoryKey, AdvisoryLock, AdvisoryLockGuard, HealthCheck, LossReason};
use rand::Rng;
use tokio::time::Instant;
use tokio_postgres::Client;

use crate::harness::TestDb;

const CHEAP_PROBE: &str = "SELECT pg_backend_pid()";

fn is_full(query: &str) -> bool {
    query.contains("pg_lock_status()")
}

fn is_probe(query: &str) -> bool {
    query == CHEAP_PROBE || is_full(query)
}

/// What the bound allows on top: a quarter of it, for scheduling on a loaded machine.
fn allowance(bound: Duration) -> Duration {
    bound / 4
}

/// The statements the backend `pid` finished during `window`, in order (one per distinct
/// `query_start`, seen idle: `pg_stat_activity` every 2 ms). Only pglock's probes are kept.
async fn probes_of(db: &TestDb, pid: i32, window: Duration) -> Vec<String> {
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    let end = Instant::now() + window;
    let mut first = None;
    while Instant::now() < end {
        let row = db
            .admin()
            .query_one(
                "SELECT query, query_start::text, state FROM pg_stat_activity WHERE pid = $1",
                &[&pid],
            )
            .await
            .unwrap();
        let (query, start, state): (String, Option<String>, Option<String>) =
            (row.get(0), row.get(1), row.get(2));
        if let (Some(start), Some("idle")) = (start, state.as_deref()) {
            // The statement that had finished before the window started does not count.
            if first.get_or_insert_with(|| start.clone()) != &start {
                seen.insert(start, query);
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    seen.into_values().filter(|q| is_probe(q)).collect()
}

#[derive(Clone, Copy, Debug)]
enum Source {
    Pool,
    Session,
}

async fn hold(
    db: &TestDb,
    source: Source,
    key: AdvisoryKey,
    health: HealthCheck,
) -> AdvisoryLockGuard {
    let lock = match source {
        Source::Pool => AdvisoryLock::new(db.pool(1), key),
        Source::Session => AdvisoryLock::new(db.session().await, key),
    };
    lock.health_check(health).lock().await.expect("lock")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_watched_connection_gets_the_cheap_probe() {
    let db = TestDb::new("probe_cheap_when_idle").await;
    let health = HealthCheck::new(Duration::from_millis(100), Duration::from_millis(500));
    for source in [Source::Pool, Source::Session] {
        let guard = hold(&db, source, db.key(), health).await;
        let pid = AdvisoryLockGuard::backend_pid(&guard);
        let signal = AdvisoryLockGuard::loss_signal(&guard);
        // The first probe, at once, is the full one: the lock is new to the monitor.
        let first = probes_of(&db, pid, Duration::from_millis(50)).await;
        assert!(first.iter().all(|q| is_full(q)), "{source:?}: {first:?}");
        tokio::time::sleep(Duration::from_millis(150)).await;
        let idle = probes_of(&db, pid, Duration::from_millis(1000)).await;
        assert!(idle.len() >= 5, "{source:?}: too few probes seen: {idle:?}");
        assert!(
            idle.iter().all(|q| q == CHEAP_PROBE),
            "{source:?}: an idle connection got a full probe: {idle:?}"
        );
        // Handing the client out makes the next probes check the lock table again, for one
        // interval; then they are cheap again.
        let (around, ()) = tokio::join!(probes_of(&db, pid, Duration::from_millis(1200)), async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            guard.execute("SELECT 1", &[]).await.unwrap();
        });
        let full = around.iter().filter(|q| is_full(q)).count();
        assert!(
            (1..=3).contains(&full)
                && around.first().map(String::as_str) == Some(CHEAP_PROBE)
                && around.last().map(String::as_str) == Some(CHEAP_PROBE),
            "{source:?}: around the hand-over: {around:?}"
        );
        assert!(!signal.is_lost());
        AdvisoryLockGuard::unlock(guard).await.unwrap();
    }
    db.assert_no_locks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lock_table_is_checked_every_full_check_interval() {
    let db = TestDb::new("probe_full_cadence").await;
    let health = HealthCheck::new(Duration::from_millis(100), Duration::from_millis(500))
        .with_full_check_interval(Duration::from_millis(500));
    let guard = hold(&db, Source::Pool, db.key(), health).await;
    let pid = AdvisoryLockGuard::backend_pid(&guard);
    let _signal = AdvisoryLockGuard::loss_signal(&guard);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let probes = probes_of(&db, pid, Duration::from_millis(2600)).await;
    let full = probes.iter().filter(|q| is_full(q)).count();
    // One full probe per 500 ms (every fifth or sixth probe): 4 to 6 in 2.6 s, one fewer if
    // the sampling misses one on a loaded machine.
    assert!(
        (3..=6).contains(&full) && probes.len() - full >= 10,
        "{full} full probes of {}: {probes:?}",
        probes.len()
    );
    AdvisoryLockGuard::unlock(guard).await.unwrap();
    db.assert_no_locks().await;
}

/// A lock released by a statement sent through a `&Client` kept longer than an interval is
/// reported within `full_check_bound()`; 20 injections per kind of connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unlock_through_a_kept_client_is_seen_within_the_full_check_bound() {
    let db = Arc::new(TestDb::new("probe_kept_client").await);
    // The connections stay alive: a probe timeout is a false alarm, which 100 ms does not rule
    // out for twenty guards on a loaded 2-core machine; 500 ms does.
    let health = HealthCheck::new(Duration::from_millis(100), Duration::from_millis(500))
        .with_full_check_interval(Duration::from_millis(400));
    let bound = health.full_check_bound();
    assert_eq!(bound, Duration::from_millis(400) + health.detection_bound());
    let mut latencies = Vec::new();
    for _ in 0..2 {
        let mut tasks = Vec::new();
        for source in [Source::Pool, Source::Session] {
            for _ in 0..10 {
                let guard = hold(&db, source, db.key(), health).await;
                tasks.push(tokio::spawn(async move {
                    let signal = AdvisoryLockGuard::loss_signal(&guard);
                    let client: &Client = &guard;
                    // Past the hand-over's window: only the fallback full probe can see it.
                    let pause = rand::thread_rng().gen_range(250..650);
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                    let t0 = Instant::now();
                    client
                        .execute("SELECT pg_advisory_unlock_all()", &[])
                        .await
                        .unwrap();
                    let mut signal = signal;
                    let reason = tokio::time::timeout(bound * 10, signal.lost())
                        .await
                        .expect("loss reported");
                    let latency = t0.elapsed();
                    assert_eq!(reason, LossReason::LockMissing, "{source:?}");
                    let _ = AdvisoryLockGuard::unlock(guard).await;
                    (source, latency)
                }));
            }
        }
        for task in tasks {
            latencies.push(task.await.unwrap());
        }
    }
    let worst = latencies.iter().map(|(_, l)| *l).max().unwrap();
    eprintln!(
        "PROBE-KEPT-CLIENT | n {} | worst {worst:?} | bound {bound:?}",
        latencies.len()
    );
    for (source, latency) in &latencies {
        assert!(
            *latency <= bound + allowance(bound),
            "{source:?}: detected after {latency:?}, bound {bound:?}"
        );
    }
    db.assert_no_locks().await;
}

/// Issue 21: a pooled connection handed off from a guard of a default-health clone keeps its
/// monitor; the next guard, with a faster health check, must still get its own bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guards_bound_holds_after_a_handoff_from_a_default_clone() {
    let db = TestDb::new("probe_handoff_health").await;
    let pool = db.pool(1);
    let fast_health = HealthCheck::new(Duration::from_millis(300), Duration::from_millis(300));
    let bound = fast_health.detection_bound();
    let lock = AdvisoryLock::new(&pool, db.key());
    let fast = lock.clone().health_check(fast_health);
    let mut latencies = Vec::new();
    for _ in 0..12 {
        let slow = lock.lock().await.unwrap();
        let slow_pid = AdvisoryLockGuard::backend_pid(&slow);
        // Starts the connection's monitor with the default health check (1 s).
        assert!(!AdvisoryLockGuard::is_lost(&slow));
        drop(slow);
        let guard = fast.lock().await.unwrap();
        let pid = AdvisoryLockGuard::backend_pid(&guard);
        assert_eq!(pid, slow_pid, "a pool of one: the handed-off connection");
        let mut signal = AdvisoryLockGuard::loss_signal(&guard);
        let pause = rand::thread_rng().gen_range(0..fast_health.interval.as_millis() as u64);
        tokio::time::sleep(Duration::from_millis(200 + pause)).await;
        let t0 = Instant::now();
        db.terminate(pid).await;
        let reason = tokio::time::timeout(bound * 10, signal.lost())
            .await
            .expect("loss reported");
        let latency = t0.elapsed();
        assert!(
            matches!(
                reason,
                LossReason::ConnectionClosed { .. } | LossReason::ProbeTimedOut { .. }
            ),
            "{reason:?}"
        );
        latencies.push(latency);
        drop(guard);
        db.wait_backend_gone(pid).await;
    }
    eprintln!("PROBE-HANDOFF | {latencies:?} | bound {bound:?}");
    for latency in &latencies {
        assert!(
            *latency <= bound + allowance(bound),
            "detected after {latency:?}, bound {bound:?}: {latencies:?}"
        );
    }
    db.assert_no_locks().await;
}

/// A session's monitor probes as often as its most demanding watched lock asks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tightest_health_check_on_a_session_sets_its_probes() {
    let db = TestDb::new("probe_tightest").await;
    let session = db.session().await;
    // Watched first, with the default health check (probes 1 s apart).
    let steady = AdvisoryLock::new(&session, db.key()).lock().await.unwrap();
    let steady_signal = AdvisoryLockGuard::loss_signal(&steady);
    let fast_health = HealthCheck::new(Duration::from_millis(300), Duration::from_millis(300));
    let bound = fast_health.detection_bound();
    let mut latencies = Vec::new();
    for _ in 0..12 {
        let key = db.key();
        let AdvisoryKey::Single(k) = key else {
            unreachable!()
        };
        let guard = AdvisoryLock::new(&session, key)
            .health_check(fast_health)
            .lock()
            .await
            .unwrap();
        let mut signal = AdvisoryLockGuard::loss_signal(&guard);
        let pause = rand::thread_rng().gen_range(0..fast_health.interval.as_millis() as u64);
        tokio::time::sleep(Duration::from_millis(200 + pause)).await;
        let t0 = Instant::now();
        // Through the session, as a user would: the lock is gone behind pglock's back.
        let released: bool = session
            .query_one("SELECT pg_advisory_unlock($1)", &[&k])
            .await
            .unwrap()
            .get(0);
        assert!(released);
        let reason = tokio::time::timeout(bound * 10, signal.lost())
            .await
            .expect("loss reported");
        latencies.push(t0.elapsed());
        assert_eq!(reason, LossReason::LockMissing);
        let _ = AdvisoryLockGuard::unlock(guard).await;
    }
    eprintln!("PROBE-TIGHTEST | {latencies:?} | bound {bound:?}");
    for latency in &latencies {
        assert!(
            *latency <= bound + allowance(bound),
            "detected after {latency:?}, bound {bound:?}: {latencies:?}"
        );
    }
    assert!(!steady_signal.is_lost(), "{:?}", steady_signal.reason());
    AdvisoryLockGuard::unlock(steady).await.unwrap();
    db.assert_no_locks().await;
}

/// `COMMIT` sent through a transaction-scoped lock's guard ends the lock's transaction: the
/// full probe that the hand-over brings reports the lock missing, within `detection_bound()`;
/// 20 injections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_through_a_transaction_locks_guard_is_seen_within_the_bound() {
    let db = Arc::new(TestDb::new("probe_commit_through_guard").await);
    // The connections stay alive: probes get a second, so that one answered late on a loaded
    // machine is not reported instead of the missing lock.
    let health = HealthCheck::new(Duration::from_millis(100), Duration::from_secs(1));
    let bound = health.detection_bound();
    let pool = db.pool(10);
    let mut latencies = Vec::new();
    for _ in 0..2 {
        let mut tasks = Vec::new();
        for _ in 0..10 {
            let guard = AdvisoryLock::new(&pool, db.key())
                .scope(pglock::LockScope::Transaction)
                .health_check(health)
                .lock()
                .await
                .expect("lock");
            tasks.push(tokio::spawn(async move {
                let mut signal = AdvisoryLockGuard::loss_signal(&guard);
                // Past the first probe: the connection is on cheap probes when the COMMIT goes.
                let pause = rand::thread_rng().gen_range(150..250);
                tokio::time::sleep(Duration::from_millis(pause)).await;
                let t0 = Instant::now();
                guard.batch_execute("COMMIT").await.unwrap();
                let reason = tokio::time::timeout(bound * 10, signal.lost())
                    .await
                    .expect("loss reported");
                let latency = t0.elapsed();
                assert_eq!(reason, LossReason::LockMissing);
                let _ = AdvisoryLockGuard::rollback(guard).await;
                latency
            }));
        }
        for task in tasks {
            latencies.push(task.await.unwrap());
        }
    }
    let worst = latencies.iter().max().unwrap();
    eprintln!(
        "PROBE-COMMIT | n {} | worst {worst:?} | bound {bound:?}",
        latencies.len()
    );
    for latency in &latencies {
        assert!(
            *latency <= bound + allowance(bound),
            "detected after {latency:?}, bound {bound:?}"
        );
    }
    db.assert_no_locks().await;
}

/// Two locks on one session behind a dead network path: each reports `ProbeTimedOut` after its
/// own `probe_timeout`, not the other's; 10 partitions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_lock_times_out_after_its_own_probe_timeout() {
    let db = TestDb::new("probe_own_timeout").await;
    let base: tokio_postgres::Config = crate::harness::database_url().parse().unwrap();
    let port = base.get_ports().first().copied().unwrap_or(5432);
    let quick = HealthCheck::new(Duration::from_millis(100), Duration::from_millis(100));
    let patient = HealthCheck::new(Duration::from_millis(100), Duration::from_millis(600));
    for _ in 0..10 {
        let proxy =
            crate::support::TcpProxy::start(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
                .await;
        let mut url = format!(
            "host=127.0.0.1 port={} user={} dbname={} application_name={}",
            proxy.port(),
            base.get_user().unwrap_or("postgres"),
            base.get_dbname().unwrap_or("test"),
            db.app,
        );
        if let Some(password) = base.get_password() {
            url.push_str(&format!(" password={}", String::from_utf8_lossy(password)));
        }
        let session = Arc::new(pglock::Session::connect(&url).await.unwrap());
        let lock = |health| AdvisoryLock::new(&session, db.key()).health_check(health);
        let (a, b) = (
            lock(quick).lock().await.unwrap(),
            lock(patient).lock().await.unwrap(),
        );
        let (mut quick_signal, mut patient_signal) = (
            AdvisoryLockGuard::loss_signal(&a),
            AdvisoryLockGuard::loss_signal(&b),
        );
        let pause = rand::thread_rng().gen_range(150..250);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let t0 = Instant::now();
        proxy.blackhole();
        let limit = Duration::from_secs(5);
        let quick_reason = tokio::time::timeout(limit, quick_signal.lost())
            .await
            .unwrap();
        let quick_latency = t0.elapsed();
        let patient_reason = tokio::time::timeout(limit, patient_signal.lost())
            .await
            .unwrap();
        let patient_latency = t0.elapsed();
        assert_eq!(
            (quick_reason, patient_reason),
            (
                LossReason::ProbeTimedOut {
                    after: quick.probe_timeout
                },
                LossReason::ProbeTimedOut {
                    after: patient.probe_timeout
                }
            )
        );
        let (quick_bound, patient_bound) = (quick.detection_bound(), patient.detection_bound());
        assert!(
            quick_latency <= quick_bound + allowance(quick_bound),
            "quick: {quick_latency:?}"
        );
        // The probe that went unanswered was sent at the earliest one interval before the cut.
        assert!(
            patient_latency >= patient.probe_timeout - patient.interval
                && patient_latency <= patient_bound + allowance(patient_bound),
            "patient: {patient_latency:?}"
        );
        drop((a, b));
        drop(proxy);
        drop(session);
    }
    db.assert_no_locks().await;
}
