//! The loss monitor of a connection: the locks it watches, and the task that probes for them.
//!
//! One [`Monitor`] exists per connection (per pooled connection a guard holds, per
//! [`Session`](crate::Session)). It starts with the first guard that asks for a
//! [`LossSignal`], sends one probe per [`HealthCheck::interval`] however many locks it
//! watches, and ends when it watches none. See `docs/design.md`, "Loss detection", for the
//! bound and the safety argument.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use crate::base::health::HealthCheck;
use crate::base::key::AdvisoryKey;
use crate::base::loss::{LossReason, LossSignal};
use crate::base::scope::{LockMode, LockScope};
use crate::conn::handle::{Conn, WeakConn};
use crate::loss::probe::{classify, probe, Batch, Verdict};

/// The loss monitor of one connection: the locks it watches and whether its task runs.
pub(crate) struct Monitor {
    state: Mutex<State>,
    /// Wakes the task when it has nothing left to watch.
    idle: Notify,
    /// Wakes the task waiting for its next probe: a lock was added, probe now.
    added: Notify,
    /// The end of the connection task, when pglock runs it.
    closed: Option<watch::Receiver<Option<String>>>,
}

struct State {
    watched: HashMap<u64, Watched>,
    next_id: u64,
    /// Whether a task runs for this monitor, and which one (its generation).
    running: bool,
    generation: u64,
}

struct Watched {
    key: AdvisoryKey,
    mode: LockMode,
    scope: LockScope,
    backend_pid: i32,
    /// The health check of this lock (sanitized): the monitor probes as often as the most
    /// demanding lock it watches asks.
    health: HealthCheck,
    reason: watch::Sender<Option<LossReason>>,
}

impl Monitor {
    fn new(closed: Option<watch::Receiver<Option<String>>>) -> Self {
        Monitor {
            state: Mutex::new(State {
                watched: HashMap::new(),
                next_id: 0,
                running: false,
                generation: 0,
            }),
            idle: Notify::new(),
            added: Notify::new(),
            closed,
        }
    }

    /// Sets `reason` on the lock `id` (first reason wins) and stops watching it.
    fn lose(&self, id: u64, reason: LossReason) {
        let watched = self.state.lock().unwrap().watched.remove(&id);
        if let Some(watched) = watched {
            crate::base::trace::lock_lost(watched.key, watched.backend_pid, &reason);
            set_once(&watched.reason, reason);
        }
    }

    /// Connection-level loss: every watched lock is lost, and the task ends.
    fn lose_all(&self, reason: LossReason) {
        let mut state = self.state.lock().unwrap();
        for (_, watched) in state.watched.drain() {
            crate::base::trace::lock_lost(watched.key, watched.backend_pid, &reason);
            set_once(&watched.reason, reason.clone());
        }
        state.running = false;
    }

    /// The caller's transaction on the connection failed: that released the transaction-scoped
    /// locks of `batch`; session locks stay held.
    fn lose_transaction_locks(&self, batch: &Batch) {
        for (i, &id) in batch.ids.iter().enumerate() {
            if batch.scopes[i] == LockScope::Transaction {
                self.lose(id, LossReason::TransactionAborted);
            }
        }
    }

    /// What the next probe checks, or `None` (and the task ends) when nothing is watched.
    fn batch(&self) -> Option<Batch> {
        let mut state = self.state.lock().unwrap();
        if state.watched.is_empty() {
            state.running = false;
            return None;
        }
        let n = state.watched.len();
        let mut batch = Batch {
            ids: Vec::with_capacity(n),
            pids: Vec::with_capacity(n),
            scopes: Vec::with_capacity(n),
            timeouts: Vec::with_capacity(n),
            keys: Vec::with_capacity(n),
            subids: Vec::with_capacity(n),
            shared: Vec::with_capacity(n),
            newest: state.next_id,
            interval: Duration::MAX,
            loosest_interval: Duration::ZERO,
            full_check_interval: Duration::MAX,
            keepalives: None,
        };
        for (&id, watched) in &state.watched {
            let (classid, objid, subid) = watched.key.pg_locks_ids();
            let health = watched.health;
            batch.ids.push(id);
            batch.pids.push(watched.backend_pid);
            batch.scopes.push(watched.scope);
            batch.timeouts.push(health.probe_timeout);
            batch
                .keys
                .push(((u64::from(classid) << 32) | u64::from(objid)) as i64);
            batch.subids.push(subid);
            batch.shared.push(watched.mode == LockMode::Shared);
            batch.interval = batch.interval.min(health.interval);
            batch.loosest_interval = batch.loosest_interval.max(health.interval);
            batch.full_check_interval = batch.full_check_interval.min(health.full_check_interval);
            // The server must outlast the slowest detection: the longest keepalive wins.
            if batch
                .keepalives
                .is_none_or(|k: HealthCheck| health.keepalive_timeout() > k.keepalive_timeout())
            {
                batch.keepalives = Some(health);
            }
        }
        Some(batch)
    }
}

