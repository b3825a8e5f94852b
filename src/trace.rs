//! The `tracing` events pglock emits (target `pglock`).
//!
//! Nothing is printed unless the application installs a `tracing` subscriber. With none, or with
//! `pglock` filtered out, each event costs a check of a cached flag: field values are neither
//! computed nor formatted, nothing is allocated, and the wait-time clock is not even read.
//!
//! The same points record pglock's metrics (`crate::metrics`) with the `metrics` feature;
//! without it, nothing of them is compiled in: [`Measure`] and [`Held`] are empty.
//!
//! Each acquisition runs in a DEBUG span `acquire` (fields `key`, `mode`, `scope`), and its
//! events below are recorded inside it.
//!
//! | event | level | fields |
//! |---|---|---|
//! | `advisory lock busy, polling again` | TRACE | `key`, `backend_pid`, `pause_ms` |
//! | `advisory lock granted` | DEBUG | `key`, `mode`, `scope`, `backend_pid`, `wait_ms` |
//! | `advisory lock busy` (try/timeout gave up) | DEBUG | `key`, `mode`, `scope`, `wait_ms` |
//! | `advisory lock not acquired` (an error) | DEBUG | `key`, `wait_ms`, `error` |
//! | `advisory lock released` | DEBUG | `key`, `backend_pid`, `how` (`unlock`, `commit`, `rollback`, `drop`) |
//! | `advisory lock release failed` | WARN on drop, DEBUG when returned | `key`, `backend_pid`, `error` |
//! | `advisory lock acquisition abandoned` | DEBUG | `key`, `scope` |
//! | `advisory lock leaked on purpose` | DEBUG | `key`, `backend_pid` |
//! | `backend changed under advisory lock` | WARN | `key`, `error` |
//! | `the unlock queued before this acquisition failed; ...` | DEBUG | `key` |
//! | `pglock's prepared statements were deallocated on a direct connection; ...` | DEBUG | `key` |
//! | `advisory lock lost` | WARN | `key`, `backend_pid`, `reason` |
//! | `leadership acquired` | INFO | `name`, `key`, `term`, `backend_pid` |
//! | `leadership lost` | WARN | `name`, `key`, `term`, `reason` |
//! | `leadership released` | INFO | `name`, `key`, `term`, `how` (`step_down`, `drop`) |

use std::time::Instant;

use tracing::Level;

use crate::error::Error;
use crate::key::AdvisoryKey;
use crate::loss::signal::LossReason;
use crate::scope::{LockMode, LockScope};

/// The target of every pglock event, for filters (`RUST_LOG=pglock=debug`).
pub(crate) const TARGET: &str = "pglock";

/// Whether acquisitions get their span and their outcome's event: only when a subscriber
/// wants pglock's DEBUG events.
///
/// Checked before anything else is built, because a disabled span is not free: with the `log`
/// feature of `tracing` on (sqlx, among others, turns it on in any build that uses it), it is
/// built with its metadata, records its fields and logs its entry and exit, about 400
/// instructions per acquisition. An outcome's WARN event (`backend changed under advisory
/// lock`) is emitted either way.
#[inline]
pub(crate) fn acquisitions_traced() -> bool {
    tracing::enabled!(target: TARGET, Level::DEBUG)
}

/// Measures a wait, only when DEBUG events of pglock are enabled.
pub(crate) struct Timer(Option<Instant>);

impl Timer {
    #[inline]
    pub(crate) fn start() -> Self {
        Timer(tracing::enabled!(target: TARGET, Level::DEBUG).then(Instant::now))
    }

    fn wait_ms(&self) -> u64 {
        self.0
            .map(|start| u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0)
    }
}

/// An acquisition's measure for the metrics, from its start: counted in `pglock_locks_waiting`
/// until it is dropped (however the acquisition ends), and timed for `pglock_lock_wait_seconds`.
/// Nothing without the `metrics` feature.
pub(crate) struct Measure {
    #[cfg(feature = "metrics")]
    waiting: crate::metrics::Waiting,
}

impl Measure {
    #[inline]
    pub(crate) fn start() -> Self {
        Measure {
            #[cfg(feature = "metrics")]
            waiting: crate::metrics::Waiting::start(),
        }
    }

    /// Records how the acquisition ended (`has_deadline`: a `try_lock_for` or `_until`, whose
    /// busy end is a time-out).
    #[inline]
    pub(crate) fn ended<G>(
        self,
        mode: LockMode,
        has_deadline: bool,
        result: &crate::Result<Option<G>>,
    ) {
        #[cfg(feature = "metrics")]
        {
            use crate::metrics::Outcome;
            let outcome = match result {
                Ok(Some(_)) => Outcome::Granted,
                Ok(None) if has_deadline => Outcome::TimedOut,
                Ok(None) => Outcome::Busy,
                Err(_) => Outcome::Failed,
            };
            crate::metrics::acquired(mode, outcome, self.waiting.elapsed());
        }
        #[cfg(not(feature = "metrics"))]
        let _ = (mode, has_deadline, result);
    }
}

/// A held lock's place in the metrics, kept by its guard from the grant to its release (with
/// the `metrics` feature; without it, nothing).
#[cfg(feature = "metrics")]
pub(crate) use crate::metrics::Held;

/// A held lock's place in the metrics: nothing without the `metrics` feature.
#[cfg(not(feature = "metrics"))]
pub(crate) struct Held;

#[cfg(not(feature = "metrics"))]
impl Held {
    #[inline]
    pub(crate) fn start() -> Self {
        Held
    }
}

