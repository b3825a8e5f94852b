//! Distributed locks on PostgreSQL advisory locks.
//!
//! Several instances of one service need exactly one of them to do something at a time: run
//! the migrations, run the scheduler, enter a critical section. [`AdvisoryLock`] takes a
//! PostgreSQL advisory lock on a connection from a [`deadpool_postgres::Pool`] or a shared
//! [`Session`], and returns an [`AdvisoryLockGuard`] that holds it until it is unlocked or
//! dropped.
//!
//! ```no_run
//! use pglock::{AdvisoryLock, AdvisoryLockGuard};
//!
//! # async fn demo(pool: deadpool_postgres::Pool) -> pglock::Result<()> {
//! let guard = AdvisoryLock::new(&pool, "migrations").lock().await?;
//! guard.batch_execute("CREATE TABLE IF NOT EXISTS t (id int)").await?;
//! AdvisoryLockGuard::unlock(guard).await?;
//! # Ok(()) }
//! ```
//!
//! - Acquire: [`lock`](AdvisoryLock::lock), [`try_lock`](AdvisoryLock::try_lock) (busy is
//!   `Ok(None)`), [`try_lock_for`](AdvisoryLock::try_lock_for) (a server-side deadline), and
//!   their `_shared` forms; [`LockScope`] session or transaction; [`WaitStrategy`] blocking or
//!   polling.
//! - Every acquisition is cancel-safe; release on drop is pipelined and never leaves a lock on
//!   a pooled connection.
//! - A [`Session`] is shared by default: other tasks may run their statements on it, so its
//!   waits poll and pglock never sends it a cancel request. A session that one task uses is
//!   declared [`dedicated`](Session::dedicated): its waits queue in the server, first come
//!   first served.
//! - [`AdvisoryKey`]: names hashed by a documented, stable function, numeric keys, and the
//!   keys of other tools.
//! - [`LeaderElection`]: one leader at a time among any number of instances, a task that stops
//!   when the leadership is lost, and fencing terms that strictly increase with every leader
//!   (guide: `docs/leader-election.md`).
//! - Scale: [`CohortLock`] queues the tasks of one process in memory and hands the lock
//!   between them without a round trip; [`LockSet`] holds thousands of locks on a few pipelined
//!   connections (figures and sizing: `docs/performance.md`).
//! - [`Semaphore`]: at most `n` holders of a name across the fleet, each with a
//!   [`SemaphorePermit`] on one of `n` slots; waiters queue in arrival order and cost the
//!   server nothing but the head's one statement a second (guide: `docs/semaphores.md`).
//!
//! The guarantees and the reasons behind them are in `docs/design.md` of the repository.
#![doc = include_str!("lib.md")]
#![deny(missing_docs)]
#![forbid(unsafe_code)]
#![warn(unreachable_pub, rustdoc::broken_intra_doc_links)]

// The layers, from the bottom up (docs/design.md, "Layout"): each imports only from itself and
// the layers above it in this list, except that a connection keeps state of `loss`, `release`
// and `acquire` (its monitor, deferred unlocks and batched try_locks).
mod base {
    //! Foundations: keys, options, errors, connection strings, SQL text, tracing events and small
    //! runtime utilities. They import nothing of the crate but each other (and `metrics`).
    pub(crate) mod background;
    pub(crate) mod cancel;
    pub(crate) mod database_url;
    pub(crate) mod error;
    pub(crate) mod health;
    pub(crate) mod key;
    pub(crate) mod loss;
    pub(crate) mod scope;
    pub(crate) mod sql;
    pub(crate) mod trace;
}
#[cfg(feature = "metrics")]
pub mod metrics;
mod conn {
    //! Connections: pooled ones and sessions, where a lock gets one, and which backend it is.
    pub(crate) mod backend;
    pub(crate) mod handle;
    pub(crate) mod held;
    pub(crate) mod pooled;
    pub(crate) mod prepared;
    pub(crate) mod session;
    pub(crate) mod source;
}
mod loss {
    //! Lock-loss detection: a monitor per connection and its probes.
    pub(crate) mod monitor;
    pub(crate) mod probe;
}
mod release {
    //! Release: the statements that end a lock, and what a dropped guard leaves to the next
    //! acquisition on its connection.
    pub(crate) mod background;
    pub(crate) mod deferred;
    pub(crate) mod flush;
    pub(crate) mod in_flight;
    pub(crate) mod parking;
    pub(crate) mod statement;
    pub(crate) mod together;
}
mod guard;
mod acquire {
    //! Acquisition: the attempts that send a lock's statement, and the batched `try_lock`s of
    //! a shared session.
    pub(crate) mod acquirer;
    pub(crate) mod attempt;
    pub(crate) mod try_lock_queue;
}
// The public types that stand on the layers.
mod cohort;
pub mod introspect;
mod leader;
mod lock;
mod lock_set;
mod semaphore;
#[cfg(feature = "rustls")]
pub mod tls;

pub use base::database_url::{redact_url, DatabaseUrl, UrlForm};
pub use base::error::{Error, Result, TlsFailure};
pub use base::health::HealthCheck;
pub use base::key::AdvisoryKey;
pub use base::loss::{LossReason, LossSignal};
pub use base::scope::{LockMode, LockScope, WaitStrategy};
pub use cohort::{CohortGuard, CohortLock};
pub use conn::session::Session;
pub use conn::source::ConnectionSource;
pub use guard::AdvisoryLockGuard;
pub use leader::{LeaderContext, LeaderElection, LeaderState, Leadership, TermTable};
pub use lock::AdvisoryLock;
pub use lock_set::LockSet;
pub use semaphore::{Semaphore, SemaphorePermit};

/// The Rust examples in the guides of `docs/`, compiled (and run, where they need no server)
/// by `cargo test --doc`, so that the guides stay true to the API.
#[cfg(doctest)]
mod guides {
    #[doc = include_str!("../docs/pgbouncer.md")]
    struct PgBouncer;
    #[doc = include_str!("../docs/tls.md")]
    struct Tls;
    #[doc = include_str!("../docs/schedulers.md")]
    struct Schedulers;
    #[doc = include_str!("../docs/choosing-keys.md")]
    struct ChoosingKeys;
    #[doc = include_str!("../docs/migrations.md")]
    struct Migrations;
    #[doc = include_str!("../docs/observability.md")]
    struct Observability;
    #[doc = include_str!("../docs/semaphores.md")]
    struct Semaphores;
}
