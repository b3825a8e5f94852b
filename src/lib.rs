//! pglock: distributed locks on PostgreSQL advisory locks.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod key;

pub use key::AdvisoryKey;
