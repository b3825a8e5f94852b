//! A TCP proxy on 127.0.0.1 with network faults that tests switch on and
//! off at run time.
//!
//! Point a client at [`TcpProxy::addr`] instead of the server. Then:
//!
//! * [`TcpProxy::blackhole`] stops moving bytes in both directions while
//!   every socket stays open: no FIN, no RST, nothing arrives. Bytes already
//!   read are held, and new ones wait in the kernel buffers, so
//!   [`TcpProxy::heal`] delivers them late, like a partition that heals
//!   before TCP gives up. Connections accepted while blackholed are not
//!   forwarded to the server until healed (their startup hangs).
//! * [`TcpProxy::reset_all`] aborts every connection with an RST on both
//!   sides (SO_LINGER 0, then close), so the client sees "connection reset"
//!   at once and the server's backend goes away.
//! * [`TcpProxy::refuse_new`] closes the listening socket (the port stays
//!   reserved): new connections fail with ECONNREFUSED while established
//!   ones carry on.
//!
//! Caveat: the proxy terminates TCP. Keepalive probes and retransmissions
//! are answered by this host's kernel on each side of the proxy, so TCP
//! keepalives (and `TCP_USER_TIMEOUT` while the send buffer has room) never
//! notice a blackhole: only application-level timeouts do. The same holds on
//! the server side, whose backend stays alive behind a blackholed proxy.
//!
//! Every task stops when the proxy is dropped (abort); sockets of live
//! connections are then closed normally.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

/// How long the proxy waits to connect to the target before it resets the
/// client.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A fault-injecting TCP proxy; see the module docs.
#[derive(Debug)]
pub struct TcpProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    commands: mpsc::UnboundedSender<Command>,
    accept_task: JoinHandle<()>,
}

#[derive(Debug)]
struct Shared {
    target: Mutex<SocketAddr>,
    /// `true` while blackholed.
    blackhole: watch::Sender<bool>,
    conns: Mutex<HashMap<u64, Conn>>,
    next_id: AtomicU64,
    accepted: AtomicU64,
    /// Set by Drop (under the `conns` lock) so that a connection accepted
    /// in a last poll of the aborted accept task is not registered.
    closed: AtomicBool,
}

#[derive(Debug)]
struct Conn {
    kill: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

#[derive(Debug)]
enum Command {
    Refuse(bool, oneshot::Sender<()>),
}

impl TcpProxy {
    /// Starts a proxy on 127.0.0.1:<ephemeral> forwarding to `target`.
    pub async fn start(target: SocketAddr) -> TcpProxy {
        let listener = listen(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .unwrap_or_else(|e| panic!("proxy listen: {e}"));
        let addr = listener.local_addr().expect("proxy local_addr");
        let (blackhole, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            target: Mutex::new(target),
            blackhole,
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            closed: AtomicBool::new(false),
        });
        let (commands, rx) = mpsc::unbounded_channel();
        let accept_task = tokio::spawn(accept_loop(listener, addr, shared.clone(), rx));
        TcpProxy {
            addr,
            shared,
            commands,
            accept_task,
        }
    }

    /// The proxy's listening address (stays the same for its lifetime).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The proxy's port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Where new connections are forwarded.
    pub fn target(&self) -> SocketAddr {
        *self.shared.target.lock().unwrap()
    }

    /// Forwards *new* connections to `target` from now on (existing ones
    /// keep their server), e.g. to fail over to another cluster.
    pub fn set_target(&self, target: SocketAddr) {
        *self.shared.target.lock().unwrap() = target;
    }

    /// Stops forwarding bytes in both directions, keeping every socket open.
    /// No new write starts after this returns.
    pub fn blackhole(&self) {
        self.shared.blackhole.send_replace(true);
    }

    /// Resumes forwarding; bytes held during the blackhole are delivered.
    pub fn heal(&self) {
        self.shared.blackhole.send_replace(false);
    }

    /// Whether the proxy is blackholed.
    pub fn is_blackholed(&self) -> bool {
        *self.shared.blackhole.borrow()
    }

    /// Aborts every current connection with an RST to both the client and
    /// the server, and waits (bounded) until they are closed.
    pub async fn reset_all(&self) {
        let conns: Vec<Conn> = {
            let mut map = self.shared.conns.lock().unwrap();
            map.drain().map(|(_, c)| c).collect()
        };
        let mut tasks = Vec::with_capacity(conns.len());
        for mut conn in conns {
            if let Some(kill) = conn.kill.take() {
                let _ = kill.send(());
            }
            tasks.push(conn.task);
        }
        for mut task in tasks {
            if tokio::time::timeout(Duration::from_secs(5), &mut task)
                .await
                .is_err()
            {
                task.abort();
            }
        }
    }

    /// With `true`, closes the listening socket (keeping the port reserved)
    /// so that new connections are refused (ECONNREFUSED); with `false`,
    /// listens again on the same port. Takes effect before this returns.
    pub async fn refuse_new(&self, refuse: bool) {
        let (ack, done) = oneshot::channel();
        self.commands
            .send(Command::Refuse(refuse, ack))
            .expect("proxy accept task is gone");
        done.await.expect("proxy accept task dropped the command");
    }

    /// Number of client connections currently open through the proxy.
    pub fn connection_count(&self) -> usize {
        self.shared.conns.lock().unwrap().len()
    }

