//! The connection an attempt or a guard works on: a pooled one, or a shared [`Session`].

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use deadpool_postgres::Object;
use tokio::sync::watch;
use tokio_postgres::{Client, Statement};

use crate::base::error::Result;
use crate::base::health::HealthCheck;
use crate::base::key::AdvisoryKey;
use crate::base::scope::LockScope;
use crate::conn::backend::{self, Verification};
use crate::conn::pooled::{self, Pooled, Remembered, DISCARD, LEAK, RETURN};
use crate::conn::session::{Reservation, Session};
use crate::loss::monitor::Monitor;

/// The connection one lock works on: exclusively owned (pooled) or shared (a session).
// Boxing the pooled object would cost an allocation per acquisition to save a memcpy.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Conn {
    Pooled(Arc<Pooled>),
    Session(Arc<Session>),
}

/// A [`Conn`] that does not keep its connection alive: what a loss monitor holds between probes.
pub(crate) enum WeakConn {
    Pooled(Weak<Pooled>),
    Session(Weak<Session>),
}

impl WeakConn {
    pub(crate) fn upgrade(&self) -> Option<Conn> {
        match self {
            WeakConn::Pooled(weak) => weak.upgrade().map(Conn::Pooled),
            WeakConn::Session(weak) => weak.upgrade().map(Conn::Session),
        }
    }
}

impl Conn {
    /// A pooled connection, with what pglock knows of it; `trust_verdict` is false for a source
    /// that keeps the checking statements whatever the connection's verdict.
    pub(crate) fn pooled(object: Object, remembered: Arc<Remembered>, trust_verdict: bool) -> Self {
        Conn::Pooled(Arc::new(Pooled {
            object: Some(object),
            fate: AtomicU8::new(RETURN),
            monitor: OnceLock::new(),
            remembered,
            trust_verdict,
            borrows: AtomicU64::new(0),
        }))
    }

    /// Another handle on the same connection (a pooled connection returns to the pool when
    /// the last handle is dropped).
    pub(crate) fn share(&self) -> Conn {
        match self {
            Conn::Pooled(pooled) => Conn::Pooled(pooled.clone()),
            Conn::Session(session) => Conn::Session(session.clone()),
        }
    }

