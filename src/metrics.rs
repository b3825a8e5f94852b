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

use std::cell::{OnceCell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant};

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter,
    Gauge, Histogram, SharedString, Unit,
};

use crate::loss::signal::LossReason;
use crate::scope::LockMode;

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
        "pglock_acquisitions_total",
        "Advisory lock acquisitions that ended, by mode and outcome (granted, busy, timed_out, failed)."
    );
    describe_histogram!(
        "pglock_lock_wait_seconds",
        Unit::Seconds,
        "Time from an acquisition's call to its grant or to giving up, by outcome."
    );
    describe_histogram!(
        "pglock_lock_hold_seconds",
        Unit::Seconds,
        "Time from an advisory lock's grant to the release of its guard."
    );
    describe_gauge!(
        "pglock_locks_held",
        "Advisory locks held through a guard of this process (a lost lock counts until its guard is released)."
    );
    describe_gauge!(
        "pglock_locks_waiting",
        "Advisory lock acquisitions under way in this process."
    );
    describe_counter!(
        "pglock_lock_losses_total",
        "Held advisory locks found lost (watched ones), by reason."
    );
    describe_gauge!(
        "pglock_leader",
        "1 while this process leads the named leadership, else 0."
    );
    describe_gauge!(
        "pglock_leader_term",
        "The fencing term of this process's latest leadership of the name."
    );
}

/// Describes the metrics to the recorder installed when pglock first records one.
static DESCRIBED: Once = Once::new();

#[inline]
fn described() {
    DESCRIBED.call_once(describe);
}

/// How an acquisition ended, as the `outcome` label says it (in the order of the handles).
#[derive(Clone, Copy)]
pub(crate) enum Outcome {
    Granted = 0,
    /// Busy on a single attempt (`try_lock`).
    Busy,
    /// Still busy at its deadline (`try_lock_for`, `try_lock_until`).
    TimedOut,
    Failed,
}

/// Records how an acquisition ended, and its wait.
pub(crate) fn acquired(mode: LockMode, outcome: Outcome, waited: Duration) {
    let mode_index = match mode {
        LockMode::Exclusive => 0,
        LockMode::Shared => 1,
    };
    let outcome_index = outcome as usize;
    with_handles(|handles| {
        handles
            .acquisitions(mode_index * OUTCOMES + outcome_index)
            .increment(1);
        handles.wait(outcome_index).record(waited);
    });
}

/// Locks held and acquisitions under way in the process. The gauges are set to these counts
/// rather than moved up and down, so that a recorder installed while locks are held shows the
/// true figure from its next change on instead of an offset kept forever.
static HELD_COUNT: AtomicI64 = AtomicI64::new(0);
static WAITING_COUNT: AtomicI64 = AtomicI64::new(0);

/// Moves `count` by `by` and sets `gauge` to it. Two changes that race may set their values
/// in the other order; the one whose value is stale sees that the count moved on and sets it
/// again.
fn shift(count: &AtomicI64, by: i64, gauge: &Gauge) {
    let now = count.fetch_add(by, Ordering::SeqCst) + by;
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
        with_handles(|handles| shift(&WAITING_COUNT, 1, handles.waiting()));
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
        with_handles(|handles| shift(&WAITING_COUNT, -1, handles.waiting()));
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
        with_handles(|handles| shift(&HELD_COUNT, 1, handles.held()));
        Held {
            granted: Instant::now(),
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let held = self.granted.elapsed();
        with_handles(|handles| {
            handles.hold().record(held);
            shift(&HELD_COUNT, -1, handles.held());
        });
    }
}

/// The outcomes, in the order of [`Outcome`]'s variants, as the `outcome` label says them.
const OUTCOMES: usize = 4;

/// The handles of the metrics recorded at every acquisition, registered with one recorder.
///
/// Registering a metric looks it up in the recorder's registry (hashing its key, taking a
/// lock, allocating on first use), which costs several times what recording into its handle
/// does; so each thread keeps the handles of the recorder it last recorded into, and
/// registers them again only when that recorder changes. A handle is registered when first
/// used.
struct Handles {
    recorder: RecorderId,
    acquisitions: [OnceCell<Counter>; 2 * OUTCOMES],
    waits: [OnceCell<Histogram>; OUTCOMES],
    hold: OnceCell<Histogram>,
    held: OnceCell<Gauge>,
    waiting: OnceCell<Gauge>,
}

