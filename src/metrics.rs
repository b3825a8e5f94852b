//! Metrics through the [`metrics`](https://docs.rs/metrics) facade (cargo feature `metrics`).
//!
//! pglock records into whatever recorder the application installs (for example
//! `metrics-exporter-prometheus`); with none, each record is a no-op of the facade. The names
//! and labels follow Prometheus' conventions:
//!
//! | metric | type | labels | what |
//! |---|---|---|---|
//! | `pglock_acquisitions_total` | counter | `mode` (`exclusive`, `shared`), `outcome` (`granted`, `busy`, `timed_out`, `failed`) | acquisitions that ended, by how |
//! | `pglock_lock_wait_seconds` | histogram | `outcome` | from the call to the grant or to giving up, waiting for a pooled connection included |
//! | `pglock_lock_hold_seconds` | histogram | | from the grant to the guard's release (unlock, commit, rollback, drop or leak) |
//! | `pglock_locks_held` | gauge | | guards alive in the process (a lost lock counts until its guard is released) |
//! | `pglock_locks_waiting` | gauge | | acquisitions under way (waiting for a connection, the server's answer or the lock) |
//! | `pglock_lock_losses_total` | counter | `reason` (`connection_closed`, `probe_failed`, `probe_timed_out`, `lock_missing`, `transaction_aborted`, `backend_changed`) | watched locks found lost |
//! | `pglock_leader` | gauge | `name` | 1 while this process leads the named leadership, else 0 |
//! | `pglock_leader_term` | gauge | `name` | the fencing term of this process's latest leadership of the name |
//!
//! A polling acquisition of a [`LockSet`](crate::LockSet) counts each of its attempts. Losses
//! are counted for locks whose loss is watched (`loss_signal`, `is_lost`, leader election), as
//! the `advisory lock lost` event.
//!
//! The exporter decides how a histogram is exposed: metrics-exporter-prometheus renders a
//! summary unless it is given buckets (`PrometheusBuilder::set_buckets_for_metric`); the
//! `pglock` command gives [`SECONDS_BUCKETS`] to the `_seconds` metrics.
//!
//! pglock describes its metrics (their help text and unit) to the recorder installed when the
//! first acquisition starts; call [`describe`] after installing a recorder later than that.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant};

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics::{SharedString, Unit};

use crate::{LockMode, LossReason};

const ACQUISITIONS: &str = "pglock_acquisitions_total";
const WAIT: &str = "pglock_lock_wait_seconds";
const HOLD: &str = "pglock_lock_hold_seconds";
const HELD: &str = "pglock_locks_held";
const WAITING: &str = "pglock_locks_waiting";
const LOSSES: &str = "pglock_lock_losses_total";
const LEADER: &str = "pglock_leader";
const TERM: &str = "pglock_leader_term";

/// Histogram buckets, in seconds, that suit both the wait for a lock (a round trip of a
/// millisecond or less when free, up to minutes behind a migration) and the time it is held.
pub const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 900.0, 3600.0,
];

/// Describes pglock's metrics (help text and unit) to the recorder installed now.
///
/// pglock does this by itself when its first acquisition starts; call it after installing a
/// recorder later than that, so that the exposition carries the help text.
pub fn describe() {
    describe_counter!(
        ACQUISITIONS,
        "Advisory lock acquisitions that ended, by mode and outcome (granted, busy, timed_out, failed)."
    );
    describe_histogram!(
        WAIT,
        Unit::Seconds,
        "Time from an acquisition's call to its grant or to giving up, by outcome."
    );
    describe_histogram!(
        HOLD,
        Unit::Seconds,
        "Time from an advisory lock's grant to the release of its guard."
    );
    describe_gauge!(
        HELD,
        "Advisory locks held through a guard of this process (a lost lock counts until its guard is released)."
    );
    describe_gauge!(
        WAITING,
        "Advisory lock acquisitions under way in this process."
    );
    describe_counter!(
        LOSSES,
        "Held advisory locks found lost (watched ones), by reason."
    );
    describe_gauge!(
        LEADER,
        "1 while this process leads the named leadership, else 0."
    );
    describe_gauge!(
        TERM,
        "The fencing term of this process's latest leadership of the name."
    );
}

/// Describes the metrics to the recorder installed when pglock first records one.
static DESCRIBED: Once = Once::new();

#[inline]
fn described() {
    DESCRIBED.call_once(describe);
}