    /// Whether both handles are on the same connection.
    pub(crate) fn same_as(&self, other: &Conn) -> bool {
        match (self, other) {
            (Conn::Pooled(a), Conn::Pooled(b)) => Arc::ptr_eq(a, b),
            (Conn::Session(a), Conn::Session(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }

    /// Whether this is a pooled connection (owned by one lock at a time).
    pub(crate) fn is_pooled(&self) -> bool {
        matches!(self, Conn::Pooled(_))
    }

    /// Takes a pooled connection out of its pool for good, when nothing else holds it: the pool
    /// gets its place back at once, and the connection closes when the client is dropped.
    /// Otherwise (a shared session, or a pooled connection a loss probe still holds) returns
    /// the connection unchanged.
    pub(crate) fn detach(self) -> std::result::Result<deadpool_postgres::ClientWrapper, Conn> {
        match self {
            Conn::Pooled(pooled) => match Arc::try_unwrap(pooled) {
                Ok(mut pooled) => {
                    let object = pooled
                        .object
                        .take()
                        .expect("a pooled connection holds its object");
                    pooled::forget(&object);
                    Ok(Object::take(object))
                }
                Err(shared) => Err(Conn::Pooled(shared)),
            },
            session => Err(session),
        }
    }

    /// After the server reported a statement pglock had prepared here as gone (`DEALLOCATE`):
    /// a pooled connection is marked to be closed, which forgets what pglock and deadpool
    /// prepared on it; a session forgets its statements and prepares them again on next use.
    pub(crate) fn forget_statements(&self) {
        match self {
            Conn::Pooled(_) => self.mark_discard(),
            Conn::Session(session) => session.statements.forget_all(),
        }
    }

    /// Marks a pooled connection to be closed when its last handle is dropped, whoever holds
    /// the others. A shared session stays open.
    pub(crate) fn mark_discard(&self) {
        if let Conn::Pooled(pooled) = self {
            pooled
                .fate
                .compare_exchange(RETURN, DISCARD, Ordering::AcqRel, Ordering::Acquire)
                .ok();
        }
    }

    pub(crate) fn client(&self) -> &Client {
        match self {
            Conn::Pooled(pooled) => pooled.object(),
            Conn::Session(session) => &session.client,
        }
    }

    /// The client, handed out to the caller (a guard's `Deref`): counted in
    /// [`borrows`](Self::borrows).
    pub(crate) fn user_client(&self) -> &Client {
        match self {
            Conn::Pooled(pooled) => {
                pooled.borrows.fetch_add(1, Ordering::SeqCst);
                pooled.object()
            }
            Conn::Session(session) => session.client(),
        }
    }

    /// How many times the client of this connection has been handed out to the caller (by a
    /// guard's `Deref`, or a session's `Deref` and `client()`). Only the caller's statements can
    /// release a lock behind pglock's back while the connection lives, so the loss monitor
    /// checks the server's lock table only after this changes (and at a slow fallback cadence).
    pub(crate) fn borrows(&self) -> u64 {
        match self {
            Conn::Pooled(pooled) => pooled.borrows.load(Ordering::SeqCst),
            Conn::Session(session) => session.borrows.load(Ordering::SeqCst),
        }
    }

    /// Whether the connection is verified as direct to a primary's backend (see `backend`).
    pub(crate) fn verification(&self) -> &Verification {
        match self {
            Conn::Pooled(pooled) if pooled.trust_verdict => &pooled.remembered.backend,
            Conn::Pooled(_) => &backend::NEVER_VERIFIED,
            Conn::Session(session) => &session.backend,
        }
    }

    /// Records the verdict of a checking statement's answer (see [`Verification::learn`]): a
    /// pooled connection's verdict holds for every source of its pool that trusts one.
    pub(crate) fn learn_backend(&self, ran_on: i32, on_standby: bool) {
        if let Conn::Pooled(pooled) = self {
            if !pooled.trust_verdict {
                return;
            }
        }
        self.verification().learn(self.client(), ran_on, on_standby);
    }

    pub(crate) fn downgrade(&self) -> WeakConn {
        match self {
            Conn::Pooled(pooled) => WeakConn::Pooled(Arc::downgrade(pooled)),
            Conn::Session(session) => WeakConn::Session(Arc::downgrade(session)),
        }
    }

    /// Where this connection's loss monitor lives.
    pub(crate) fn monitor_cell(&self) -> &OnceLock<Arc<Monitor>> {
        match self {
            Conn::Pooled(pooled) => &pooled.monitor,
            Conn::Session(session) => &session.monitor,
        }
    }

    /// The health check the connection imposes on its monitor (a session's own setting).
    pub(crate) fn health(&self) -> Option<HealthCheck> {
        match self {
            Conn::Pooled(_) => None,
            Conn::Session(session) => session.health,
        }
    }

    /// Reports the end of the connection task, when pglock runs it.
    pub(crate) fn closed_watch(&self) -> Option<watch::Receiver<Option<String>>> {
        match self {
            Conn::Pooled(_) => None,
            Conn::Session(session) => session.closed.clone(),
        }
    }

    /// Detaches a pooled connection from its pool for good and keeps it open until the process
    /// exits, so whatever it holds stays held. A shared session is left as it is.
    pub(crate) fn leak(self) {
        if let Conn::Pooled(pooled) = self {
            pooled.fate.store(LEAK, Ordering::Release);
        }
    }

    /// The statement for `sql` if pglock has prepared it on this connection (this checkout, for
    /// a pooled one): no future, no lock but a short mutex.
    #[inline(always)]
    pub(crate) fn cached(&self, sql: &'static str) -> Option<Statement> {
        match self {
            Conn::Pooled(pooled) => pooled.cached(sql),
            Conn::Session(session) => session.cached(sql),
        }
    }

    pub(crate) async fn prepare(
        &self,
        sql: &'static str,
    ) -> Result<Statement, tokio_postgres::Error> {
        match self {
            Conn::Pooled(pooled) => pooled.prepare(sql).await,
            Conn::Session(session) => session.prepare(sql).await,
        }
    }

    /// Closes a pooled connection instead of returning it, so the server ends its session and
    /// frees whatever it held. A shared session stays open: it is not ours to close.
    pub(crate) fn discard(self) {
        // Whoever drops the connection last (this guard, or a probe in flight) closes it.
        self.mark_discard();
    }

    /// Marks `key` held on a shared session (and its transaction open, for transaction scope)
    /// until the returned reservation is dropped. Waits while an abandoned acquisition of the
    /// same key is still being cleaned up. While another guard or acquisition on the session
    /// holds the key, waits in-process for it to go, as `wait` says: `None` (a `try_lock`)
    /// answers `Ok(None)` at once, `Some(None)` waits as long as it takes, `Some(Some(at))`
    /// until `at`, then answers `Ok(None)`.
    pub(crate) async fn reserve(
        &self,
        key: AdvisoryKey,
        scope: LockScope,
        wait: Option<Option<tokio::time::Instant>>,
    ) -> Result<Option<Reservation>> {
        match self {
            Conn::Session(session) => session.reserve(key, scope, wait).await,
            Conn::Pooled(_) => Ok(Some(Reservation::none(key, scope))),
        }
    }
}
