//! Where a lock's connection comes from: a deadpool pool, or a [`Session`] the caller owns.

use std::sync::Arc;

use deadpool_postgres::Pool;
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::Socket;

use crate::base::cancel::Canceller;
use crate::base::error::Result;
use crate::conn::handle::Conn;
use crate::conn::pooled;
use crate::conn::session::Session;

/// Where an [`AdvisoryLock`](crate::AdvisoryLock) gets its connection.
///
/// Built from a [`deadpool_postgres::Pool`] (each held lock keeps one pooled connection) or
/// from an `Arc<`[`Session`]`>` (locks share the session). `From` conversions exist for both,
/// so you rarely name this type.
///
/// What pglock prepares on a pooled connection, and what it learns of the connection, is kept
/// with the connection for the whole process, whichever source checks it out: building a
/// source (or an `AdvisoryLock`) for every call costs no extra round trip.
#[derive(Clone, Debug)]
pub struct ConnectionSource {
    kind: SourceKind,
    canceller: Canceller,
    behind_pooler: bool,
    always_check: bool,
}

#[derive(Clone, Debug)]
enum SourceKind {
    Pool(Pool),
    Session(Arc<Session>),
}

impl ConnectionSource {
    /// Sends cancel requests for abandoned waits on pooled connections through `tls`.
    ///
    /// Needed when the server accepts only TLS connections; the default is no TLS.
    pub fn with_cancel_tls<T>(mut self, tls: T) -> Self
    where
        T: MakeTlsConnect<Socket> + Clone + Send + Sync + 'static,
        T::Stream: Send,
        T::TlsConnect: Send,
        <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
    {
        self.canceller = Canceller::new(tls);
        self
    }

    /// Declares that the pool's connections go through a transaction-pooling proxy (PgBouncer
    /// with `pool_mode = transaction`, and the like).
    ///
    /// pglock then sends its statements without preparing them (one round trip each, as
    /// before), so they work on poolers that do not carry prepared statements between
    /// transactions, and refuses session-scope locks with [`Error::SessionLockBehindPooler`](crate::Error::SessionLockBehindPooler)
    /// before sending anything: behind such a pooler only
    /// [`LockScope::Transaction`](crate::LockScope::Transaction) locks hold. See
    /// `docs/pgbouncer.md`.
    ///
    /// ```no_run
    /// # async fn demo(pool: deadpool_postgres::Pool) -> pglock::Result<()> {
    /// use pglock::{AdvisoryLock, AdvisoryLockGuard, ConnectionSource, LockScope};
    ///
    /// let source = ConnectionSource::from(pool).behind_transaction_pooler();
    /// let guard = AdvisoryLock::new(source, "nightly-report")
    ///     .scope(LockScope::Transaction)
    ///     .lock()
    ///     .await?;
    /// // ... work in the guard's transaction ...
    /// AdvisoryLockGuard::commit(guard).await?;
    /// # Ok(()) }
    /// ```
    pub fn behind_transaction_pooler(mut self) -> Self {
        self.behind_pooler = true;
        self
    }

    /// Keeps pglock's checks of the server in every statement on the pool's connections,
    /// instead of verifying each connection once: see [`Session::always_check_backend`].
    pub fn always_check_backend(mut self) -> Self {
        self.always_check = true;
        self
    }

    /// Whether an acquisition may verify its connection as direct (see `backend`): never behind
    /// a declared pooler, or when the checks are asked for in every statement.
    pub(crate) fn may_verify(&self) -> bool {
        let session_may = match &self.kind {
            SourceKind::Pool(..) => true,
            SourceKind::Session(session) => session.may_verify(),
        };
        session_may && !(self.behind_pooler || self.always_check)
    }

    /// Whether the connections go through a transaction pooler (declared on the source or on
    /// its session).
    pub(crate) fn behind_pooler(&self) -> bool {
        match &self.kind {
            SourceKind::Pool(..) => self.behind_pooler,
            SourceKind::Session(session) => self.behind_pooler || session.behind_pooler,
        }
    }

    pub(crate) async fn checkout(&self) -> Result<Conn> {
        match &self.kind {
            SourceKind::Pool(pool) => {
                let object = pool.get().await?;
                let remembered = pooled::remembered(&object);
                Ok(Conn::pooled(object, remembered, self.may_verify()))
            }
            SourceKind::Session(session) => Ok(Conn::Session(session.clone())),
        }
    }

    /// Whether tasks wait for a connection of the pool (or are opening one).
    /// The shared session this source is, if it is one.
    pub(crate) fn session(&self) -> Option<&Arc<Session>> {
        match &self.kind {
            SourceKind::Session(session) => Some(session),
            SourceKind::Pool(..) => None,
        }
    }

    pub(crate) fn pool_has_waiters(&self) -> bool {
        match &self.kind {
            SourceKind::Pool(pool) => pool.status().waiting > 0,
            SourceKind::Session(_) => false,
        }
    }

    /// Whether connections come from a pool (one per held lock).
    pub(crate) fn is_pool(&self) -> bool {
        matches!(self.kind, SourceKind::Pool(..))
    }

    /// Whether this source is a [`Session`] other tasks may use (not declared
    /// [`dedicated`](Session::dedicated)): no server-side wait, no transaction.
    pub(crate) fn is_shared_session(&self) -> bool {
        matches!(&self.kind, SourceKind::Session(session) if !session.dedicated)
    }

    /// Whether this source is a [`Session`] whose connection has closed: nothing taken from it
    /// can succeed any more.
    pub(crate) fn is_closed_session(&self) -> bool {
        matches!(&self.kind, SourceKind::Session(session) if session.client.is_closed())
    }

    pub(crate) fn canceller(&self, conn: &Conn) -> Canceller {
        match conn {
            Conn::Pooled(_) => self.canceller.clone(),
            Conn::Session(session) => session.canceller.clone(),
        }
    }
}

impl From<Pool> for ConnectionSource {
    fn from(pool: Pool) -> Self {
        ConnectionSource {
            kind: SourceKind::Pool(pool),
            canceller: Canceller::default(),
            behind_pooler: false,
            always_check: false,
        }
    }
}

impl From<&Pool> for ConnectionSource {
    fn from(pool: &Pool) -> Self {
        pool.clone().into()
    }
}

impl From<Arc<Session>> for ConnectionSource {
    fn from(session: Arc<Session>) -> Self {
        ConnectionSource {
            kind: SourceKind::Session(session),
            canceller: Canceller::default(),
            behind_pooler: false,
            always_check: false,
        }
    }
}

impl From<&Arc<Session>> for ConnectionSource {
    fn from(session: &Arc<Session>) -> Self {
        session.clone().into()
    }
}

impl From<Session> for ConnectionSource {
    fn from(session: Session) -> Self {
        Arc::new(session).into()
    }
}