fn set_once(sender: &watch::Sender<Option<LossReason>>, reason: LossReason) {
    sender.send_if_modified(|current| {
        if current.is_some() {
            return false;
        }
        *current = Some(reason);
        true
    });
}

/// When the monitor checks the server's lock table (the full probe) rather than only the
/// connection's liveness and backend (the cheap probe).
///
/// A session's advisory locks change only through its own statements (or its end, which the
/// cheap probe sees). pglock's own statements on the connection never release another lock's
/// key, so the full probe is needed only for locks it has not checked yet, after the caller
/// was handed the client (it may have run `pg_advisory_unlock_all()`, `DISCARD ALL`, or ended
/// a transaction-scoped lock's transaction), and as a fallback every `full_check_interval`.
#[derive(Default)]
struct FullCheckSchedule {
    /// Locks with ids below this have been seen by a full probe that answered.
    checked_below: u64,
    /// The borrow count the last probe saw.
    borrows_seen: Option<u64>,
    /// After a new borrow: probes are full until the first one starting at or after this.
    full_until: Option<Instant>,
    /// When the last full probe that answered started.
    last_full: Option<Instant>,
}

impl FullCheckSchedule {
    /// Whether the probe starting `now` with `batch`, on a connection whose client has been
    /// handed out `borrows` times, must be the full one.
    fn full(&mut self, batch: &Batch, borrows: u64, now: Instant) -> bool {
        let mut full = batch.ids.iter().any(|&id| id >= self.checked_below);
        if self.borrows_seen != Some(borrows) {
            // A statement of the caller's sent through that borrow up to one interval later
            // still finds a full probe after it, which starts within one interval.
            let first = self.borrows_seen.is_none();
            self.borrows_seen = Some(borrows);
            if !first || borrows > 0 {
                self.full_until = Some(now + batch.loosest_interval);
                full = true;
            }
        } else if let Some(until) = self.full_until {
            full = true;
            if now >= until {
                self.full_until = None;
            }
        }
        match self.last_full {
            Some(last) if now.saturating_duration_since(last) < batch.full_check_interval => full,
            _ => true,
        }
    }

    /// A full probe started at `started` has answered.
    fn checked(&mut self, batch: &Batch, started: Instant) {
        self.checked_below = self.checked_below.max(batch.newest);
        self.last_full = Some(started);
    }
}

/// A guard's place in its connection's monitor.
pub(crate) struct Registration {
    id: u64,
    monitor: Arc<Monitor>,
    reason: watch::Receiver<Option<LossReason>>,
}

impl Registration {
    /// Starts watching the lock `key` held in `mode` and `scope` by `backend_pid` on `conn`,
    /// starting the connection's monitor task if it is not running.
    pub(crate) fn new(
        conn: &Conn,
        key: AdvisoryKey,
        mode: LockMode,
        scope: LockScope,
        backend_pid: i32,
        health: Option<HealthCheck>,
    ) -> Self {
        let monitor = conn
            .monitor_cell()
            .get_or_init(|| Arc::new(Monitor::new(conn.closed_watch())))
            .clone();
        // A session's own health check applies to every lock on it.
        let health = conn.health().or(health).unwrap_or_default().sanitized();
        let runtime = Handle::try_current()
            .expect("pglock's loss monitor runs on Tokio: call loss_signal() or is_lost() within a Tokio runtime");
        let (sender, reason) = watch::channel(None);
        let (id, start) = {
            let mut state = monitor.state.lock().unwrap();
            let id = state.next_id;
            state.next_id += 1;
            state.watched.insert(
                id,
                Watched {
                    key,
                    mode,
                    scope,
                    backend_pid,
                    health,
                    reason: sender,
                },
            );
            let start = !state.running;
            state.running = true;
            if start {
                state.generation += 1;
            }
            (id, start.then_some(state.generation))
        };
        match start {
            Some(generation) => {
                let running = Running {
                    monitor: monitor.clone(),
                    generation,
                };
                runtime.spawn(run(running, conn.downgrade()));
            }
            // The running task probes at once (or right after the probe in flight), so the new
            // lock's bound holds whatever the schedule was.
            None => monitor.added.notify_one(),
        }
        Registration {
            id,
            monitor,
            reason,
        }
    }

