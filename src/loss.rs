//! Lock-loss detection: a per-connection monitor that probes the server, and the signal a guard
//! hands out.
//!
//! One [`Monitor`] exists per connection (per pooled connection a guard holds, per
//! [`Session`](crate::Session)). It starts with the first guard that asks for a
//! [`LossSignal`], sends one probe per [`HealthCheck::interval`] however many locks it
//! watches, and ends when it watches none. See `docs/design.md`, "Loss detection", for the
//! bound and the safety argument.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Config, Row};

use crate::connection::{Conn, WeakConn};
use crate::{AdvisoryKey, LockMode, LockScope};

/// How a held lock's connection is watched for loss.
///
/// Every `interval` the connection's monitor sends one probe, which gets `probe_timeout` to
/// answer; one that does not counts as loss. There are two probes:
///
/// - the **cheap probe**, `SELECT pg_backend_pid()`: the connection is alive, reaches the
///   backend that took the locks, and a transaction-scoped lock's transaction has not failed.
///   Its cost is that of `SELECT 1`, whatever the size of the server's lock table;
/// - the **full probe**, which also asks `pg_lock_status()` which of the watched locks the
///   backend no longer holds. That function copies the server's whole lock table, so its cost
///   grows with every lock of every session (about 10 ms of server CPU with 10,000 advisory
///   locks held elsewhere).
///
/// A session's advisory locks change only through its own statements, or with its end. pglock's
/// own statements never release a lock they were not sent for, so only a statement of yours on
/// the lock's connection can release a lock behind pglock's back (`pg_advisory_unlock_all()`,
/// `pg_advisory_unlock`, `DISCARD ALL`, or `COMMIT` / `ROLLBACK` of a transaction-scoped lock's
/// transaction). The monitor sends the full probe:
///
/// - for a lock it has not checked yet (the first probe after
///   [`loss_signal`](crate::AdvisoryLockGuard::loss_signal));
/// - after the client was handed to you: a guard's `Deref` (`guard.execute(...)`), or a
///   [`Session`](crate::Session)'s `Deref` or [`client`](crate::Session::client). Every probe
///   that starts within one `interval` of the hand-over, and the first one after, is full;
/// - every [`full_check_interval`](Self::full_check_interval) (default 10 min) in any case.
///
/// The cheap probe the rest of the time.
///
/// # Detection bound
///
/// A loss is reported at most [`detection_bound`](Self::detection_bound) after it happens:
/// `interval + probe_timeout` when `probe_timeout <= interval` (the default: 1 s + 1 s = 2 s),
/// `2 × probe_timeout` otherwise, plus the time the Tokio runtime takes to run the monitor.
/// The bound is counted from the later of the loss and the first
/// [`loss_signal`](crate::AdvisoryLockGuard::loss_signal) /
/// [`is_lost`](crate::AdvisoryLockGuard::is_lost) call on the guard. It covers: the connection
/// closed or reset, the backend terminated, the server restarted or failed over, a dead
/// network path, `idle_session_timeout`, another backend behind a pooler, a failed statement in
/// a transaction-scoped lock's transaction, and a lock released by a statement of yours that
/// you send within one `interval` of taking the client for it (as `guard.execute(...).await`
/// does: each such call takes the client anew). A connection that closes under a
/// [`Session::connect`](crate::Session::connect) session is reported at once.
///
/// A lock released by a statement you send through a `&Client` kept longer than one
/// `interval` is reported within [`full_check_bound`](Self::full_check_bound):
/// `full_check_interval + detection_bound()`.
///
/// The probe runs on the lock's own connection, behind any statement of yours in flight there.
/// A statement of yours that runs longer than `probe_timeout` makes the probe time out, which
/// is reported as loss ([`LossReason::ProbeTimedOut`]): pglock cannot tell a busy connection
/// from a dead network path. Run long statements on another connection, or raise
/// `probe_timeout` above them.
///
/// Several locks on one connection share its monitor: it probes every shortest `interval`
/// among them, and reports each lock's timeout after that lock's own `probe_timeout`, so each
/// lock's bound holds whatever the others ask for.
///
/// Durations below 1 ms count as 1 ms.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use pglock::HealthCheck;
///
/// let fast = HealthCheck::new(Duration::from_millis(200), Duration::from_millis(100));
/// assert_eq!(fast.detection_bound(), Duration::from_millis(300));
/// assert_eq!(HealthCheck::default().detection_bound(), Duration::from_secs(2));
/// // Check the lock table at least once a minute, whatever the connection did.
/// let often = HealthCheck::default().with_full_check_interval(Duration::from_secs(60));
/// assert_eq!(often.full_check_bound(), Duration::from_secs(62));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HealthCheck {
    /// Time between the starts of two probes (default 1 s).
    pub interval: Duration,
    /// How long a probe may take before the lock counts as lost (default 1 s).
    pub probe_timeout: Duration,
    /// The longest time between two full probes, which check the server's lock table (default
    /// 10 min). `Duration::ZERO` makes every probe a full one.
    pub full_check_interval: Duration,
}

