//! Cancel requests for an abandoned statement, and knowing when the server has acted on one.
//!
//! A cancel request travels on a connection of its own. The server process that reads it
//! signals the backend running the statement and then closes that connection. Until it has
//! done so, the request may still land on whatever the backend runs next: on a session that is
//! used again, that is the next caller's statement, which then fails with `57014`. So where
//! pglock can open the request's connection itself (no TLS, one known address), the request
//! ends only when the server has closed it, and the session is used again only after that.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use std::{fmt, io};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};
use tokio_postgres::config::Host;
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::{CancelToken, Config, NoTls, Socket};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// How long a cancel request may take, from connecting to the server's close. A server that
/// does not answer within it is unreachable; the statement then ends with the connection.
const REQUEST_BOUND: Duration = Duration::from_secs(5);

/// Sends a cancel request for the statement running on a connection, over the right transport.
///
/// The future it returns completes when the server has acted on the request, where that can be
/// known (see the module documentation), otherwise once the request is sent.
#[derive(Clone)]
pub(crate) struct Canceller(Arc<dyn Fn(CancelToken) -> BoxFuture<()> + Send + Sync>);

impl Canceller {
    /// Requests through tokio-postgres, negotiating TLS with `tls` as the connection did: the
    /// request counts as done once sent.
    pub(crate) fn new<T>(tls: T) -> Self
    where
        T: MakeTlsConnect<Socket> + Clone + Send + Sync + 'static,
        T::Stream: Send,
        T::TlsConnect: Send,
        <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
    {
        Canceller(Arc::new(move |token: CancelToken| {
            let tls = tls.clone();
            Box::pin(async move {
                // A failed cancel leaves the server-side wait in place until it is granted;
                // the caller closes the connection as well, which ends it then.
                let _ = token.cancel_query(tls).await;
            })
        }))
    }

    /// The canceller for a connection opened with `config` and `tls`: one that waits for the
    /// server's close when the connection is plain and went to the one address `config` names.
    pub(crate) fn for_config<T>(config: &Config, tls: T) -> Self
    where
        T: MakeTlsConnect<Socket> + Clone + Send + Sync + 'static,
        T::Stream: Send,
        T::TlsConnect: Send,
        <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
    {
        let plain = std::any::TypeId::of::<T>() == std::any::TypeId::of::<NoTls>();
        match ServerAddress::of(config) {
            Some(address) if plain => {
                let address = Arc::new(address);
                Canceller(Arc::new(move |token: CancelToken| {
                    let address = address.clone();
                    Box::pin(async move {
                        let request = request_and_wait(&token, &address);
                        // As above, a failed cancel is made good by closing the connection.
                        let _ = tokio::time::timeout(REQUEST_BOUND, request).await;
                    })
                }))
            }
            _ => Canceller::new(tls),
        }
    }

    pub(crate) fn cancel(&self, token: CancelToken) -> BoxFuture<()> {
        (self.0)(token)
    }
}

impl Default for Canceller {
    fn default() -> Self {
        Canceller::new(NoTls)
    }
}

impl fmt::Debug for Canceller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Canceller")
    }
}

/// The cancel requests still in flight for abandoned statements on one session.
///
/// A request that reaches the backend late cancels whatever runs there then, so nothing new
/// of pglock's is started on the session until they are over (see [`Conn::reserve`]): a
/// rollback or an unlock already queued behind the abandoned statement still runs first, and
/// the next acquisition waits a round trip or two.
///
/// [`Conn::reserve`]: crate::conn::handle::Conn::reserve
#[derive(Debug, Default)]
pub(crate) struct PendingCancels {
    count: AtomicUsize,
    over: tokio::sync::Notify,
}

impl PendingCancels {
    /// Counts a cancel request (or a series of them) until the returned value is dropped.
    pub(crate) fn start(self: &Arc<Self>) -> PendingCancel {
        self.count.fetch_add(1, Ordering::AcqRel);
        PendingCancel(self.clone())
    }

