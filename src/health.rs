//! How a held lock's connection is watched for loss: the [`HealthCheck`] options, and the TCP
//! keepalives derived from them on both ends of a connection.

use std::time::Duration;

use tokio_postgres::types::Type;
use tokio_postgres::{Client, Config};

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
/// is reported as loss ([`LossReason::ProbeTimedOut`](crate::LossReason::ProbeTimedOut)): pglock cannot tell a busy connection
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

    pub(crate) fn sanitized(&self) -> Self {
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
