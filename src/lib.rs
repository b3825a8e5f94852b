//! pglock: distributed locks on PostgreSQL advisory locks.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod connection;
mod error;
mod guard;
mod key;
mod lock;
mod loss;
mod scope;
mod sql;

pub use connection::{ConnectionSource, Session};
pub use error::{redact_url, Error, Result};
pub use guard::AdvisoryLockGuard;
pub use key::AdvisoryKey;
pub use lock::AdvisoryLock;
pub use loss::{HealthCheck, LossReason, LossSignal};
pub use scope::{LockMode, LockScope, WaitStrategy};
