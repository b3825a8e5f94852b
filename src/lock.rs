//! [`AdvisoryLock`]: a key, where its connection comes from, and the ways to acquire it.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::acquire::acquirer::{Acquirer, Deadline};
use crate::base::error::Result;
use crate::base::health::HealthCheck;
use crate::base::key::AdvisoryKey;
use crate::base::scope::{LockMode, LockScope, WaitStrategy};
use crate::base::trace;
use crate::conn::source::ConnectionSource;
use crate::guard::AdvisoryLockGuard;

/// A named (or numbered) advisory lock and where to take it.
///
/// Cheap to clone; it holds nothing on the server. Each acquisition returns an
/// [`AdvisoryLockGuard`] that holds the lock until it is dropped or unlocked.
///
/// | method | waits | busy result |
/// |---|---|---|
/// | [`lock`](Self::lock) / [`lock_shared`](Self::lock_shared) | until granted | — |
/// | [`try_lock`](Self::try_lock) / [`try_lock_shared`](Self::try_lock_shared) | never | `Ok(None)` |
/// | [`try_lock_for`](Self::try_lock_for) / [`try_lock_until`](Self::try_lock_until) (and `_shared_`) | until the deadline | `Ok(None)` |
///
/// # Examples
///
/// ```no_run
/// # async fn demo(pool: deadpool_postgres::Pool) -> pglock::Result<()> {
/// use std::time::Duration;
/// use pglock::{AdvisoryLock, AdvisoryLockGuard};
///
/// let lock = AdvisoryLock::new(&pool, "migrations");
/// match lock.try_lock_for(Duration::from_secs(30)).await? {
///     Some(guard) => {
///         guard.batch_execute("CREATE TABLE IF NOT EXISTS t (id int)").await?;
///         AdvisoryLockGuard::unlock(guard).await?;
///     }
///     None => eprintln!("another instance held the lock for 30 s"),
/// }
/// # Ok(()) }
/// ```
///
/// # Re-entrancy
///
/// PostgreSQL counts session locks per session: locking a key twice on one session needs two
/// unlocks. pglock never does that. On a pool every acquisition uses its own connection, so a
/// second acquisition of a held key, even from the same task, waits like any other session
/// (and would wait forever for a holder in the same task: drop the first guard first). On a
/// [`Session`](crate::Session), asking for a key the session holds waits in-process until the
/// guard that holds it is dropped (`try_lock` answers `Ok(None)`), without stacking it.
///
/// # Sessions
///
/// On a shared [`Session`](crate::Session) (the default) waits poll and transaction scope is
/// refused, so that nothing pglock does reaches another task's statements; a session declared
/// [`dedicated`](crate::Session::dedicated) waits in the server's queue. See the `Session`
/// docs.
#[derive(Clone, Debug)]
pub struct AdvisoryLock {
    acquirer: Acquirer,
}

/// `$lock.acquire($mode, $deadline).await`, measured for the metrics (`trace::Measure`, empty
/// without the `metrics` feature) in the caller's own future: a wrapping future would cost
/// every lock a copy of the acquisition's future.
macro_rules! measured {
    ($lock:expr, $mode:expr, $deadline:expr) => {{
        let (mode, deadline) = ($mode, $deadline);
        let measure = trace::Measure::start();
        let result = $lock.acquirer.acquire(mode, deadline).await;
        measure.ended(mode, matches!(deadline, Deadline::At(_)), &result);
        result
    }};
}

impl AdvisoryLock {
    /// A session-scoped lock on `key`, taken on connections from `source`.
    ///
    /// `source` is a [`deadpool_postgres::Pool`] (or `&Pool`), or an `Arc<`[`Session`](crate::Session)`>`;
    /// `key` is anything that converts into an [`AdvisoryKey`]: a name (`&str`, hashed with
    /// [`AdvisoryKey::from_name`]), an `i64`, or an `(i32, i32)` pair.
    pub fn new(source: impl Into<ConnectionSource>, key: impl Into<AdvisoryKey>) -> Self {
        let source = source.into();
        let parking = source.is_pool().then(Arc::default);
        AdvisoryLock {
            acquirer: Acquirer {
                source,
                key: key.into(),
                scope: LockScope::Session,
                wait: WaitStrategy::Block,
                health: None,
                parking,
            },
        }
    }

    /// Sets how long the lock is held: for the session (the default) or for a transaction.
    pub fn scope(mut self, scope: LockScope) -> Self {
        self.acquirer.scope = scope;
        self
    }

    /// Sets how a blocked acquisition waits (the default is [`WaitStrategy::Block`]).
    pub fn wait_strategy(mut self, wait: WaitStrategy) -> Self {
        self.acquirer.wait = wait;
        self
    }

    /// Sets how the guards of this lock watch for its loss (the default is
    /// [`HealthCheck::default`]: a probe every second, each given a second to answer).
    ///
    /// It applies to guards on pooled connections; a [`Session`](crate::Session)'s own
    /// [`with_health_check`](crate::Session::with_health_check) takes precedence for locks on
    /// that session, since one probe serves all of them (a session without one uses the health
    /// check of the lock whose guard first asks). Nothing is probed until a guard's
    /// [`loss_signal`](AdvisoryLockGuard::loss_signal) or
    /// [`is_lost`](AdvisoryLockGuard::is_lost) is first called.
    pub fn health_check(mut self, health: HealthCheck) -> Self {
        self.acquirer.health = Some(Arc::new(health));
        self
    }

    /// The lock's key.
    pub fn key(&self) -> AdvisoryKey {
        self.acquirer.key
    }

