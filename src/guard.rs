//! The RAII guard of a held advisory lock, and how it is released.

use std::fmt;
use std::ops::Deref;
use std::sync::{Arc, OnceLock};

use tokio_postgres::Client;

use crate::base::error::{Error, Result};
use crate::base::health::HealthCheck;
use crate::base::key::AdvisoryKey;
use crate::base::loss::LossSignal;
use crate::base::scope::{LockMode, LockScope};
use crate::base::sql::PreparedUnlock;
use crate::base::trace;
use crate::conn::handle::Conn;
use crate::conn::held::HeldConn;
use crate::conn::session::Reservation;
use crate::loss::monitor::Registration;
use crate::release::background::release_in_background_traced;
use crate::release::deferred::DeferredUnlock;
use crate::release::parking::Parking;
use crate::release::statement::{release, unlock_session, Release};

/// A held advisory lock. The lock is released when the guard is dropped.
///
/// The guard owns the connection the lock lives on (a pooled connection, or a share of a
/// [`Session`](crate::Session)) and derefs to its [`tokio_postgres::Client`], so the protected
/// work can run in the same session: for example migrations under a migration lock, or the
/// statements of a transaction-scoped lock's transaction.
///
/// # Release
///
/// - [`unlock`](Self::unlock) (or [`commit`](Self::commit) / [`rollback`](Self::rollback) for
///   transaction scope) releases now and reports errors.
/// - Dropping the guard releases in the background without blocking. A session lock's unlock
///   is sent as soon as the dropping task yields to the runtime, unless the next acquisition of
///   the same key in the same mode on that connection comes first: that acquisition then sends
///   one statement that releases and then acquires. Either way the release costs the caller no
///   round trip, and the unlock comes first, so a session waiting for the key in the server's
///   queue is granted it before this one asks again. (Your
///   own queries on a shared [`Session`](crate::Session), sent between the drop and that
///   moment, may run before the unlock.) A transaction-scoped lock's rollback is queued at
///   once. The release's answer is read by the next acquisition on the connection, alongside
///   its own statement, or else by a task. A pooled connection goes back to the pool only once
///   the release is confirmed; when it is not (an error, a lost connection, no runtime), the
///   connection is closed instead, and the server frees the lock as the session ends. Release
///   on drop is therefore not synchronous: for about one round trip after the drop, another
///   session may still see the key as held.
/// - On a pool, the dropped guard's connection is kept aside for the next acquisition of the
///   same [`AdvisoryLock`](crate::AdvisoryLock) (or of a clone), which sends its lock with the
///   unlock, on the same backend: a `lock` + drop loop costs one round trip and one statement
///   per cycle, on a pool as on a `Session`. After [`unlock`](Self::unlock) the released
///   connection is kept the same way until the task yields, so a `lock` + `unlock` loop stays
///   on one backend instead of checking out another connection each time. When other tasks
///   wait for a connection of the pool, the next acquisition leaves it to them and queues for
///   the pool. Keep one `AdvisoryLock` (cheap to clone) rather than building one per
///   acquisition to get this.
/// - If the connection dies while the guard is held, the server has already released the lock;
///   `unlock` then reports [`Error::ConnectionLost`] or [`Error::NotHeld`].
///
/// # Loss
///
/// A held lock can be lost without the guard's doing: the server ends the session, the network
/// path dies, someone runs `pg_advisory_unlock_all()` on the connection. [`loss_signal`](Self::loss_signal)
/// returns a [`LossSignal`] that fires when that happens, and [`is_lost`](Self::is_lost) checks
/// without waiting; both start a monitor that probes the connection (see [`HealthCheck`] for
/// the bound on detection time). Guards nobody asks about cost nothing. Taking the client
/// through the guard's `Deref` makes the next probes read the server's lock table, as a
/// statement of yours may have released the lock; an idle watched connection gets a probe that
/// costs the server what `SELECT 1` costs.
///
/// Operations on the guard are associated functions (`AdvisoryLockGuard::unlock(guard)`), so
/// they never shadow the methods of the `Client` it derefs to.
#[must_use = "if unused the lock is released immediately"]
#[clippy::has_significant_drop]
pub struct AdvisoryLockGuard {
    conn: Option<Conn>,
    key: AdvisoryKey,
    mode: LockMode,
    scope: LockScope,
    backend_pid: i32,
    unlock: Option<PreparedUnlock>,
    /// Dropped after the release is queued (fields drop after `Drop::drop`), or handed to the
    /// deferred unlock, which drops it once sent.
    reservation: Option<Reservation>,
    /// The health check asked for on the lock, if any (shared with the lock: a guard is moved
    /// through every layer of an acquisition, so it is kept small).
    health: Option<Arc<HealthCheck>>,
    /// This guard's place in its connection's loss monitor, from the first `loss_signal()`
    /// (boxed, as most guards never ask).
    loss: OnceLock<Box<Registration>>,
    /// Where a drop parks the pooled connection while its unlock is in flight, for the next
    /// acquisition of the same lock (see `release::parking`).
    parking: Option<Arc<Parking>>,
    /// The lock's place in the metrics (nothing without the `metrics` feature).
    #[allow(dead_code, reason = "kept for what its drop records")]
    held: trace::Held,
}

