//! Which server backend a connection talks to, and what pglock may therefore stop checking.
//!
//! A statement pglock sends on a connection it knows nothing about checks two things on the
//! server, in the same round trip: that the server is not a standby (advisory locks taken on a
//! standby are local to it and exclude nobody on the primary), and which backend ran it, so
//! that an unlock runs only on the backend that granted the lock. Behind a transaction-pooling
//! proxy, the statements of one client connection can run on different backends, even on
//! different servers: these checks are how pglock notices.
//!
//! On a direct connection neither can change while the connection lives. The backend that
//! answered the login runs every statement, and a primary cannot become a standby without a
//! restart, which ends every session. So pglock verifies each connection once, with the answer
//! of its first acquiring statement: the backend that ran it must be the one the login announced
//! (the process id of the cancel key, `BackendKeyData`), and the server must not be in
//! recovery. Poolers give their clients cancel keys of their own, since they route cancel
//! requests themselves, so behind one the two differ and the connection keeps the checking
//! statements for its whole life. A verified connection gets the plain statements (see
//! [`Checks`]): the server runs less, and the client sends and reads less.
//!
//! A proxy that hands its clients the server's own cancel key and still sends their statements
//! to other backends would defeat the verification: declare it with `always_check_backend`.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, TlsConnect, TlsStream};
use tokio_postgres::Client;

use crate::base::sql::Checks;

/// What pglock learned about one connection's backend: nothing yet, or the verdict of its first
/// acquiring statement, kept for the connection's life.
#[derive(Debug, Default)]
pub(crate) struct Verification(OnceLock<Option<i32>>);

impl Verification {
    /// The statements to send on the connection.
    pub(crate) fn checks(&self) -> Checks {
        match self.0.get() {
            Some(Some(pid)) => Checks::Verified(*pid),
            _ => Checks::InStatement,
        }
    }

    /// Whether the connection still waits for its verdict.
    pub(crate) fn is_pending(&self) -> bool {
        self.0.get().is_none()
    }

    /// Records the verdict from a checking statement's answer: it ran on backend `ran_on`, on a
    /// standby when `on_standby`. The connection is direct when `ran_on` is the backend its login
    /// announced. Returns whether it is.
    pub(crate) fn learn(&self, client: &Client, ran_on: i32, on_standby: bool) -> bool {
        if self.is_pending() {
            let direct = !on_standby && announced_pid(client) == Some(ran_on);
            let _ = self.0.set(direct.then_some(ran_on));
        }
        matches!(self.checks(), Checks::Verified(_))
    }
}

/// The verdict a connection has for a source that must not trust any (`always_check_backend`,
/// a transaction pooler): always pending, since such sources never record one.
pub(crate) static NEVER_VERIFIED: Verification = Verification(OnceLock::new());

/// The process id the server announced at login, in the cancel key (`BackendKeyData`).
///
/// tokio-postgres keeps it private, but [`CancelToken::cancel_query_raw`] writes it, in a
/// CancelRequest message (length 16, code 80877102, process id, secret key), to any stream it
/// is given. The stream here records what is written and never touches the network; the
/// connector passes it through when the token asks for TLS. `None` when the message is not
/// there as expected (a tokio-postgres that writes something else): the connection then keeps
/// the checking statements.
///
/// [`CancelToken::cancel_query_raw`]: tokio_postgres::CancelToken::cancel_query_raw
pub(crate) fn announced_pid(client: &Client) -> Option<i32> {
    let token = client.cancel_token();
    let mut recorder = Recorder::default();
    let written = {
        let request = token.cancel_query_raw(&mut recorder, PassThrough);
        let mut request = std::pin::pin!(request);
        // Everything completes in memory, on the first poll.
        let mut cx = Context::from_waker(Waker::noop());
        matches!(request.as_mut().poll(&mut cx), Poll::Ready(Ok(())))
    };
    if !written {
        return None;
    }
    let message = recorder
        .written
        .get(recorder.written.len().checked_sub(16)?..)?;
    let field = |at: usize| i32::from_be_bytes(message[at..at + 4].try_into().unwrap());
    (field(0) == 16 && field(4) == 80_877_102).then(|| field(8))
}

/// An in-memory stream that keeps what is written to it and answers every read with `S` (the
/// server's "go ahead with TLS", should the token ask).
#[derive(Default)]
struct Recorder {
    written: Vec<u8>,
}

impl AsyncRead for Recorder {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if buf.remaining() > 0 {
            buf.put_slice(b"S");
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Recorder {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        bytes: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.written.extend_from_slice(bytes);
        Poll::Ready(Ok(bytes.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// A "TLS" connector that encrypts nothing: the recorded stream stays readable.
struct PassThrough;

impl<S: AsyncRead + AsyncWrite + Unpin> TlsConnect<S> for PassThrough {
    type Stream = Plain<S>;
    type Error = io::Error;
    type Future = std::future::Ready<io::Result<Plain<S>>>;

    fn connect(self, stream: S) -> Self::Future {
        std::future::ready(Ok(Plain(stream)))
    }
}

struct Plain<S>(S);

impl<S: AsyncRead + Unpin> AsyncRead for Plain<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Plain<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bytes: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, bytes)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for Plain<S> {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}