/// The span of one acquisition (DEBUG, `acquire`, with `key`, `mode`, `scope`): the events of
/// its wait, grant or failure happen inside it. Disabled, it costs a check of a cached flag.
#[inline]
pub(crate) fn acquire_span(key: AdvisoryKey, mode: LockMode, scope: LockScope) -> tracing::Span {
    tracing::debug_span!(target: TARGET, "acquire", key = %key, mode = ?mode, scope = ?scope)
}

/// What the events of a grant say of the guard (implemented by the guard, so that this module
/// stays below it).
pub(crate) trait Granted {
    /// The backend that holds the lock.
    fn backend_pid(&self) -> i32;
}

/// How an acquisition ended.
pub(crate) fn acquired<G: Granted>(
    key: AdvisoryKey,
    mode: LockMode,
    scope: LockScope,
    result: &crate::Result<Option<G>>,
    timer: &Timer,
) {
    match result {
        Ok(Some(guard)) => tracing::debug!(
            target: TARGET,
            key = %key,
            mode = ?mode,
            scope = ?scope,
            backend_pid = guard.backend_pid(),
            wait_ms = timer.wait_ms(),
            "advisory lock granted"
        ),
        Ok(None) => tracing::debug!(
            target: TARGET,
            key = %key,
            mode = ?mode,
            scope = ?scope,
            wait_ms = timer.wait_ms(),
            "advisory lock busy"
        ),
        // Reported as it happened, at WARN, whether a subscriber wants DEBUG events or not.
        Err(Error::BackendChanged { .. }) => {}
        Err(error) => tracing::debug!(
            target: TARGET,
            key = %key,
            wait_ms = timer.wait_ms(),
            error = %error,
            "advisory lock not acquired"
        ),
    }
}

/// A polling wait found the key busy (`backend_pid`: the session that asked, when known).
#[inline]
pub(crate) fn polling(key: AdvisoryKey, backend_pid: Option<i32>, pause: std::time::Duration) {
    tracing::trace!(
        target: TARGET,
        key = %key,
        backend_pid,
        pause_ms = u64::try_from(pause.as_millis()).unwrap_or(u64::MAX),
        "advisory lock busy, polling again"
    );
}

/// A release ended, now or in the background (`background`: nobody else sees its error).
pub(crate) fn released(
    key: AdvisoryKey,
    backend_pid: i32,
    how: &'static str,
    result: &crate::Result<()>,
    background: bool,
) {
    match result {
        Ok(()) => tracing::debug!(
            target: TARGET,
            key = %key,
            backend_pid,
            how,
            "advisory lock released"
        ),
        Err(error @ Error::BackendChanged { .. }) => backend_changed(key, error),
        Err(error) if background => tracing::warn!(
            target: TARGET,
            key = %key,
            backend_pid,
            error = %error,
            "advisory lock release failed; the connection is closed, so the server frees the lock"
        ),
        Err(error) => tracing::debug!(
            target: TARGET,
            key = %key,
            backend_pid,
            error = %error,
            "advisory lock release failed"
        ),
    }
}

pub(crate) fn backend_changed(key: AdvisoryKey, error: &Error) {
    tracing::warn!(target: TARGET, key = %key, error = %error, "backend changed under advisory lock");
}

#[inline]
pub(crate) fn abandoned(key: AdvisoryKey, scope: LockScope) {
    tracing::debug!(
        target: TARGET,
        key = %key,
        scope = ?scope,
        "advisory lock acquisition abandoned; cancelling it on the server"
    );
}

pub(crate) fn cancel_repeated(key: AdvisoryKey, pause: std::time::Duration) {
    tracing::debug!(
        target: TARGET,
        key = %key,
        after_ms = pause.as_millis() as u64,
        "abandoned advisory lock statement still running; sending another cancel request"
    );
}

pub(crate) fn leaked(key: AdvisoryKey, backend_pid: i32) {
    tracing::debug!(target: TARGET, key = %key, backend_pid, "advisory lock leaked on purpose");
}

/// The loss monitor found a watched lock gone.
pub(crate) fn lock_lost(key: AdvisoryKey, backend_pid: i32, reason: &LossReason) {
    tracing::warn!(target: TARGET, key = %key, backend_pid, reason = %reason, "advisory lock lost");
    #[cfg(feature = "metrics")]
    crate::metrics::lock_lost(reason);
}

pub(crate) fn leadership_acquired(name: &str, key: AdvisoryKey, term: i64, backend_pid: i32) {
    tracing::info!(target: TARGET, name, key = %key, term, backend_pid, "leadership acquired");
    #[cfg(feature = "metrics")]
    crate::metrics::leadership(name, Some(term));
}

pub(crate) fn leadership_lost(name: &str, key: AdvisoryKey, term: i64, reason: &LossReason) {
    tracing::warn!(target: TARGET, name, key = %key, term, reason = %reason, "leadership lost");
    #[cfg(feature = "metrics")]
    crate::metrics::leadership(name, None);
}

pub(crate) fn leadership_released(name: &str, key: AdvisoryKey, term: i64, how: &'static str) {
    tracing::info!(target: TARGET, name, key = %key, term, how, "leadership released");
    #[cfg(feature = "metrics")]
    crate::metrics::leadership(name, None);
}

pub(crate) fn prior_release_failed(key: AdvisoryKey) {
    tracing::debug!(
        target: TARGET,
        key = %key,
        "the unlock queued before this acquisition failed; closing that connection and acquiring on another"
    );
}

pub(crate) fn statements_deallocated(key: AdvisoryKey) {
    tracing::debug!(
        target: TARGET,
        key = %key,
        "pglock's prepared statements were deallocated on a direct connection; preparing them again"
    );
}