impl AdvisoryLockGuard {
    pub(crate) fn new(
        conn: Conn,
        reservation: Reservation,
        mode: LockMode,
        backend_pid: i32,
        unlock: Option<PreparedUnlock>,
    ) -> Self {
        let (key, scope) = (reservation.key(), reservation.scope());
        AdvisoryLockGuard {
            conn: Some(conn),
            key,
            mode,
            scope,
            backend_pid,
            unlock,
            reservation: Some(reservation),
            health: None,
            loss: OnceLock::new(),
            parking: None,
            held: trace::Held::start(),
        }
    }

    pub(crate) fn with_health_check(mut self, health: Option<&Arc<HealthCheck>>) -> Self {
        self.health = health.cloned();
        self
    }

    /// Lets a drop hand the connection to the next acquisition of the lock (pooled session
    /// locks only: a shared session pipelines by itself, and a transaction ends differently).
    pub(crate) fn with_parking(mut self, parking: Option<&Arc<Parking>>) -> Self {
        let eligible = self.scope == LockScope::Session
            && self.unlock.is_some()
            && self.conn.as_ref().is_some_and(Conn::is_pooled);
        self.parking = parking.filter(|_| eligible).cloned();
        self
    }

    /// The key of the held lock.
    pub fn key(this: &Self) -> AdvisoryKey {
        this.key
    }

    /// Whether the lock is held exclusively or shared.
    pub fn mode(this: &Self) -> LockMode {
        this.mode
    }

    /// Whether the lock lasts for the session or for the guard's transaction.
    pub fn scope(this: &Self) -> LockScope {
        this.scope
    }

    /// The process id of the PostgreSQL backend that holds the lock (as in `pg_locks.pid`).
    pub fn backend_pid(this: &Self) -> i32 {
        this.backend_pid
    }

    /// A signal that fires when this lock is lost, for `tokio::select!` around protected work.
    ///
    /// The first call (of this or [`is_lost`](Self::is_lost)) starts watching the lock: the
    /// connection's monitor probes it at once and then every [`HealthCheck::interval`], and a
    /// connection's monitor serves all the locks held on it with one probe. Loss is reported at
    /// most [`HealthCheck::detection_bound`] after it happens (or after this first call, if it
    /// happened before); a release by a statement of yours sent through a `&Client` kept longer
    /// than one interval, within [`HealthCheck::full_check_bound`]. See [`LossSignal`] for what
    /// counts as loss.
    ///
    /// The signal outlives the guard: once the guard is released or dropped, it reports
    /// [`LossReason::Released`](crate::LossReason::Released).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo(pool: deadpool_postgres::Pool) -> pglock::Result<()> {
    /// # async fn work() {}
    /// use pglock::{AdvisoryLock, AdvisoryLockGuard};
    ///
    /// let guard = AdvisoryLock::new(&pool, "nightly-report").lock().await?;
    /// let mut lost = AdvisoryLockGuard::loss_signal(&guard);
    /// tokio::select! {
    ///     reason = lost.lost() => eprintln!("stopped: {reason}"),
    ///     () = work() => AdvisoryLockGuard::unlock(guard).await?,
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Panics
    ///
    /// If called outside a Tokio runtime when the monitor must be started.
    pub fn loss_signal(this: &Self) -> LossSignal {
        this.registration().signal()
    }

