//! pglock's metrics (feature `metrics`), as an application's exporter sees them: recorded into
//! metrics-exporter-prometheus's recorder, installed for the test's thread (a current-thread
//! runtime runs every task of the test there, background releases and loss monitors
//! included), and read from its text exposition.
//!
//! The counters and histograms are the test's own. The gauges of locks held and waiting count
//! the whole process: their exact values are checked when each test has a process of its own
//! (nextest), and only their direction otherwise.

use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use pglock::{AdvisoryLock, AdvisoryLockGuard, Error, HealthCheck, LeaderElection};

use crate::cli::unique;
use crate::harness::TestDb;

/// The recorder a test records into, and its exposition.
struct Recorded {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
}

impl Recorded {
    fn new() -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets(pglock::metrics::SECONDS_BUCKETS)
            .unwrap()
            .build_recorder();
        let handle = recorder.handle();
        Recorded { recorder, handle }
    }

    /// The value of the sample `series` (`name{label="value",...}` as rendered), if present.
    fn value(&self, series: &str) -> Option<f64> {
        let text = self.handle.render();
        text.lines()
            .filter(|line| !line.starts_with('#'))
            .find_map(|line| {
                let (name, value) = line.rsplit_once(' ')?;
                (name == series).then(|| value.parse().unwrap())
            })
    }

    fn count(&self, series: &str) -> f64 {
        self.value(series).unwrap_or(0.0)
    }
}

/// Whether this process runs this one test only, so that process-wide gauges are the test's.
fn own_process() -> bool {
    std::env::var("NEXTEST_EXECUTION_MODE").as_deref() == Ok("process-per-test")
}

