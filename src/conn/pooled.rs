//! A connection checked out of a deadpool pool, and what pglock remembers of each pooled
//! connection across checkouts.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use deadpool_postgres::{Object, StatementCache};
use tokio_postgres::Statement;

use crate::conn::backend::Verification;
use crate::conn::prepared::PreparedStatements;
use crate::loss::monitor::Monitor;

/// A pooled connection, shared between a guard and its loss monitor.
///
/// It goes back to the pool when the last of them lets go, unless it was marked to be closed
/// ([`Conn::discard`]) or leaked; the monitor only ever holds it for the length of a probe.
pub(crate) struct Pooled {
    pub(super) object: Option<Object>,
    pub(super) fate: AtomicU8,
    pub(super) monitor: OnceLock<Arc<Monitor>>,
    /// What pglock knows of this connection, kept across checkouts (see [`remembered`]).
    pub(super) remembered: Arc<Remembered>,
    /// Whether this checkout's source uses the connection's verdict (see `Conn::verification`).
    pub(super) trust_verdict: bool,
    /// How many times a guard handed the client out to the caller (see [`Conn::borrows`]).
    pub(super) borrows: AtomicU64,
}

/// What pglock knows of one pooled connection, whichever lock or source checks it out.
#[derive(Debug, Default)]
pub(crate) struct Remembered {
    /// pglock's statements prepared there.
    statements: PreparedStatements,
    /// Whether the connection is verified as direct to a primary's backend.
    pub(super) backend: Verification,
}

/// What pglock knows of each pooled connection of the process, by the address of the
/// connection's deadpool statement cache: each connection of a deadpool pool has its own, which
/// lives exactly as long as the connection.
///
/// Process-wide, not per [`ConnectionSource`](crate::ConnectionSource): every
/// `AdvisoryLock::new(&pool, ...)` builds a new source, and a lock made for one acquisition (one
/// per request, say) must still find its connection's statements prepared and its backend
/// verified. The weak reference keeps the cache's allocation, so no other connection's cache
/// can take its address while the entry exists; entries whose connection is gone are swept
/// when the list is full, and a connection pglock closes is forgotten at once.
static KNOWN: Mutex<Vec<(Weak<StatementCache>, Arc<Remembered>)>> = Mutex::new(Vec::new());

/// What pglock knows of `object`'s connection: remembered from an earlier checkout, or new.
pub(super) fn remembered(object: &Object) -> Arc<Remembered> {
    let cache = &object.statement_cache;
    let mut known = KNOWN.lock().unwrap();
    if let Some((_, remembered)) = known
        .iter()
        .find(|(known, _)| known.as_ptr() == Arc::as_ptr(cache))
    {
        return remembered.clone();
    }
    if known.len() == known.capacity() {
        known.retain(|(cache, _)| cache.strong_count() > 0);
    }
    let remembered = Arc::new(Remembered::default());
    known.push((Arc::downgrade(cache), remembered.clone()));
    remembered
}

/// Forgets `object`'s connection, which pglock is closing, leaking or detaching.
pub(super) fn forget(object: &Object) {
    let cache = Arc::as_ptr(&object.statement_cache);
    KNOWN
        .lock()
        .unwrap()
        .retain(|(known, _)| known.as_ptr() != cache);
}

pub(super) const RETURN: u8 = 0;

pub(super) const DISCARD: u8 = 1;

pub(super) const LEAK: u8 = 2;

impl Pooled {
    pub(super) fn object(&self) -> &Object {
        self.object
            .as_ref()
            .expect("a pooled connection holds its object until dropped")
    }

    #[inline(always)]
    pub(super) fn cached(&self, sql: &'static str) -> Option<Statement> {
        self.remembered.statements.cached(sql)
    }

    pub(super) async fn prepare(
        &self,
        sql: &'static str,
    ) -> Result<Statement, tokio_postgres::Error> {
        self.remembered.statements.prepare(self.object(), sql).await
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let Some(object) = self.object.take() else {
            return;
        };
        match self.fate.load(Ordering::Acquire) {
            RETURN => drop(object),
            fate => {
                forget(&object);
                let client = Object::take(object);
                if fate == DISCARD {
                    drop(client);
                } else {
                    std::mem::forget(client);
                }
            }
        }
    }
}