    /// Whether the lock is known to be lost, without waiting.
    ///
    /// Cheap: it reads the state the monitor keeps (and whether the connection is closed). The
    /// first call starts the monitor, as [`loss_signal`](Self::loss_signal) does, so a lock
    /// lost before it is only reported once the first probe has answered.
    ///
    /// # Panics
    ///
    /// As [`loss_signal`](Self::loss_signal).
    pub fn is_lost(this: &Self) -> bool {
        let registration = this.registration();
        if registration.is_lost() {
            return true;
        }
        if this.pglock_client().is_closed() {
            registration.report_closed();
            return true;
        }
        false
    }

    /// The client, for pglock's own statements: unlike `Deref`, not counted as handed out to
    /// the caller (see `Conn::borrows`).
    pub(crate) fn pglock_client(&self) -> &Client {
        self.conn
            .as_ref()
            .expect("a guard holds its connection until released")
            .client()
    }

    /// The connection the lock is held on.
    pub(crate) fn conn(&self) -> &Conn {
        self.conn
            .as_ref()
            .expect("a guard holds its connection until released")
    }

    fn registration(&self) -> &Registration {
        self.loss.get_or_init(|| {
            let conn = self
                .conn
                .as_ref()
                .expect("a guard holds its connection until released");
            Box::new(Registration::new(
                conn,
                self.key,
                self.mode,
                self.scope,
                self.backend_pid,
                self.health.as_deref().copied(),
            ))
        })
    }

    /// Stops watching the lock before it is released: the signal then reports `Released`.
    fn stop_watching(&mut self) {
        if let Some(registration) = self.loss.take() {
            registration.released();
        }
    }

    /// Releases the lock now and reports how it went.
    ///
    /// For a session lock this runs `pg_advisory_unlock`; for a transaction-scoped lock it
    /// commits the transaction, like [`commit`](Self::commit).
    ///
    /// # Errors
    ///
    /// - [`Error::NotHeld`] if the session no longer held the lock (it was lost before);
    /// - [`Error::ConnectionLost`] if the connection is gone (so is the lock);
    /// - [`Error::RolledBack`] for a transaction-scoped lock whose transaction had failed:
    ///   PostgreSQL rolled it back instead of committing it;
    /// - [`Error::UnexpectedAnswer`] if the unlock's answer comes back without its row (never
    ///   from PostgreSQL itself);
    /// - [`Error::Postgres`] for any other failure.
    ///
    /// On any error a pooled connection is closed rather than returned to the pool, so nothing
    /// can stay locked on it. After a confirmed release, the connection returns to the pool
    /// when the calling task next yields to the runtime, unless the next acquisition of the
    /// same [`AdvisoryLock`](crate::AdvisoryLock) (or a clone) takes it first, as after a drop.
    ///
    /// # Cancel safety
    ///
    /// If the future is dropped before it completes, the release still happens in the
    /// background, as when the guard is dropped.
    pub async fn unlock(mut this: Self) -> Result<()> {
        let held = this.begin_release();
        // A session unlock without the `Release` it would take: the hot path of a `lock` +
        // `unlock` cycle.
        let result = match (this.scope, &this.unlock) {
            (LockScope::Session, Some(unlock)) => {
                unlock_session(held.conn(), unlock, this.backend_pid, this.mode, this.key).await
            }
            _ => release(held.conn(), &Release::Commit, this.key).await,
        };
        this.end_release(held, "unlock", result)
    }

    /// Commits the transaction of a transaction-scoped lock, which releases the lock.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] if the guard holds a session lock; otherwise as
    /// [`unlock`](Self::unlock).
    ///
    /// # Cancel safety
    ///
    /// As [`unlock`](Self::unlock): once called, the commit is sent even if the future is
    /// dropped.
    pub async fn commit(mut this: Self) -> Result<()> {
        this.require_transaction("commit")?;
        this.release_now(Release::Commit).await
    }

