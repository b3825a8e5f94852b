//! A connection checked out of a deadpool pool, and the statements pglock prepared on each of
//! the pool's connections.

use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use deadpool_postgres::{Object, ObjectId};
use tokio_postgres::Statement;

use crate::conn::backend::Verification;
use crate::conn::session::find_prepared;
use crate::error::Result;
use crate::loss::monitor::Monitor;

/// A pooled connection, shared between a guard and its loss monitor.
///
/// It goes back to the pool when the last of them lets go, unless it was marked to be closed
/// ([`Conn::discard`]) or leaked; the monitor only ever holds it for the length of a probe.
pub(crate) struct Pooled {
    pub(super) object: Option<Object>,
    pub(super) fate: AtomicU8,
    pub(super) monitor: OnceLock<Arc<Monitor>>,
    /// pglock's statements prepared on this connection and its verification, remembered across
    /// checkouts by the source, so that acquisitions skip deadpool's statement cache (which
    /// hashes the SQL text every time).
    pub(super) remembered: Arc<Remembered>,
    /// Where `remembered` is kept, to forget it when the connection is closed.
    pub(super) prepared: Arc<PreparedByConnection>,
    /// How many times a guard handed the client out to the caller (see [`Conn::borrows`]).
    pub(super) borrows: AtomicU64,
}

/// What pglock remembers about one pooled connection across checkouts.
#[derive(Default)]
pub(crate) struct Remembered {
    /// The last few statements pglock prepared there, most recent first.
    statements: Mutex<[Option<(&'static str, Statement)>; PER_CONNECTION]>,
    /// Whether the connection is verified as direct to a primary's backend.
    pub(super) backend: Verification,
}

/// How many statements are remembered per pooled connection: an acquiring statement, its
/// unlock and the combined one, in their checking and plain forms, for two kinds of acquisition
/// (say `lock` and `try_lock`).
const PER_CONNECTION: usize = 12;

/// The statements pglock prepared on each connection of one pool, by deadpool's [`ObjectId`]
/// (unique within a pool, never reused).
///
/// Only a shortcut: a connection it does not know goes through deadpool's statement cache, as
/// before. It keeps at most twice the pool's size; beyond that the oldest connection (lowest
/// id, most likely closed since) is forgotten. A connection pglock closes is forgotten at
/// once; one the pool closes lingers until evicted.
pub(crate) struct PreparedByConnection {
    capacity: usize,
    entries: Mutex<Vec<(ObjectId, Arc<Remembered>)>>,
}

impl PreparedByConnection {
    pub(super) fn new(pool_size: usize) -> Self {
        PreparedByConnection {
            capacity: (pool_size * 2).max(4),
            entries: Mutex::new(Vec::new()),
        }
    }

    /// What is known of connection `id`, remembered from an earlier checkout or new.
    pub(super) fn of(&self, id: ObjectId) -> Arc<Remembered> {
        let mut entries = self.entries.lock().unwrap();
        if let Some((_, remembered)) = entries.iter().find(|(known, _)| *known == id) {
            return remembered.clone();
        }
        if entries.len() >= self.capacity {
            let oldest = (0..entries.len())
                .min_by_key(|&i| entries[i].0)
                .expect("a full list is not empty");
            entries.swap_remove(oldest);
        }
        let remembered = Arc::new(Remembered::default());
        entries.push((id, remembered.clone()));
        remembered
    }

    pub(super) fn forget(&self, id: ObjectId) {
        self.entries
            .lock()
            .unwrap()
            .retain(|(known, _)| *known != id);
    }
}

impl fmt::Debug for PreparedByConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PreparedByConnection")
            .field("connections", &self.entries.lock().unwrap().len())
            .finish_non_exhaustive()
    }
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

    pub(super) fn cached(&self, sql: &'static str) -> Option<Statement> {
        find_prepared(
            self.remembered.statements.lock().unwrap().iter().flatten(),
            sql,
        )
    }

    pub(super) async fn prepare(
        &self,
        sql: &'static str,
    ) -> Result<Statement, tokio_postgres::Error> {
        if let Some(statement) = self.cached(sql) {
            return Ok(statement);
        }
        let statement = self.object().prepare_cached(sql).await?;
        let mut statements = self.remembered.statements.lock().unwrap();
        statements.rotate_right(1);
        statements[0] = Some((sql, statement.clone()));
        Ok(statement)
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
                self.prepared.forget(Object::id(&object));
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