async fn gauge_becomes(recorded: &Recorded, series: &str, expected: f64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let value = recorded.count(series);
        if (own_process() && value == expected) || (!own_process() && value >= expected) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{series} is {value}, expected {expected}:\n{}",
            recorded.handle.render()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn acquisitions_by_outcome_with_their_waits() {
    let recorded = Recorded::new();
    let _local = metrics::set_default_local_recorder(&recorded.recorder);
    let db = TestDb::new("metrics_outcomes").await;
    let pool = db.pool(3);
    let key = db.key();
    let lock = AdvisoryLock::new(&pool, key);
    let other = AdvisoryLock::new(&pool, key);

    let guard = lock.lock().await.unwrap();
    assert!(other.try_lock().await.unwrap().is_none(), "busy");
    assert!(
        other
            .try_lock_for(Duration::from_millis(50))
            .await
            .unwrap()
            .is_none(),
        "timed out"
    );
    AdvisoryLockGuard::unlock(guard).await.unwrap();
    let shared = lock.lock_shared().await.unwrap();
    drop(shared);
    // A shared session refuses a transaction-scoped lock: a failed acquisition.
    let session = db.session().await;
    let on_session = AdvisoryLock::new(session.clone(), key).scope(pglock::LockScope::Transaction);
    assert!(matches!(
        on_session.try_lock().await,
        Err(Error::TransactionOnSharedSession { .. })
    ));

    let total = |mode: &str, outcome: &str| {
        recorded.count(&format!(
            "pglock_acquisitions_total{{mode=\"{mode}\",outcome=\"{outcome}\"}}"
        ))
    };
    assert_eq!(total("exclusive", "granted"), 1.0);
    assert_eq!(total("exclusive", "busy"), 1.0);
    assert_eq!(total("exclusive", "timed_out"), 1.0);
    assert_eq!(total("exclusive", "failed"), 1.0);
    assert_eq!(total("shared", "granted"), 1.0);
    let waits = |outcome: &str| {
        recorded.count(&format!(
            "pglock_lock_wait_seconds_count{{outcome=\"{outcome}\"}}"
        ))
    };
    assert_eq!(waits("granted"), 2.0);
    assert_eq!(waits("busy"), 1.0);
    assert_eq!(waits("failed"), 1.0);
    assert_eq!(waits("timed_out"), 1.0);
    // The timed-out acquisition waited its whole timeout.
    assert!(
        recorded.count("pglock_lock_wait_seconds_sum{outcome=\"timed_out\"}") >= 0.05,
        "{}",
        recorded.handle.render()
    );
    // Two guards ended: one unlocked, one dropped.
    assert_eq!(recorded.count("pglock_lock_hold_seconds_count"), 2.0);
    // The help text is there for the exposition (described at the first acquisition).
    pglock::metrics::describe();
    assert!(recorded
        .handle
        .render()
        .contains("# HELP pglock_acquisitions_total "));
    db.assert_no_locks().await;
}

#[tokio::test]
async fn locks_held_and_waiting() {
    let recorded = Recorded::new();
    let _local = metrics::set_default_local_recorder(&recorded.recorder);
    let db = TestDb::new("metrics_gauges").await;
    let pool = db.pool(3);
    let (first, second) = (db.key(), db.key());
    let a = AdvisoryLock::new(&pool, first).lock().await.unwrap();
    let b = AdvisoryLock::new(&pool, second).lock().await.unwrap();
    gauge_becomes(&recorded, "pglock_locks_held", 2.0).await;

    // A third acquisition waits behind `a` in the server's queue.
    let waiter = AdvisoryLock::new(&pool, first);
    let waiting = tokio::spawn(async move { waiter.lock().await.map(drop) });
    db.wait_for_waiters(first, 1, Duration::from_secs(5)).await;
    gauge_becomes(&recorded, "pglock_locks_waiting", 1.0).await;

    drop(a);
    waiting.await.unwrap().unwrap();
    gauge_becomes(&recorded, "pglock_locks_waiting", 0.0).await;
    AdvisoryLockGuard::unlock(b).await.unwrap();
    gauge_becomes(&recorded, "pglock_locks_held", 0.0).await;
    assert_eq!(recorded.count("pglock_lock_hold_seconds_count"), 3.0);
    db.assert_no_locks().await;
}

#[tokio::test]
async fn losses_by_reason() {
    let recorded = Recorded::new();
    let _local = metrics::set_default_local_recorder(&recorded.recorder);
    let db = TestDb::new("metrics_losses").await;
    let pool = db.pool(1);
    let guard = AdvisoryLock::new(&pool, db.key())
        .health_check(HealthCheck::default())
        .lock()
        .await
        .unwrap();
    let mut lost = AdvisoryLockGuard::loss_signal(&guard);
    db.terminate(AdvisoryLockGuard::backend_pid(&guard)).await;
    let bound = HealthCheck::default().detection_bound();
    tokio::time::timeout(bound * 2, lost.lost())
        .await
        .expect("the loss is reported within twice its detection bound");
    let losses = recorded.count("pglock_lock_losses_total{reason=\"connection_closed\"}")
        + recorded.count("pglock_lock_losses_total{reason=\"probe_failed\"}")
        + recorded.count("pglock_lock_losses_total{reason=\"probe_timed_out\"}");
    assert_eq!(losses, 1.0, "{}", recorded.handle.render());
    drop(guard);
    db.assert_no_locks().await;
}

#[tokio::test]
async fn leadership_and_term_per_name() {
    let recorded = Recorded::new();
    let _local = metrics::set_default_local_recorder(&recorded.recorder);
    let db = TestDb::new("metrics_leadership").await;
    let pool = db.pool(2);
    let name = unique("metrics-leader");
    let election = LeaderElection::new(&pool, name.as_str());
    let leading = format!("pglock_leader{{name=\"{name}\"}}");
    let term_of = format!("pglock_leader_term{{name=\"{name}\"}}");

    let leadership = election.campaign().await.unwrap();
    assert_eq!(recorded.value(&leading), Some(1.0));
    assert_eq!(recorded.value(&term_of), Some(leadership.term() as f64));
    let first_term = leadership.term();
    leadership.step_down().await.unwrap();
    assert_eq!(recorded.value(&leading), Some(0.0));

    let leadership = election.campaign().await.unwrap();
    assert_eq!(recorded.value(&leading), Some(1.0));
    assert!(recorded.value(&term_of).unwrap() > first_term as f64);
    drop(leadership);
    assert_eq!(recorded.value(&leading), Some(0.0));
    db.assert_no_locks().await;
}