    /// Rolls back the transaction of a transaction-scoped lock, which releases the lock.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] if the guard holds a session lock; otherwise as
    /// [`unlock`](Self::unlock).
    ///
    /// # Cancel safety
    ///
    /// As [`unlock`](Self::unlock).
    pub async fn rollback(mut this: Self) -> Result<()> {
        this.require_transaction("rollback")?;
        this.release_now(Release::Rollback).await
    }

    /// Gives up the guard without releasing the lock.
    ///
    /// The connection is detached from its pool and kept open for the rest of the process, so
    /// the lock stays held until the process exits or the server ends the session. On a shared
    /// [`Session`](crate::Session) the key stays marked as held.
    pub fn leak(mut this: Self) {
        this.stop_watching();
        trace::leaked(this.key, this.backend_pid);
        std::mem::forget(this.reservation.take());
        if let Some(conn) = this.conn.take() {
            conn.leak();
        }
    }

    fn require_transaction(&self, what: &str) -> Result<()> {
        match self.scope {
            LockScope::Transaction => Ok(()),
            LockScope::Session => Err(Error::Config(format!(
                "{what} applies to transaction-scoped locks; release a session lock with unlock"
            ))),
        }
    }

    /// The release this guard needs: its session unlock (taken from it), or `end_transaction`.
    fn release_kind(&mut self, end_transaction: Release) -> Release {
        match (&self.scope, self.unlock.take()) {
            (LockScope::Session, Some(unlock)) => {
                Release::Unlock(unlock, self.backend_pid, self.mode)
            }
            _ => end_transaction,
        }
    }

    async fn release_now(&mut self, how: Release) -> Result<()> {
        let held = self.begin_release();
        let result = release(held.conn(), &how, self.key).await;
        self.end_release(held, how.name(), result)
    }

    /// The guard's connection, to release the lock on, once the loss monitor stops watching.
    fn begin_release(&mut self) -> HeldConn {
        self.stop_watching();
        let conn = self
            .conn
            .take()
            .expect("a guard holds its connection until released");
        // If the release's future is dropped mid-way, the held closes a pooled connection: the
        // release request was already queued, and closing ends the session in any case.
        HeldConn::new(conn)
    }

    /// Reports how the release went, and sends the connection on: parked for the lock's next
    /// acquisition, back to its pool, or closed when the release failed.
    fn end_release(&mut self, held: HeldConn, how: &'static str, result: Result<()>) -> Result<()> {
        trace::released(self.key, self.backend_pid, how, &result, false);
        match &self.parking {
            Some(parking) if result.is_ok() => parking.park_idle(held.into_conn()),
            _ => held.finish(result.is_ok()),
        }
        result
    }
}

impl Drop for AdvisoryLockGuard {
    fn drop(&mut self) {
        self.stop_watching();
        let Some(conn) = self.conn.take() else {
            return;
        };
        let release = self.release_kind(Release::Rollback);
        let parking = self.parking.take();
        // A session unlock on a shared session, or on a pooled connection the next acquisition
        // of the lock may claim, waits for that acquisition (see `release::deferred::DeferredUnlock`).
        let deferrable = parking.is_some() || matches!(conn, Conn::Session(_));
        match release {
            Release::Unlock(unlock, granted_on, mode) if deferrable => {
                let reservation = self.reservation.take();
                DeferredUnlock::new(
                    conn,
                    self.key,
                    mode,
                    granted_on,
                    unlock,
                    reservation,
                    parking,
                )
                .defer();
            }
            release => release_in_background_traced(
                conn,
                release,
                self.key,
                Some(self.backend_pid),
                parking,
            ),
        }
    }
}

impl Deref for AdvisoryLockGuard {
    type Target = Client;

    fn deref(&self) -> &Client {
        self.conn
            .as_ref()
            .expect("a guard holds its connection until released")
            .user_client()
    }
}

impl trace::Granted for AdvisoryLockGuard {
    fn backend_pid(&self) -> i32 {
        AdvisoryLockGuard::backend_pid(self)
    }
}

impl fmt::Debug for AdvisoryLockGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdvisoryLockGuard")
            .field("key", &self.key)
            .field("mode", &self.mode)
            .field("scope", &self.scope)
            .field("backend_pid", &self.backend_pid)
            .finish()
    }
}
