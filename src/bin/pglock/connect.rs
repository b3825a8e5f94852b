//! Making connections from the connection string: the one place that chooses the transport
//! (plain TCP, Unix socket or TLS) and the connection settings, and that waits out a server
//! that refuses connections for a passing reason.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{
    ClientWrapper, Hook, Manager, ManagerConfig, Pool, RecyclingMethod, Runtime,
};
use pglock::tls::{TlsConfig, TlsConnector};
use pglock::{DatabaseUrl, Error, HealthCheck, Session};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_postgres::error::SqlState;

use crate::format::human_duration;
use crate::output::{with_causes, Output};

/// A connection pglock holds a lock on, and a way to learn that it ended.
pub struct Connection {
    pub session: Arc<Session>,
    closed: watch::Receiver<bool>,
    /// Cancel requests go over TLS too, as the connection does.
    connector: TlsConnector,
}

impl Connection {
    /// Cancels the statement the session runs (an abandoned lock wait) and waits until the
    /// wait has ended on the server, so that no waiter stays queued after pglock exits. pglock's
    /// cancel-safe acquisition sends a cancel too, from a background task that may not get to
    /// run before the process exits. A cancel request only reaches the server's postmaster,
    /// which signals the backend later: the empty statement queued behind the wait answers once
    /// the backend has left the lock queue (cancelled, or granted just before and then freed
    /// when the connection closes). At most [`ABANDON_BOUND`].
    pub async fn abandon_wait(&self) {
        let token = self.session.cancel_token();
        let cancel = token.cancel_query(self.connector.clone());
        let _ = tokio::time::timeout(ABANDON_BOUND, async {
            let _ = cancel.await;
            let _ = self.session.client().simple_query("").await;
        })
        .await;
    }

    /// Resolves once the connection has ended (the server closed it, e.g. the backend was
    /// terminated, or the network failed). Every session lock on it is gone by then.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe.
    pub async fn closed(&self) {
        let mut closed = self.closed.clone();
        // An error means the sender, in the connection task, is gone: closed as well.
        let _ = closed.wait_for(|closed| *closed).await;
    }
}

/// How long pglock waits at most, on its way out, for the server to end an abandoned lock wait.
const ABANDON_BOUND: Duration = Duration::from_secs(5);

/// The `application_name` of a connection.
#[derive(Clone, Copy, Debug)]
pub enum AppName<'a> {
    /// This name, unless the connection string sets one.
    Default(&'a str),
    /// This name, whatever the connection string says (`--application-name`).
    Forced(&'a str),
}

/// Has the server notice within a second that pglock is gone (killed, network down) even while
/// its session waits for a lock, instead of when the lock is granted (PostgreSQL 14+, Linux
/// servers; a no-op elsewhere). Best effort: a failure leaves a usable session.
const SESSION_SETUP: &str = "SELECT set_config('client_connection_check_interval', '1s', false) \
     WHERE current_setting('server_version_num')::int >= 140000";

/// The database pglock works on: the connection string, read, with pglock's settings.
pub struct Database {
    url: DatabaseUrl,
    /// How long to keep trying while the server refuses connections for a passing reason.
    pub connect_timeout: Duration,
}

impl Database {
    pub fn new(url: DatabaseUrl, connect_timeout: Duration) -> Self {
        Database {
            url,
            connect_timeout,
        }
    }

    /// The connection settings: TLS as `sslmode` and `sslrootcert` say ([`pglock::tls`]), the
    /// application name, a connect timeout, pglock's TCP keepalives and user timeout (unless
    /// the connection string sets keepalives).
    fn config(&self, application_name: AppName<'_>) -> Result<TlsConfig, Error> {
        let tls = TlsConfig::from_database_url(&self.url)?;
        let mut tls = match application_name {
            AppName::Forced(name) => tls.with_application_name(name),
            AppName::Default(name) => tls.with_default_application_name(name),
        };
        let config = tls.config_mut();
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(30));
        }
        if config.get_keepalives_idle() == Duration::from_secs(2 * 60 * 60) {
            // As pglock's own sessions: a dead network path ends the connection within
            // HealthCheck::keepalive_timeout, not after the operating system's two hours.
            HealthCheck::default().configure_keepalives(config);
        }
        Ok(tls)
    }

    /// A small pool (for `pglock leader`, whose election replaces a lost connection with a fresh
    /// one), with the same settings as [`connect_once`](Self::connect_once). It connects
    /// lazily.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] as [`connect_once`](Self::connect_once).
    pub fn pool(&self, application_name: AppName<'_>) -> Result<Pool, Error> {
        let tls = self.config(application_name)?;
        let manager = Manager::from_config(
            tls.config().clone(),
            tls.connector()?,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        Pool::builder(manager)
            .max_size(2)
            .wait_timeout(Some(Duration::from_secs(30)))
            .runtime(Runtime::Tokio1)
            .post_create(Hook::async_fn(|client: &mut ClientWrapper, _| {
                Box::pin(async move {
                    let _ = client.batch_execute(SESSION_SETUP).await;
                    Ok(())
                })
            }))
            .build()
            .map_err(|error| Error::Config(format!("cannot build the connection pool: {error}")))
    }

    /// Connects once, naming the session as `application_name` says.
    ///
    /// TCP keepalives and the TCP user timeout are pglock's defaults
    /// ([`HealthCheck::configure_keepalives`]) unless the connection string sets keepalives, so
    /// that a silent network failure ends the connection in seconds rather than hours.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for unreadable root certificates, [`Error::Tls`] when TLS cannot be set
    /// up (an untrusted certificate, a wrong host name, a server without TLS),
    /// [`Error::Connect`] when the server cannot be reached or refuses the login. No message
    /// contains the password.
    pub async fn connect_once(&self, application_name: AppName<'_>) -> Result<Connection, Error> {
        let tls = self.config(application_name)?;
        let connector = tls.connector()?;
        let (closed_tx, closed) = watch::channel(false);
        let (client, connection) = tls
            .config()
            .connect(connector.clone())
            .await
            .map_err(|error| tls.connect_error(error))?;
        tokio::spawn(async move {
            let _ = connection.await;
            let _ = closed_tx.send(true);
        });
        // One task waits on it: its waits keep their place in the server's queue.
        let session = Session::from_client(client)
            .with_cancel_tls(connector.clone())
            .dedicated();
        let _ = session.batch_execute(SESSION_SETUP).await;
        let session = Arc::new(session);
        Ok(Connection {
            session,
            closed,
            connector,
        })
    }

    /// Connects, waiting out refusals that pass by themselves ([`Error::is_transient`]: too many
    /// clients, a server starting up or restarting, not reachable yet) until `give_up`, and at
    /// most [`connect_timeout`](Self::connect_timeout) from now.
    ///
    /// # Errors
    ///
    /// As [`connect_once`](Self::connect_once): a permanent error at once, a transient one once
    /// the time is up.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: a connection being made is dropped.
    pub async fn connect(
        &self,
        application_name: AppName<'_>,
        give_up: Option<Instant>,
        refusals: &mut Refusals,
        out: &Output,
    ) -> Result<Connection, Error> {
        let own_limit = Instant::now() + self.connect_timeout;
        let (give_up, bound) = match give_up {
            Some(at) if at < own_limit => (at, "--timeout"),
            _ => (own_limit, "--connect-timeout"),
        };
        loop {
            match self.connect_once(application_name).await {
                Ok(connection) => {
                    refusals.connected(out);
                    return Ok(connection);
                }
                Err(error) if error.is_transient() => {
                    let now = Instant::now();
                    if now >= give_up {
                        return Err(error);
                    }
                    let pause = refusals.refused(&error, Some((give_up, bound)), out);
                    // The last attempt comes at the time limit itself.
                    tokio::time::sleep(pause.min(give_up - now)).await;
                }
                Err(error) => return Err(error),
            }
        }
    }
}