/// The default [`HealthCheck::full_check_interval`].
const FULL_CHECK_INTERVAL: Duration = Duration::from_secs(600);

impl Default for HealthCheck {
    /// One probe per second, each given one second to answer: loss is reported within 2 s.
    fn default() -> Self {
        HealthCheck::new(Duration::from_secs(1), Duration::from_secs(1))
    }
}

/// The shortest dead-path timeout pglock configures, whatever the health check.
const MIN_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

impl HealthCheck {
    /// A health check probing every `interval`, each probe allowed `probe_timeout`, with a
    /// full probe at least every 10 minutes.
    pub const fn new(interval: Duration, probe_timeout: Duration) -> Self {
        HealthCheck {
            interval,
            probe_timeout,
            full_check_interval: FULL_CHECK_INTERVAL,
        }
    }

    /// The same health check with a full probe (the lock-table check) at least every
    /// `full_check_interval`; `Duration::ZERO` makes every probe a full one.
    pub const fn with_full_check_interval(mut self, full_check_interval: Duration) -> Self {
        self.full_check_interval = full_check_interval;
        self
    }

    fn sanitized(&self) -> Self {
        let floor = Duration::from_millis(1);
        HealthCheck {
            interval: self.interval.max(floor),
            probe_timeout: self.probe_timeout.max(floor),
            full_check_interval: self.full_check_interval,
        }
    }

    /// The longest time between a lock's release by a statement you sent through a `&Client`
    /// kept longer than one `interval`, and its report: `full_check_interval +
    /// detection_bound()`, or `detection_bound()` when every probe is a full one
    /// (`full_check_interval <= interval`).
    pub fn full_check_bound(&self) -> Duration {
        let s = self.sanitized();
        if s.full_check_interval <= s.interval {
            return self.detection_bound();
        }
        s.full_check_interval + self.detection_bound()
    }

    /// The longest time between a loss and its report:
    /// `max(interval, probe_timeout) + probe_timeout`.
    pub fn detection_bound(&self) -> Duration {
        let s = self.sanitized();
        s.interval.max(s.probe_timeout) + s.probe_timeout
    }

    /// How long a silent network path must last before the server (and a client socket pglock
    /// configures) gives up on the connection: `3 × detection_bound()`, at least 10 s, in whole
    /// seconds.
    ///
    /// The server frees a lock only when it ends the holder's session. When the network path
    /// to the holder dies without a reset, that takes as long as the server's TCP keepalive or
    /// user timeout allows: by default, hours. pglock sets the server's per-session
    /// `tcp_keepalives_idle` (half this timeout), `tcp_keepalives_interval` (a tenth, at least
    /// 1 s), `tcp_keepalives_count` (10) and `tcp_user_timeout` (this timeout) on the
    /// connections it watches, and the same on the client side of the connections it opens.
    /// The server then drops a partitioned holder after about this timeout (1.5 × on systems
    /// without `TCP_USER_TIMEOUT`), always later than the holder reports the loss: the holder
    /// stops first. See `docs/design.md`, "Loss detection".
    pub fn keepalive_timeout(&self) -> Duration {
        let wanted = (self.detection_bound() * 3).max(MIN_KEEPALIVE_TIMEOUT);
        Duration::from_secs(wanted.as_secs() + u64::from(wanted.subsec_nanos() > 0))
    }