    /// Whether none is in flight.
    pub(crate) fn none(&self) -> bool {
        self.count.load(Ordering::Acquire) == 0
    }

    /// Waits until none is in flight.
    pub(crate) async fn over(&self) {
        loop {
            let over = self.over.notified();
            let mut over = std::pin::pin!(over);
            // Registered before the check, so that the last one ending in between is not missed.
            over.as_mut().enable();
            if self.none() {
                return;
            }
            over.await;
        }
    }
}

/// One counted series of cancel requests (see [`PendingCancels::start`]).
pub(crate) struct PendingCancel(Arc<PendingCancels>);

impl Drop for PendingCancel {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.over.notify_waiters();
        }
    }
}

/// Where a connection went, as tokio-postgres chooses it: `hostaddr` before `host`, a Unix
/// socket directory as a path, the first port or 5432.
#[derive(Debug, PartialEq)]
enum ServerAddress {
    Tcp(String, u16),
    Unix(PathBuf),
}

impl ServerAddress {
    /// `None` when `config` names several servers: which one took the connection is not known.
    fn of(config: &Config) -> Option<Self> {
        let (hosts, addrs) = (config.get_hosts(), config.get_hostaddrs());
        if hosts.len().max(addrs.len()) != 1 || config.get_ports().len() > 1 {
            return None;
        }
        let port = config.get_ports().first().copied().unwrap_or(5432);
        Some(match (addrs.first(), hosts.first()) {
            (Some(ip), _) => ServerAddress::Tcp(ip.to_string(), port),
            (None, Some(Host::Tcp(host))) => ServerAddress::Tcp(host.clone(), port),
            (None, Some(Host::Unix(dir))) => {
                ServerAddress::Unix(dir.join(format!(".s.PGSQL.{port}")))
            }
            (None, None) => return None,
        })
    }
}

/// Sends the request and reads until the server closes the connection.
async fn request_and_wait(token: &CancelToken, address: &ServerAddress) -> io::Result<()> {
    match address {
        ServerAddress::Unix(path) => send_and_wait(token, UnixStream::connect(path).await?).await,
        ServerAddress::Tcp(host, port) => {
            let mut refused = io::Error::new(io::ErrorKind::NotFound, "no address");
            // A name may resolve to several addresses; any that reaches the server will do,
            // since the cancel key is known to the whole server.
            for address in tokio::net::lookup_host((host.as_str(), *port)).await? {
                match TcpStream::connect(address).await {
                    Ok(stream) => return send_and_wait(token, stream).await,
                    Err(error) => refused = error,
                }
            }
            Err(refused)
        }
    }
}

async fn send_and_wait<S>(token: &CancelToken, mut stream: S) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // Writes the CancelRequest and shuts down the sending half.
    token
        .cancel_query_raw(&mut stream, NoTls)
        .await
        .map_err(io::Error::other)?;
    // The server answers nothing: it signals the backend, then closes the connection.
    let mut discard = [0u8; 64];
    while stream.read(&mut discard).await? != 0 {}
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address(url: &str) -> Option<ServerAddress> {
        ServerAddress::of(&url.parse::<Config>().unwrap())
    }

    #[test]
    fn one_server_has_an_address() {
        assert_eq!(
            address("host=db.example port=6432 user=u"),
            Some(ServerAddress::Tcp("db.example".into(), 6432))
        );
        assert_eq!(
            address("postgresql://u@10.0.0.7/test"),
            Some(ServerAddress::Tcp("10.0.0.7".into(), 5432))
        );
        assert_eq!(
            address("host=db.example hostaddr=10.0.0.8 user=u"),
            Some(ServerAddress::Tcp("10.0.0.8".into(), 5432))
        );
        assert_eq!(
            address("host=/var/run/postgresql user=u"),
            Some(ServerAddress::Unix(
                "/var/run/postgresql/.s.PGSQL.5432".into()
            ))
        );
    }

    #[test]
    fn several_servers_have_none() {
        assert_eq!(address("host=a,b user=u"), None);
        assert_eq!(address("user=u"), None);
    }
}