    pub(crate) fn signal(&self) -> LossSignal {
        LossSignal::new(self.reason.clone())
    }

    pub(crate) fn is_lost(&self) -> bool {
        self.reason.borrow().is_some()
    }

    /// The guard saw its connection closed before the monitor did.
    pub(crate) fn report_closed(&self) {
        self.monitor.lose(
            self.id,
            LossReason::ConnectionClosed {
                detail: "the connection is closed".to_owned(),
            },
        );
    }

    /// The guard is releasing the lock: stop watching it, and let the signal say so.
    pub(crate) fn released(self) {
        let (watched, now_idle) = {
            let mut state = self.monitor.state.lock().unwrap();
            let watched = state.watched.remove(&self.id);
            (watched, state.watched.is_empty() && state.running)
        };
        if let Some(watched) = watched {
            set_once(&watched.reason, LossReason::Released);
        }
        if now_idle {
            self.monitor.idle.notify_one();
        }
    }
}

/// The claim of one task on its monitor. If the task is dropped before it ends by itself (its
/// runtime shut down), the monitor is marked idle, so the next watched guard starts another.
struct Running {
    monitor: Arc<Monitor>,
    generation: u64,
}

impl Drop for Running {
    fn drop(&mut self) {
        let mut state = self.monitor.state.lock().unwrap();
        if state.generation == self.generation {
            state.running = false;
        }
    }
}

/// The monitor task of one connection: probes every interval (the shortest of the watched
/// locks') until nothing is watched, the connection is gone, or the probe reports a
/// connection-level loss.
async fn run(running: Running, conn: WeakConn) {
    let monitor = &running.monitor;
    let mut closed = monitor.closed.clone();
    // The longest keepalive timeout set on the server so far.
    let mut keepalives_set = Duration::ZERO;
    let mut schedule = FullCheckSchedule::default();
    // When the last probe started, and the interval it asked for.
    let mut last: Option<(Instant, Duration)> = None;
    let mut wait = true;
    loop {
        if let (true, Some((started, interval))) = (wait, last) {
            tokio::select! {
                biased;
                detail = connection_closed(&mut closed) => {
                    monitor.lose_all(LossReason::ConnectionClosed { detail });
                    return;
                }
                () = monitor.idle.notified() => {}
                () = monitor.added.notified() => {}
                () = tokio::time::sleep_until(started + interval) => {}
            }
        }
        wait = true;
        let Some(batch) = monitor.batch() else {
            return;
        };
        let Some(conn) = open_conn(monitor, &conn) else {
            return;
        };
        let started = Instant::now();
        last = Some((started, batch.interval));
        let full = schedule.full(&batch, conn.borrows(), started);
        let keepalives = batch
            .keepalives
            .filter(|k| k.keepalive_timeout() > keepalives_set);
        let probe = probe(&conn, &batch, full, keepalives.as_ref());
        let outcome = probe_in_time(monitor, &mut closed, &batch, started, probe).await;
        drop(conn);
        match outcome {
            Ok((pid, missing)) => {
                if let Some(health) = keepalives {
                    keepalives_set = health.keepalive_timeout();
                }
                if full {
                    schedule.checked(&batch, started);
                }
                lose_unconfirmed(monitor, &batch, pid, &missing);
            }
            Err(Verdict::TransactionFailed) => monitor.lose_transaction_locks(&batch),
            // The backend answered, but not the question. Ask again next tick.
            Err(Verdict::Inconclusive) => {}
            Err(Verdict::Abandoned) => wait = false,
            Err(Verdict::Lost(reason)) => {
                monitor.lose_all(reason);
                return;
            }
        }
    }
}

/// The watched connection, for one probe; `None`, after losing every lock, when it is gone.
fn open_conn(monitor: &Monitor, conn: &WeakConn) -> Option<Conn> {
    let detail = match conn.upgrade() {
        None => "the connection was dropped",
        Some(conn) if conn.client().is_closed() => "the connection is closed",
        Some(conn) => return Some(conn),
    };
    monitor.lose_all(LossReason::ConnectionClosed {
        detail: detail.to_owned(),
    });
    None
}

