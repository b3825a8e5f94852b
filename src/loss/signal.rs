//! What a holder learns of a loss: [`LossSignal`], and the [`LossReason`] it reports.

use std::fmt;
use std::time::Duration;

use tokio::sync::watch;

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
/// within [`HealthCheck::detection_bound`](crate::HealthCheck::detection_bound), except a lock released by a statement you sent
/// through a `&Client` kept for longer than one interval: within
/// [`HealthCheck::full_check_bound`](crate::HealthCheck::full_check_bound) (see [`HealthCheck`](crate::HealthCheck)).
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
    pub(crate) fn new(reason: watch::Receiver<Option<LossReason>>) -> Self {
        LossSignal { reason }
    }

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
