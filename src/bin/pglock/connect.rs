//! Making the connection from a URL: the one place that chooses the transport (plain TCP, Unix
//! socket or TLS) and the connection settings.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{
    ClientWrapper, Hook, Manager, ManagerConfig, Pool, RecyclingMethod, Runtime,
};
use pglock::tls::{MakeRustlsConnect, TlsConfig};
use pglock::{Error, HealthCheck, Session};
use tokio::sync::watch;

/// A connection pglock holds a lock on, and a way to learn that it ended.
pub struct Connection {
    pub session: Arc<Session>,
    closed: watch::Receiver<bool>,
    /// Cancel requests go over TLS too, as the connection does.
    connector: MakeRustlsConnect,
}

impl Connection {
    /// Cancels the statement the session runs (an abandoned lock wait) and waits for the
    /// server to take the request, so that no waiter stays queued after pglock exits. pglock's
    /// cancel-safe acquisition sends one too, from a background task that may not get to run
    /// before the process exits.
    pub async fn abandon_wait(&self) {
        let token = self.session.cancel_token();
        let cancel = token.cancel_query(self.connector.clone());
        let _ = tokio::time::timeout(Duration::from_secs(5), cancel).await;
    }

    /// Resolves once the connection has ended (the server closed it, e.g. the backend was
    /// terminated, or the network failed). Every session lock on it is gone by then.
    pub async fn closed(&self) {
        let mut closed = self.closed.clone();
        // An error means the sender, in the connection task, is gone: closed as well.
        let _ = closed.wait_for(|closed| *closed).await;
    }
}

/// The `application_name` of a connection.
#[derive(Clone, Copy, Debug)]
pub enum AppName<'a> {
    /// This name, unless the URL sets one.
    Default(&'a str),
    /// This name, whatever the URL says (`--application-name`).
    Forced(&'a str),
}

/// Has the server notice within a second that pglock is gone (killed, network down) even while
/// its session waits for a lock, instead of when the lock is granted (PostgreSQL 14+, Linux
/// servers; a no-op elsewhere). Best effort: a failure leaves a usable session.
const SESSION_SETUP: &str = "SELECT set_config('client_connection_check_interval', '1s', false) \
     WHERE current_setting('server_version_num')::int >= 140000";

/// The connection settings for `url`: TLS as its `sslmode` and `sslrootcert` say
/// ([`pglock::tls`]), the application name, a connect timeout, pglock's TCP keepalives and user
/// timeout (unless the URL sets keepalives).
fn config(url: &str, application_name: AppName<'_>) -> Result<TlsConfig, Error> {
    let tls = TlsConfig::from_url(url)?;
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

/// A small pool for `url` (for `pglock leader`, whose election replaces a lost connection with
/// a fresh one), with the same settings as [`connect`]. It connects lazily.
///
/// # Errors
///
/// [`Error::Config`] as for [`connect`].
pub fn pool(url: &str, application_name: AppName<'_>) -> Result<Pool, Error> {
    let tls = config(url, application_name)?;
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

/// Connects to `url`, naming the session as `application_name` says.
///
/// TCP keepalives and the TCP user timeout are pglock's defaults
/// ([`HealthCheck::configure_keepalives`]) unless the URL sets keepalives, so that a silent
/// network failure ends the connection in seconds rather than hours.
///
/// # Errors
///
/// [`Error::Config`] for a malformed URL or unreadable root certificates, [`Error::Tls`] when
/// TLS cannot be set up (an untrusted certificate, a wrong host name, a server without TLS),
/// [`Error::Connect`] when the server cannot be reached or refuses the login. No message
/// contains the password.
pub async fn connect(url: &str, application_name: AppName<'_>) -> Result<Connection, Error> {
    let tls = config(url, application_name)?;
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
    let session = Session::from_client(client).with_cancel_tls(connector.clone());
    let _ = session.batch_execute(SESSION_SETUP).await;
    Ok(Connection {
        session: Arc::new(session),
        closed,
        connector,
    })
}