    /// `(idle, interval, count, user_timeout)` of the TCP keepalive settings for
    /// [`keepalive_timeout`](Self::keepalive_timeout).
    fn keepalive_params(&self) -> (Duration, Duration, u32, Duration) {
        let timeout = self.keepalive_timeout();
        let secs = timeout.as_secs();
        (
            Duration::from_secs((secs / 2).max(1)),
            Duration::from_secs((secs / 10).max(1)),
            10,
            timeout,
        )
    }

    /// Sets the client-side TCP keepalives and user timeout of `config` to match
    /// [`keepalive_timeout`](Self::keepalive_timeout).
    ///
    /// Use it on the `tokio_postgres::Config` of the pool your locks come from, so that a
    /// dead network path also ends the client side of a lost connection in bounded time (the
    /// server side is set by the loss monitor itself). [`Session::connect`](crate::Session::connect)
    /// does this for its own connections.
    ///
    /// # Examples
    ///
    /// ```
    /// let mut config: tokio_postgres::Config = "postgres://postgres@localhost/test".parse().unwrap();
    /// pglock::HealthCheck::default().configure_keepalives(&mut config);
    /// assert!(config.get_keepalives());
    /// assert_eq!(config.get_tcp_user_timeout(), Some(&std::time::Duration::from_secs(10)));
    /// ```
    pub fn configure_keepalives<'a>(&self, config: &'a mut Config) -> &'a mut Config {
        let (idle, interval, count, user_timeout) = self.keepalive_params();
        config
            .keepalives(true)
            .keepalives_idle(idle)
            .keepalives_interval(interval)
            .keepalives_retries(count)
            .tcp_user_timeout(user_timeout)
    }

    /// As [`configure_keepalives`](Self::configure_keepalives), keeping what the connection
    /// string set explicitly.
    pub(crate) fn configure_client(&self, config: &mut Config) {
        if !config.get_keepalives() {
            return;
        }
        let (idle, interval, count, user_timeout) = self.keepalive_params();
        // tokio-postgres' default idle time is two hours; anything else was asked for.
        if config.get_keepalives_idle() == Duration::from_secs(2 * 60 * 60) {
            config.keepalives_idle(idle);
        }
        if config.get_keepalives_interval().is_none() {
            config.keepalives_interval(interval);
        }
        if config.get_keepalives_retries().is_none() {
            config.keepalives_retries(count);
        }
        if config.get_tcp_user_timeout().is_none() {
            config.tcp_user_timeout(user_timeout);
        }
    }

    /// The server's session settings for the same timeouts, as `(name, value)`.
    fn server_settings(&self) -> ([&'static str; 4], [String; 4]) {
        let (idle, interval, count, user_timeout) = self.keepalive_params();
        (
            [
                "tcp_keepalives_idle",
                "tcp_keepalives_interval",
                "tcp_keepalives_count",
                "tcp_user_timeout",
            ],
            [
                idle.as_secs().to_string(),
                interval.as_secs().to_string(),
                count.to_string(),
                user_timeout.as_millis().to_string(),
            ],
        )
    }
}

/// Sets the server-side keepalive settings of `health` on the session of `client`.
///
/// Settings the server does not know (`tcp_user_timeout` before PostgreSQL 12) are skipped, so
/// the statement cannot fail on an old server, which matters inside a caller's transaction.
pub(crate) async fn apply_server_keepalives(
    client: &Client,
    health: &HealthCheck,
) -> Result<(), tokio_postgres::Error> {
    let (names, values) = health.server_settings();
    let names: Vec<&str> = names.to_vec();
    let values: Vec<&str> = values.iter().map(String::as_str).collect();
    // Unprepared (one round trip, no named statement), so it also works behind a pooler.
    client
        .query_typed(
            KEEPALIVE_SQL,
            &[(&names, Type::TEXT_ARRAY), (&values, Type::TEXT_ARRAY)],
        )
        .await
        .map(drop)
}

static KEEPALIVE_SQL: &str = "SELECT count(set_config(v.name, v.setting, false)) \
     FROM unnest($1::text[], $2::text[]) AS v(name, setting) \
     WHERE current_setting(v.name, true) IS NOT NULL";