    /// This lock without the parking of dropped guards' connections: for a lock whose guard
    /// shares its connection with another guard (a semaphore's queue key), so that a drop never
    /// offers a connection still in use to the next acquisition.
    pub(crate) fn without_parking(mut self) -> Self {
        self.acquirer.parking = None;
        self
    }

    pub(crate) fn lock_scope(&self) -> LockScope {
        self.acquirer.scope
    }

    /// Acquires the lock exclusively, waiting as long as it takes.
    ///
    /// # Errors
    ///
    /// [`Error::PoolExhausted`](crate::Error::PoolExhausted) and other pool errors, [`Error::ConnectionLost`](crate::Error::ConnectionLost),
    /// [`Error::Deadlock`](crate::Error::Deadlock) if the server's deadlock detector ends the wait,
    /// [`Error::Cancelled`](crate::Error::Cancelled) if the wait is cancelled on the server, [`Error::ReadOnlyStandby`](crate::Error::ReadOnlyStandby),
    /// [`Error::TransactionOnSharedSession`](crate::Error::TransactionOnSharedSession) for transaction scope on a shared
    /// [`Session`](crate::Session), [`Error::UnexpectedAnswer`](crate::Error::UnexpectedAnswer) if the statement's answer comes
    /// back without its row (never from PostgreSQL itself).
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: if the future is dropped at any point, no lock is left held and no waiter is
    /// left in the server's queue. A wait in progress is cancelled on the server by a cancel
    /// request, repeated until the statement has ended (PostgreSQL ignores one that arrives
    /// before the statement has started); the pooled connection is then closed. If the grant
    /// crossed the cancellation, the lock is released again. All of this runs in a background
    /// task, so dropping the future returns at once. On a shared [`Session`](crate::Session)
    /// nothing waits on the server, so no cancel request is sent: the attempt in flight is
    /// undone by a conditional release queued behind it.
    pub async fn lock(&self) -> Result<AdvisoryLockGuard> {
        measured!(self, LockMode::Exclusive, Deadline::Never)
            .map(|guard| guard.expect("an acquisition without deadline returns a guard"))
    }

    /// Acquires the lock in shared mode, waiting as long as it takes.
    ///
    /// # Errors
    ///
    /// As [`lock`](Self::lock).
    ///
    /// # Cancel safety
    ///
    /// As [`lock`](Self::lock).
    pub async fn lock_shared(&self) -> Result<AdvisoryLockGuard> {
        measured!(self, LockMode::Shared, Deadline::Never)
            .map(|guard| guard.expect("an acquisition without deadline returns a guard"))
    }

    /// Tries once to acquire the lock exclusively; `Ok(None)` if it is busy.
    ///
    /// # Errors
    ///
    /// As [`lock`](Self::lock), except that it never waits, so never deadlocks.
    ///
    /// # Cancel safety
    ///
    /// As [`lock`](Self::lock).
    pub async fn try_lock(&self) -> Result<Option<AdvisoryLockGuard>> {
        measured!(self, LockMode::Exclusive, Deadline::Now)
    }

    /// Tries once to acquire the lock in shared mode; `Ok(None)` if an exclusive holder has it.
    ///
    /// # Errors
    ///
    /// As [`try_lock`](Self::try_lock).
    ///
    /// # Cancel safety
    ///
    /// As [`lock`](Self::lock).
    pub async fn try_lock_shared(&self) -> Result<Option<AdvisoryLockGuard>> {
        measured!(self, LockMode::Shared, Deadline::Now)
    }

    /// Acquires the lock exclusively, waiting at most `timeout`; `Ok(None)` if it stayed busy.
    ///
    /// The deadline is enforced by the server (`lock_timeout`, set for this one statement), so
    /// the lock can never be granted after this returns `Ok(None)`. Time spent waiting for a
    /// pooled connection counts against the timeout.
    ///
    /// # Errors
    ///
    /// As [`lock`](Self::lock).
    ///
    /// # Cancel safety
    ///
    /// As [`lock`](Self::lock).
    pub async fn try_lock_for(&self, timeout: Duration) -> Result<Option<AdvisoryLockGuard>> {
        self.try_lock_until(Instant::now() + timeout).await
    }

    /// Acquires the lock exclusively, waiting at most until `deadline`; `Ok(None)` if it stayed
    /// busy.
    ///
    /// # Errors
    ///
    /// As [`lock`](Self::lock).
    ///
    /// # Cancel safety
    ///
    /// As [`lock`](Self::lock).
    pub async fn try_lock_until(&self, deadline: Instant) -> Result<Option<AdvisoryLockGuard>> {
        measured!(self, LockMode::Exclusive, Deadline::At(deadline))
    }

    /// Acquires the lock in shared mode, waiting at most `timeout`; `Ok(None)` if it stayed busy.
    ///
    /// # Errors
    ///
    /// As [`lock`](Self::lock).
    ///
    /// # Cancel safety
    ///
    /// As [`lock`](Self::lock).
    pub async fn try_lock_shared_for(
        &self,
        timeout: Duration,
    ) -> Result<Option<AdvisoryLockGuard>> {
        self.try_lock_shared_until(Instant::now() + timeout).await
    }

    /// Acquires the lock in shared mode, waiting at most until `deadline`.
    ///
    /// # Errors
    ///
    /// As [`lock`](Self::lock).
    ///
    /// # Cancel safety
    ///
    /// As [`lock`](Self::lock).
    pub async fn try_lock_shared_until(
        &self,
        deadline: Instant,
    ) -> Result<Option<AdvisoryLockGuard>> {
        measured!(self, LockMode::Shared, Deadline::At(deadline))
    }
}