/// Which recorder: where it is, and its size and alignment. Two recorders alive at once have
/// different addresses unless they have no data (as the no-op recorder); such recorders of
/// different types at one address, which record nowhere of their own, are not told apart.
/// A recorder made where a dropped one was, on a thread that recorded nothing in between
/// (a test's local recorders, one after the other), is taken for that one.
#[derive(Clone, Copy, PartialEq, Eq)]
struct RecorderId {
    address: usize,
    size: usize,
    align: usize,
}

thread_local! {
    static HANDLES: RefCell<Option<Rc<Handles>>> = const { RefCell::new(None) };
}

/// Runs `record` with the handles of the recorder in use on this thread (a local one, else
/// the global one, else the facade's no-op recorder).
fn with_handles(record: impl FnOnce(&Handles)) {
    let recorder = metrics::with_recorder(|recorder| RecorderId {
        address: std::ptr::from_ref(recorder).cast::<()>() as usize,
        size: std::mem::size_of_val(recorder),
        align: std::mem::align_of_val(recorder),
    });
    let handles = HANDLES.with(|cached| {
        let mut cached = cached.borrow_mut();
        match &*cached {
            Some(handles) if handles.recorder == recorder => handles.clone(),
            _ => cached.insert(Rc::new(Handles::new(recorder))).clone(),
        }
    });
    record(&handles);
}

impl Handles {
    fn new(recorder: RecorderId) -> Self {
        Handles {
            recorder,
            acquisitions: Default::default(),
            waits: Default::default(),
            hold: OnceCell::new(),
            held: OnceCell::new(),
            waiting: OnceCell::new(),
        }
    }

    /// `pglock_acquisitions_total` for a mode and outcome: `mode * OUTCOMES + outcome`.
    fn acquisitions(&self, index: usize) -> &Counter {
        // Literal names and labels: the facade builds their keys at compile time.
        self.acquisitions[index].get_or_init(|| match index {
            0 => counter!("pglock_acquisitions_total", "mode" => "exclusive", "outcome" => "granted"),
            1 => counter!("pglock_acquisitions_total", "mode" => "exclusive", "outcome" => "busy"),
            2 => counter!("pglock_acquisitions_total", "mode" => "exclusive", "outcome" => "timed_out"),
            3 => counter!("pglock_acquisitions_total", "mode" => "exclusive", "outcome" => "failed"),
            4 => counter!("pglock_acquisitions_total", "mode" => "shared", "outcome" => "granted"),
            5 => counter!("pglock_acquisitions_total", "mode" => "shared", "outcome" => "busy"),
            6 => counter!("pglock_acquisitions_total", "mode" => "shared", "outcome" => "timed_out"),
            _ => counter!("pglock_acquisitions_total", "mode" => "shared", "outcome" => "failed"),
        })
    }

    /// `pglock_lock_wait_seconds` for an outcome.
    fn wait(&self, outcome: usize) -> &Histogram {
        self.waits[outcome].get_or_init(|| match outcome {
            0 => histogram!("pglock_lock_wait_seconds", "outcome" => "granted"),
            1 => histogram!("pglock_lock_wait_seconds", "outcome" => "busy"),
            2 => histogram!("pglock_lock_wait_seconds", "outcome" => "timed_out"),
            _ => histogram!("pglock_lock_wait_seconds", "outcome" => "failed"),
        })
    }

    fn hold(&self) -> &Histogram {
        self.hold
            .get_or_init(|| histogram!("pglock_lock_hold_seconds"))
    }

    fn held(&self) -> &Gauge {
        self.held.get_or_init(|| gauge!("pglock_locks_held"))
    }

    fn waiting(&self) -> &Gauge {
        self.waiting.get_or_init(|| gauge!("pglock_locks_waiting"))
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
    counter!("pglock_lock_losses_total", "reason" => reason).increment(1);
}

/// This process leads `name` in `term` (`Some`), or no longer leads it (`None`).
pub(crate) fn leadership(name: &str, term: Option<i64>) {
    let name = SharedString::from(name.to_owned());
    gauge!("pglock_leader", "name" => name.clone()).set(if term.is_some() { 1.0 } else { 0.0 });
    if let Some(term) = term {
        gauge!("pglock_leader_term", "name" => name).set(term as f64);
    }
}