/// The probe: this backend's pid, and the 1-based positions of the watched locks that this
/// backend does not hold (granted, in that mode). `pg_lock_status()` is the function behind the
/// `pg_locks` view; calling it directly takes no lock on the view inside a transaction.
static PROBE_SQL: &str = "SELECT pg_backend_pid(), \
     coalesce(array_agg(h.n) FILTER (WHERE l.pid IS NULL), '{}')::int8[] \
     FROM unnest($1::int8[], $2::int2[], $3::bool[]) WITH ORDINALITY AS h(key, subid, shared, n) \
     LEFT JOIN pg_lock_status() AS l \
     ON l.locktype = 'advisory' AND l.pid = pg_backend_pid() AND l.granted \
     AND l.classid = ((h.key >> 32) & 4294967295)::oid \
     AND l.objid = (h.key & 4294967295)::oid \
     AND l.objsubid = h.subid \
     AND l.mode = CASE WHEN h.shared THEN 'ShareLock' ELSE 'ExclusiveLock' END";

/// The cheap probe: this backend's pid. Its cost does not depend on the server's lock table.
/// An answer says the connection is alive, reaches the backend that took the locks, and (for a
/// transaction-scoped lock) that its transaction has not failed (`25P02` otherwise).
static CHEAP_PROBE_SQL: &str = "SELECT pg_backend_pid()";

/// Why a held lock is, or must be assumed, lost.
///
/// Every reason but [`Released`](Self::Released) means the server may already have granted
/// the lock to someone else (or will do so soon): stop the protected work.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LossReason {
    /// The connection closed or failed: the server ended the session (`pg_terminate_backend`,
    /// a restart, `idle_session_timeout`, a pooler), the network reset it, or a keepalive gave
    /// up. The server released every lock of the session.
    ConnectionClosed {
        /// What the driver reported.
        detail: String,
    },
    /// The probe failed with an error that leaves the lock's state unknown.
    ProbeFailed {
        /// The error.
        detail: String,
    },
    /// The probe got no answer in time: the server or the network path is unresponsive (or a
    /// long statement of yours occupied the connection).
    ///
    /// A fault that closes the connection is reported this way instead of as
    /// [`ConnectionClosed`](Self::ConnectionClosed) when the probe's timeout runs out before the
    /// close reaches the client: for example when `pg_terminate_backend` hits a probe in flight
    /// on a server too busy to end the session within the timeout. Handle both the same way.
    ProbeTimedOut {
        /// The probe timeout that ran out.
        after: Duration,
    },
    /// The backend no longer holds the lock (for example after `pg_advisory_unlock_all()` on
    /// the connection).
    LockMissing,
    /// A statement failed inside the transaction of a transaction-scoped lock: PostgreSQL
    /// released the lock at once, although the transaction stays open (aborted) until it is
    /// rolled back.
    TransactionAborted,
    /// The connection now reaches another backend than the one that took the lock, as behind
    /// a transaction-pooling PgBouncer: the session lock is not this connection's any more.
    BackendChanged {
        /// The backend that took the lock.
        expected: i32,
        /// The backend the probe reached.
        actual: i32,
    },
    /// The guard released the lock (or was dropped or leaked): not a loss, but the lock is no
    /// longer held through it.
    Released,
}

impl fmt::Display for LossReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LossReason::ConnectionClosed { detail } => write!(
                f,
                "the connection holding the lock closed ({detail}); the server has released the lock, another session may hold it now"
            ),
            LossReason::ProbeFailed { detail } => write!(
                f,
                "the lock health probe failed ({detail}); the lock may be gone, so it counts as lost"
            ),
            LossReason::ProbeTimedOut { after } => write!(
                f,
                "the lock health probe got no answer within {after:?}: the server or the network path is unresponsive (or a long statement occupied the connection); the lock counts as lost"
            ),
            LossReason::LockMissing => f.write_str(
                "the lock is no longer held by its backend (released behind pglock's back, e.g. by pg_advisory_unlock_all())",
            ),
            LossReason::TransactionAborted => f.write_str(
                "a statement failed inside the lock's transaction: PostgreSQL released the transaction-scoped lock at once (the aborted transaction stays open until rolled back)",
            ),
            LossReason::BackendChanged { expected, actual } => write!(
                f,
                "the connection now reaches backend {actual}, not backend {expected} that took the lock: a pooler switched backends, so the session lock is not held here; use LockScope::Transaction behind a transaction pooler"
            ),
            LossReason::Released => f.write_str("the guard released the lock"),
        }
    }
}