/// How an acquisition ended, as the `outcome` label says it.
#[derive(Clone, Copy)]
pub(crate) enum Outcome {
    Granted,
    /// Busy on a single attempt (`try_lock`).
    Busy,
    /// Still busy at its deadline (`try_lock_for`, `try_lock_until`).
    TimedOut,
    Failed,
}

/// Records how an acquisition ended, and its wait.
pub(crate) fn acquired(mode: LockMode, outcome: Outcome, waited: Option<Duration>) {
    // Static label sets: the facade builds their keys at compile time, and nothing is
    // allocated per acquisition.
    macro_rules! count {
        ($mode:literal, $outcome:literal) => {{
            counter!(ACQUISITIONS, "mode" => $mode, "outcome" => $outcome).increment(1);
            if let Some(waited) = waited {
                histogram!(WAIT, "outcome" => $outcome).record(waited);
            }
        }};
    }
    match (mode, outcome) {
        (LockMode::Exclusive, Outcome::Granted) => count!("exclusive", "granted"),
        (LockMode::Exclusive, Outcome::Busy) => count!("exclusive", "busy"),
        (LockMode::Exclusive, Outcome::TimedOut) => count!("exclusive", "timed_out"),
        (LockMode::Exclusive, Outcome::Failed) => count!("exclusive", "failed"),
        (LockMode::Shared, Outcome::Granted) => count!("shared", "granted"),
        (LockMode::Shared, Outcome::Busy) => count!("shared", "busy"),
        (LockMode::Shared, Outcome::TimedOut) => count!("shared", "timed_out"),
        (LockMode::Shared, Outcome::Failed) => count!("shared", "failed"),
    }
}

/// Locks held and acquisitions under way in the process. The gauges are set to these counts
/// rather than moved up and down, so that a recorder installed while locks are held shows the
/// true figure from its next change on instead of an offset kept forever.
static HELD_COUNT: AtomicI64 = AtomicI64::new(0);
static WAITING_COUNT: AtomicI64 = AtomicI64::new(0);

/// Moves `count` by `by` and sets the gauge `name` to it. Two changes that race may set their
/// values in the other order; the one whose value is stale sees that the count moved on and
/// sets it again.
fn shift(count: &AtomicI64, by: i64, name: &'static str) {
    let now = count.fetch_add(by, Ordering::SeqCst) + by;
    let gauge = gauge!(name);
    gauge.set(now as f64);
    let later = count.load(Ordering::SeqCst);
    if later != now {
        gauge.set(later as f64);
    }
}

/// One acquisition under way: counted in `pglock_locks_waiting` from its start until it is
/// dropped, however it ends (a result, an error, or its future dropped).
pub(crate) struct Waiting {
    started: Instant,
}

impl Waiting {
    #[inline]
    pub(crate) fn start() -> Self {
        described();
        shift(&WAITING_COUNT, 1, WAITING);
        Waiting {
            started: Instant::now(),
        }
    }

    /// Since the acquisition started.
    pub(crate) fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        shift(&WAITING_COUNT, -1, WAITING);
    }
}

/// One lock held: counted in `pglock_locks_held` for the life of its guard, whose end records
/// the hold time.
pub(crate) struct Held {
    granted: Instant,
}

impl Held {
    #[inline]
    pub(crate) fn start() -> Self {
        shift(&HELD_COUNT, 1, HELD);
        Held {
            granted: Instant::now(),
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        histogram!(HOLD).record(self.granted.elapsed());
        shift(&HELD_COUNT, -1, HELD);
    }
}

/// A watched lock was found lost.
pub(crate) fn lock_lost(reason: &LossReason) {
    let reason = match reason {
        LossReason::ConnectionClosed { .. } => "connection_closed",
        LossReason::ProbeFailed { .. } => "probe_failed",
        LossReason::ProbeTimedOut { .. } => "probe_timed_out",
        LossReason::LockMissing => "lock_missing",
        LossReason::TransactionAborted => "transaction_aborted",
        LossReason::BackendChanged { .. } => "backend_changed",
        // Not a loss: never reported as one.
        LossReason::Released => return,
    };
    counter!(LOSSES, "reason" => reason).increment(1);
}

/// This process leads `name` in `term` (`Some`), or no longer leads it (`None`).
pub(crate) fn leadership(name: &str, term: Option<i64>) {
    let name = SharedString::from(name.to_owned());
    gauge!(LEADER, "name" => name.clone()).set(if term.is_some() { 1.0 } else { 0.0 });
    if let Some(term) = term {
        gauge!(TERM, "name" => name).set(term as f64);
    }
}