/// Connection attempts the server refused for a passing reason: counted, said once on stderr,
/// and paced with a jittered backoff so that a fleet refused together does not come back
/// together.
#[derive(Debug, Default)]
pub struct Refusals {
    /// Refused attempts since the last connection made.
    current: u32,
    /// When the current run of refusals began.
    since: Option<Instant>,
}

/// The first pause after a refusal; it doubles up to [`LONGEST_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(100);
const LONGEST_PAUSE: Duration = Duration::from_secs(2);
/// The same after `53300` (too many clients).
const FIRST_PAUSE_WHEN_FULL: Duration = Duration::from_millis(500);
const LONGEST_PAUSE_WHEN_FULL: Duration = Duration::from_secs(5);

impl Refusals {
    /// Counts a refusal (saying so on the first of a run, with when pglock gives up and the
    /// option that sets it) and returns the pause before the next attempt.
    pub fn refused(
        &mut self,
        error: &Error,
        give_up: Option<(Instant, &str)>,
        out: &Output,
    ) -> Duration {
        if self.current == 0 {
            self.since = Some(Instant::now());
            let until = match give_up {
                Some((at, option)) => format!(
                    "for up to {} ({option})",
                    human_duration(at.saturating_duration_since(Instant::now()))
                ),
                None => "until it can".to_owned(),
            };
            out.info(format_args!(
                "cannot connect yet: {}; trying again {until}",
                with_causes(error)
            ));
        }
        self.current += 1;
        // A server out of connection slots is refusing a whole fleet: coming back sooner would
        // only take the slots the holder's command needs. A server starting up is worth asking
        // again soon.
        let (first, longest) = if error.code() == Some(&SqlState::TOO_MANY_CONNECTIONS) {
            (FIRST_PAUSE_WHEN_FULL, LONGEST_PAUSE_WHEN_FULL)
        } else {
            (FIRST_PAUSE, LONGEST_PAUSE)
        };
        let doubled = first.saturating_mul(1 << self.current.min(8).saturating_sub(1));
        jitter(doubled.min(longest))
    }

    /// Says how long the refusals of the current run lasted, if there were any.
    pub fn connected(&mut self, out: &Output) {
        if self.current > 0 {
            let lasted = self.since.map(|s| s.elapsed()).unwrap_or_default();
            out.info(format_args!(
                "connected after {} refused attempt{} over {}",
                self.current,
                if self.current == 1 { "" } else { "s" },
                human_duration(lasted)
            ));
        }
        self.current = 0;
        self.since = None;
    }
}

/// `pause` scaled by a random factor between 0.5 and 1.5.
pub fn jitter(pause: Duration) -> Duration {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    let unit = (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64;
    pause.mul_f64(0.5 + unit)
}