/// Fires when a held lock is lost. Get one from
/// [`AdvisoryLockGuard::loss_signal`](crate::AdvisoryLockGuard::loss_signal).
///
/// Cheap to clone; every clone sees the same, final [`LossReason`]: once a reason is set it
/// never changes. Loss is: the connection closed or failed, the backend was terminated, the
/// server restarted, the network path died (no reset: packets simply stop), the server or a
/// pooler ended the session (`idle_session_timeout`), the backend changed (transaction
/// pooler), or the lock is no longer in `pg_locks` for the holder's backend. Each is reported
/// within [`HealthCheck::detection_bound`], except a lock released by a statement you sent
/// through a `&Client` kept for longer than one interval: within
/// [`HealthCheck::full_check_bound`] (see [`HealthCheck`]).
///
/// # Examples
///
/// ```no_run
/// # async fn demo(pool: deadpool_postgres::Pool) -> pglock::Result<()> {
/// use std::time::Duration;
/// use pglock::{AdvisoryLock, AdvisoryLockGuard};
///
/// let guard = AdvisoryLock::new(&pool, "beat").lock().await?;
/// let mut signal = AdvisoryLockGuard::loss_signal(&guard);
/// let mut ticks = tokio::time::interval(Duration::from_secs(10));
/// loop {
///     tokio::select! {
///         reason = signal.lost() => {
///             eprintln!("leadership lost: {reason}");
///             break;
///         }
///         _ = ticks.tick() => println!("tick"),
///     }
/// }
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct LossSignal {
    reason: watch::Receiver<Option<LossReason>>,
}

impl LossSignal {
    /// Whether the lock is lost (or released), without waiting.
    pub fn is_lost(&self) -> bool {
        self.reason.borrow().is_some()
    }

    /// Why the lock is lost, or `None` while it is held.
    pub fn reason(&self) -> Option<LossReason> {
        self.reason.borrow().clone()
    }

    /// Completes with the reason once the lock is lost (at once if it already is).
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: dropping the future loses nothing, so it can sit in a `tokio::select!`
    /// loop.
    pub async fn lost(&mut self) -> LossReason {
        let waited = match self.reason.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone(),
            Err(_) => None,
        };
        waited
            .or_else(|| self.reason.borrow().clone())
            .unwrap_or_else(|| LossReason::ConnectionClosed {
                detail: "the connection was dropped".to_owned(),
            })
    }
}

