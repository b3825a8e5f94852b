//! How a lock is held: its mode, its scope and how a blocked acquisition waits.

use std::time::Duration;

/// Exclusive or shared, as PostgreSQL's advisory lock modes.
///
/// Any number of sessions may hold a key in [`Shared`](LockMode::Shared) mode at once; an
/// [`Exclusive`](LockMode::Exclusive) holder excludes every other holder of the key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum LockMode {
    /// One holder at a time (`pg_advisory_lock`).
    #[default]
    Exclusive,
    /// Many shared holders, no exclusive one (`pg_advisory_lock_shared`).
    Shared,
}

/// How long PostgreSQL keeps the lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum LockScope {
    /// Until it is unlocked or the session ends (`pg_advisory_lock`).
    ///
    /// The guard unlocks on drop; if the unlock cannot be confirmed, the connection is
    /// closed instead, which ends the session and so frees the lock.
    #[default]
    Session,
    /// Until the transaction the guard opened ends (`pg_advisory_xact_lock`).
    ///
    /// The guard runs `BEGIN` with the lock, [`commit`](crate::AdvisoryLockGuard::commit) or
    /// [`rollback`](crate::AdvisoryLockGuard::rollback) end the transaction, and drop rolls it
    /// back. This is the scope that works behind a transaction-pooling PgBouncer.
    Transaction,
}

/// How [`lock`](crate::AdvisoryLock::lock) and
/// [`try_lock_for`](crate::AdvisoryLock::try_lock_for) wait while the key is busy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum WaitStrategy {
    /// Wait in PostgreSQL's lock queue (`pg_advisory_lock`): granted in queue order, one round
    /// trip once the key comes free. Dropping the future cancels the server-side wait.
    ///
    /// On a pool or a [`dedicated`](crate::Session::dedicated) session. A shared
    /// [`Session`](crate::Session) polls instead, as with [`WaitStrategy::poll`], so that no
    /// cancel request can reach another task's statement there.
    #[default]
    Block,
    /// Retry `pg_try_advisory_lock` with exponential backoff between `initial` and `max`.
    ///
    /// The session never sits in the lock queue, so PostgreSQL never sees it as waiting. Use it
    /// when the holder may itself wait for this session, as `CREATE INDEX CONCURRENTLY` waits
    /// for every open snapshot: a blocked waiter then deadlocks with the holder, a polling one
    /// does not. Waiters are not served in order.
    Poll {
        /// The first pause after a busy attempt.
        initial: Duration,
        /// The longest pause between attempts.
        max: Duration,
    },
}

impl WaitStrategy {
    /// Polling with pauses from 10 ms up to 1 s.
    pub const fn poll() -> Self {
        WaitStrategy::Poll {
            initial: Duration::from_millis(10),
            max: Duration::from_secs(1),
        }
    }
}