    /// Number of client connections accepted since the start.
    pub fn accepted_count(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Waits until [`connection_count`](Self::connection_count) equals `n`;
    /// returns whether it did within `timeout`.
    pub async fn wait_for_connection_count(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.connection_count() == n {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept_task.abort();
        let conns: Vec<Conn> = match self.shared.conns.lock() {
            Ok(mut map) => {
                self.shared.closed.store(true, Ordering::SeqCst);
                map.drain().map(|(_, c)| c).collect()
            }
            Err(_) => Vec::new(),
        };
        for conn in conns {
            conn.task.abort();
        }
    }
}

/// A listening socket with SO_REUSEADDR, so the same port can be bound again
/// after [`TcpProxy::refuse_new`] while accepted connections still use it.
fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// A bound but not listening socket: holds the port, and the kernel answers
/// connection attempts with RST (ECONNREFUSED).
fn placeholder(addr: SocketAddr) -> io::Result<TcpSocket> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    Ok(socket)
}

async fn accept_loop(
    listener: TcpListener,
    addr: SocketAddr,
    shared: Arc<Shared>,
    mut commands: mpsc::UnboundedReceiver<Command>,
) {
    let mut listener = Some(listener);
    let mut reserved: Option<TcpSocket> = None;
    loop {
        tokio::select! {
            command = commands.recv() => match command {
                None => return,
                Some(Command::Refuse(true, ack)) => {
                    if listener.take().is_some() {
                        reserved = placeholder(addr).ok();
                    }
                    let _ = ack.send(());
                }
                Some(Command::Refuse(false, ack)) => {
                    if listener.is_none() {
                        listener = Some(relisten(addr, &mut reserved).await);
                    }
                    let _ = ack.send(());
                }
            },
            accepted = accept(listener.as_ref()) => match accepted {
                Ok(client) => spawn_conn(client, &shared),
                // E.g. EMFILE: back off instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            },
        }
    }
}

async fn accept(listener: Option<&TcpListener>) -> io::Result<TcpStream> {
    match listener {
        Some(l) => l.accept().await.map(|(s, _)| s),
        None => std::future::pending().await,
    }
}

async fn relisten(addr: SocketAddr, reserved: &mut Option<TcpSocket>) -> TcpListener {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match listen(addr) {
            Ok(l) => {
                *reserved = None;
                return l;
            }
            // Should the placeholder be in the way, release it and retry.
            Err(_) if reserved.take().is_some() => {}
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("proxy could not listen on {addr} again: {e}"),
        }
    }
}

fn spawn_conn(client: TcpStream, shared: &Arc<Shared>) {
    shared.accepted.fetch_add(1, Ordering::SeqCst);
    let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
    let (kill, killed) = oneshot::channel();
    // Hold the lock across spawn so the task cannot deregister before it is
    // registered.
    let mut map = shared.conns.lock().unwrap();
    if shared.closed.load(Ordering::SeqCst) {
        return;
    }
    let task = tokio::spawn(serve_conn(id, client, shared.clone(), killed));
    map.insert(
        id,
        Conn {
            kill: Some(kill),
            task,
        },
    );
}

/// Removes the connection from the registry when its task ends (or aborts).
struct Deregister {
    id: u64,
    shared: Arc<Shared>,
}

impl Drop for Deregister {
    fn drop(&mut self) {
        if let Ok(mut map) = self.shared.conns.lock() {
            map.remove(&self.id);
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// Both directions saw EOF: close normally.
    Finished,
    /// An I/O error or a reset_all: abort both sides with RST.
    Abort,
}

async fn serve_conn(
    id: u64,
    mut client: TcpStream,
    shared: Arc<Shared>,
    mut killed: oneshot::Receiver<()>,
) {
    let _deregister = Deregister {
        id,
        shared: shared.clone(),
    };
    let mut blackhole = shared.blackhole.subscribe();
    let target = *shared.target.lock().unwrap();

    // Across a blackhole the server is unreachable: connect after healing.
    let connect = async {
        wait_healed(&mut blackhole).await?;
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await {
            Ok(r) => r,
            Err(_) => Err(io::ErrorKind::TimedOut.into()),
        }
    };
    let upstream = tokio::select! {
        _ = &mut killed => None,
        r = connect => r.ok(),
    };
    let Some(mut upstream) = upstream else {
        abort(&client);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);

    let outcome = {
        let (client_read, client_write) = client.split();
        let (upstream_read, upstream_write) = upstream.split();
        let to_server = pump(client_read, upstream_write, shared.blackhole.subscribe());
        let to_client = pump(upstream_read, client_write, shared.blackhole.subscribe());
        tokio::select! {
            _ = &mut killed => Outcome::Abort,
            r = async { tokio::try_join!(to_server, to_client) } => match r {
                Ok(_) => Outcome::Finished,
                Err(_) => Outcome::Abort,
            },
        }
    };
    if outcome == Outcome::Abort {
        abort(&client);
        abort(&upstream);
    }
}

/// Arranges for the socket's close to send an RST instead of a FIN.
fn abort(stream: &TcpStream) {
    // SO_LINGER 0 only makes close() send an RST; it never blocks, which is
    // what the deprecation warns about.
    #[allow(deprecated)]
    let _ = stream.set_linger(Some(Duration::ZERO));
}

async fn wait_healed(blackhole: &mut watch::Receiver<bool>) -> io::Result<()> {
    blackhole
        .wait_for(|on| !*on)
        .await
        .map(|_| ())
        .map_err(|_| io::Error::other("proxy is gone"))
}

/// Copies one direction until EOF (then half-closes the writer), pausing
/// while blackholed.
async fn pump<R, W>(mut from: R, mut to: W, mut blackhole: watch::Receiver<bool>) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        wait_healed(&mut blackhole).await?;
        let n = tokio::select! {
            biased;
            on = blackhole.wait_for(|on| *on) => {
                on.map_err(|_| io::Error::other("proxy is gone"))?;
                continue;
            }
            r = from.read(&mut buf) => r?,
        };
        if n == 0 {
            to.shutdown().await?;
            return Ok(());
        }
        wait_healed(&mut blackhole).await?;
        to.write_all(&buf[..n]).await?;
    }
}