/// Awaits `probe` (started at `started`) while each lock of `batch` is within its own probe
/// timeout: a lock whose timeout passes is lost then, and the probe is awaited for the
/// longest. Ends early when the connection closes, or when the monitor may have nothing left
/// to watch ([`Verdict::Abandoned`], as when every lock of the batch has timed out).
async fn probe_in_time(
    monitor: &Monitor,
    closed: &mut Option<watch::Receiver<Option<String>>>,
    batch: &Batch,
    started: Instant,
    probe: impl Future<Output = Result<(i32, Vec<i64>), tokio_postgres::Error>>,
) -> Result<(i32, Vec<i64>), Verdict> {
    let mut answer = std::pin::pin!(probe);
    let mut waiting: Vec<usize> = (0..batch.ids.len()).collect();
    loop {
        let deadline = waiting
            .iter()
            .map(|&i| batch.timeouts[i])
            .min()
            .map_or(started, |timeout| started + timeout);
        tokio::select! {
            biased;
            detail = connection_closed(closed) => {
                return Err(Verdict::Lost(LossReason::ConnectionClosed { detail }));
            }
            () = monitor.idle.notified() => {
                // Nothing may be left to watch: look again now, without waiting for the probe.
                return Err(Verdict::Abandoned);
            }
            answer = &mut answer => return answer.map_err(|error| classify(&error)),
            () = tokio::time::sleep_until(deadline) => {
                let now = Instant::now();
                waiting.retain(|&i| {
                    let after = batch.timeouts[i];
                    if started + after > now {
                        return true;
                    }
                    monitor.lose(batch.ids[i], LossReason::ProbeTimedOut { after });
                    false
                });
                if waiting.is_empty() {
                    // Every lock of the batch is lost; a lock added since gets a probe (and a
                    // timeout) of its own, and with none the task ends.
                    return Err(Verdict::Abandoned);
                }
            }
        }
    }
}

/// Reads a probe's answer, `pid` the backend that ran it and `missing` the sorted 1-based
/// positions of the locks it did not find: a lock granted on another backend is lost (the
/// backend changed), and so is a missing one.
fn lose_unconfirmed(monitor: &Monitor, batch: &Batch, pid: i32, missing: &[i64]) {
    for (i, &id) in batch.ids.iter().enumerate() {
        let expected = batch.pids[i];
        if expected != pid {
            monitor.lose(
                id,
                LossReason::BackendChanged {
                    expected,
                    actual: pid,
                },
            );
        } else if missing.binary_search(&(i as i64 + 1)).is_ok() {
            monitor.lose(id, LossReason::LockMissing);
        }
    }
}

/// Completes with the connection task's last word once it has ended; never without one.
async fn connection_closed(closed: &mut Option<watch::Receiver<Option<String>>>) -> String {
    let Some(receiver) = closed else {
        return std::future::pending().await;
    };
    match receiver.wait_for(Option::is_some).await {
        Ok(detail) => detail.clone().unwrap_or_default(),
        Err(_) => "the session was dropped".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch_of(ids: &[u64], newest: u64, interval_ms: u64, full_ms: u64) -> Batch {
        let n = ids.len();
        Batch {
            ids: ids.to_vec(),
            pids: vec![1; n],
            scopes: vec![LockScope::Session; n],
            timeouts: vec![Duration::from_millis(100); n],
            keys: vec![0; n],
            subids: vec![1; n],
            shared: vec![false; n],
            newest,
            interval: Duration::from_millis(interval_ms),
            loosest_interval: Duration::from_millis(interval_ms),
            full_check_interval: Duration::from_millis(full_ms),
            keepalives: None,
        }
    }

    #[test]
    fn the_full_probe_runs_when_the_locks_could_have_changed() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let batch = batch_of(&[0], 1, 100, 1000);
        let mut schedule = FullCheckSchedule::default();
        // A new lock: full, and again until a full probe has answered.
        assert!(schedule.full(&batch, 0, at(0)));
        assert!(schedule.full(&batch, 0, at(100)));
        schedule.checked(&batch, at(100));
        // Idle: cheap.
        assert!(!schedule.full(&batch, 0, at(200)));
        assert!(!schedule.full(&batch, 0, at(300)));
        // The client handed out: full at once, for one interval, and the first probe after.
        assert!(schedule.full(&batch, 1, at(350)));
        schedule.checked(&batch, at(350));
        assert!(schedule.full(&batch, 1, at(400)));
        assert!(schedule.full(&batch, 1, at(450)));
        assert!(!schedule.full(&batch, 1, at(550)));
        // The fallback cadence: a full probe once `full_check_interval` has passed.
        assert!(!schedule.full(&batch, 1, at(1300)));
        assert!(schedule.full(&batch, 1, at(1350)));
        schedule.checked(&batch, at(1350));
        assert!(!schedule.full(&batch, 1, at(1450)));
        // A lock added: full until it is checked.
        let grown = batch_of(&[0, 1], 2, 100, 1000);
        assert!(schedule.full(&grown, 1, at(1500)));
        schedule.checked(&grown, at(1500));
        assert!(!schedule.full(&grown, 1, at(1600)));
    }
}