impl fmt::Debug for LossSignal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LossSignal")
            .field("reason", &*self.reason.borrow())
            .finish()
    }
}

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
            crate::trace::lock_lost(watched.key, watched.backend_pid, &reason);
            set_once(&watched.reason, reason);
        }
    }

    /// Connection-level loss: every watched lock is lost, and the task ends.
    fn lose_all(&self, reason: LossReason) {
        let mut state = self.state.lock().unwrap();
        for (_, watched) in state.watched.drain() {
            crate::trace::lock_lost(watched.key, watched.backend_pid, &reason);
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

/// The watched locks of one probe, as parallel arrays (the full probe's parameters), and the
/// schedule their health checks ask for.
struct Batch {
    ids: Vec<u64>,
    pids: Vec<i32>,
    scopes: Vec<LockScope>,
    timeouts: Vec<Duration>,
    keys: Vec<i64>,
    subids: Vec<i16>,
    shared: Vec<bool>,
    /// Ids below this were registered when the batch was taken.
    newest: u64,
    /// The shortest interval of the watched locks: the time between two probes.
    interval: Duration,
    /// The longest interval of the watched locks.
    loosest_interval: Duration,
    /// The shortest fallback cadence of the full check.
    full_check_interval: Duration,
    /// The health check whose keepalive timeout is the longest.
    keepalives: Option<HealthCheck>,
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
            .monitor_slot()
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
        LossSignal {
            reason: self.reason.clone(),
        }
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
        let Some(conn) = conn.upgrade() else {
            monitor.lose_all(LossReason::ConnectionClosed {
                detail: "the connection was dropped".to_owned(),
            });
            return;
        };
        if conn.client().is_closed() {
            monitor.lose_all(LossReason::ConnectionClosed {
                detail: "the connection is closed".to_owned(),
            });
            return;
        }
        let started = Instant::now();
        last = Some((started, batch.interval));
        let full = schedule.full(&batch, conn.borrows(), started);
        let keepalives = batch
            .keepalives
            .filter(|k| k.keepalive_timeout() > keepalives_set);
        // Each lock gets its own probe timeout; the probe is awaited for the longest.
        let mut waiting: Vec<usize> = (0..batch.ids.len()).collect();
        let outcome = {
            let mut answer = std::pin::pin!(probe(&conn, &batch, full, keepalives.as_ref()));
            loop {
                let deadline = waiting
                    .iter()
                    .map(|&i| batch.timeouts[i])
                    .min()
                    .map_or(started, |timeout| started + timeout);
                tokio::select! {
                    biased;
                    detail = connection_closed(&mut closed) => {
                        break Err(Verdict::Lost(LossReason::ConnectionClosed { detail }));
                    }
                    () = monitor.idle.notified() => {
                        // Nothing may be left to watch: look again now, without waiting for the
                        // probe.
                        break Err(Verdict::Abandoned);
                    }
                    answer = &mut answer => break match answer {
                        Ok(answer) => Ok(answer),
                        Err(error) => Err(classify(&error)),
                    },
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
                            // Every lock of the batch is lost; a lock added since gets a probe
                            // (and a timeout) of its own, and with none the task ends.
                            break Err(Verdict::Abandoned);
                        }
                    }
                }
            }
        };
        drop(conn);
        match outcome {
            Ok((pid, missing)) => {
                if let Some(health) = keepalives {
                    keepalives_set = health.keepalive_timeout();
                }
                if full {
                    schedule.checked(&batch, started);
                }
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

/// Runs one probe, the full one or the cheap one: `(backend pid, sorted 1-based positions of
/// the missing locks)` (none for the cheap probe).
async fn probe(
    conn: &Conn,
    batch: &Batch,
    full: bool,
    keepalives: Option<&HealthCheck>,
) -> Result<(i32, Vec<i64>), tokio_postgres::Error> {
    let client = conn.client();
    let mut row = match keepalives {
        // Pipelined with the probe: no extra round trip.
        Some(health) => {
            let (_, row) = futures_util::future::join(
                apply_server_keepalives(client, health),
                probe_once(conn, batch, full),
            )
            .await;
            row
        }
        None => probe_once(conn, batch, full).await,
    };
    // A cancel request meant for an abandoned wait on this session can arrive late and hit the
    // probe; that says nothing about the lock, so ask once more.
    if matches!(&row, Err(e) if e.code() == Some(&SqlState::QUERY_CANCELED)) {
        row = probe_once(conn, batch, full).await;
    }
    let row = row?;
    let pid: i32 = row.try_get(0)?;
    if !full {
        return Ok((pid, Vec::new()));
    }
    let mut missing: Vec<i64> = row.try_get(1)?;
    missing.sort_unstable();
    Ok((pid, missing))
}

/// Sends the probe as a statement prepared once per connection, or unprepared when the
/// prepared one is unknown to the backend that answers: behind a transaction pooler, the
/// backend may not be the one the statement was prepared on, and the probe must still reach
/// the answering backend to tell that it changed.
async fn probe_once(conn: &Conn, batch: &Batch, full: bool) -> Result<Row, tokio_postgres::Error> {
    if !full {
        let prepared = match conn.prepare(CHEAP_PROBE_SQL).await {
            Ok(statement) => conn.client().query_one(&statement, &[]).await,
            Err(error) => Err(error),
        };
        return match prepared {
            Err(error) if error.code() == Some(&SqlState::INVALID_SQL_STATEMENT_NAME) => {
                let mut rows = conn.client().query_typed(CHEAP_PROBE_SQL, &[]).await?;
                Ok(rows.pop().expect("the probe returns one row"))
            }
            other => other,
        };
    }
    let params: [&(dyn ToSql + Sync); 3] = [&batch.keys, &batch.subids, &batch.shared];
    let prepared = match conn.prepare(PROBE_SQL).await {
        Ok(statement) => conn.client().query_one(&statement, &params).await,
        Err(error) => Err(error),
    };
    match prepared {
        Err(error) if error.code() == Some(&SqlState::INVALID_SQL_STATEMENT_NAME) => {
            let typed = [
                (params[0], Type::INT8_ARRAY),
                (params[1], Type::INT2_ARRAY),
                (params[2], Type::BOOL_ARRAY),
            ];
            let mut rows = conn.client().query_typed(PROBE_SQL, &typed).await?;
            Ok(rows.pop().expect("an aggregate returns one row"))
        }
        other => other,
    }
}

/// What a failed probe says about the watched locks.
enum Verdict {
    /// All of them are lost.
    Lost(LossReason),
    /// The caller's transaction on the connection has failed (`25P02`). PostgreSQL released
    /// its transaction-scoped locks when it failed; session locks stay held, and nothing can
    /// release them until the transaction is rolled back.
    TransactionFailed,
    /// Nothing: a cancel request meant for something else hit the probe twice.
    Inconclusive,
    /// Not waited for any more: the monitor may have nothing left to watch, or every lock of
    /// the batch has timed out.
    Abandoned,
}

fn classify(error: &tokio_postgres::Error) -> Verdict {
    let detail = error.to_string();
    if error.is_closed() {
        return Verdict::Lost(LossReason::ConnectionClosed { detail });
    }
    let Some(db) = error.as_db_error() else {
        return Verdict::Lost(LossReason::ProbeFailed { detail });
    };
    if matches!(db.severity(), "FATAL" | "PANIC") {
        return Verdict::Lost(LossReason::ConnectionClosed { detail });
    }
    match *db.code() {
        SqlState::IN_FAILED_SQL_TRANSACTION => Verdict::TransactionFailed,
        SqlState::QUERY_CANCELED => Verdict::Inconclusive,
        SqlState::ADMIN_SHUTDOWN
        | SqlState::CRASH_SHUTDOWN
        | SqlState::CANNOT_CONNECT_NOW
        | SqlState::IDLE_SESSION_TIMEOUT => Verdict::Lost(LossReason::ConnectionClosed { detail }),
        _ => Verdict::Lost(LossReason::ProbeFailed { detail }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_and_keepalives() {
        let default = HealthCheck::default();
        assert_eq!(default.detection_bound(), Duration::from_secs(2));
        assert_eq!(default.keepalive_timeout(), Duration::from_secs(10));
        assert_eq!(
            default.keepalive_params(),
            (
                Duration::from_secs(5),
                Duration::from_secs(1),
                10,
                Duration::from_secs(10)
            )
        );
        let slow = HealthCheck::new(Duration::from_secs(5), Duration::from_secs(3));
        assert_eq!(slow.detection_bound(), Duration::from_secs(8));
        assert_eq!(slow.keepalive_timeout(), Duration::from_secs(24));
        // A probe timeout longer than the interval delays the next probe.
        let long_probe = HealthCheck::new(Duration::from_millis(100), Duration::from_millis(300));
        assert_eq!(long_probe.detection_bound(), Duration::from_millis(600));
        let zero = HealthCheck::new(Duration::ZERO, Duration::ZERO);
        assert_eq!(zero.detection_bound(), Duration::from_millis(2));
        // The server must outlast the client: keepalive timeout > max(i, t) + bound.
        for h in [default, slow, long_probe, zero] {
            let s = h.sanitized();
            assert!(h.keepalive_timeout() > s.interval.max(s.probe_timeout) + h.detection_bound());
        }
    }

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

    #[test]
    fn client_keepalives_respect_the_url() {
        let mut config: Config = "postgres://h/db?keepalives_idle=30".parse().unwrap();
        HealthCheck::default().configure_client(&mut config);
        assert_eq!(config.get_keepalives_idle(), Duration::from_secs(30));
        assert_eq!(config.get_keepalives_retries(), Some(10));
        let mut off: Config = "postgres://h/db?keepalives=0".parse().unwrap();
        HealthCheck::default().configure_client(&mut off);
        assert_eq!(off.get_tcp_user_timeout(), None);
    }
}
