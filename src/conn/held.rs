//! The connection an attempt or a guard holds until its lock is released, given back (or
//! discarded, when its state is unknown) when it is finished.

use crate::conn::handle::Conn;

/// Holds a connection while its fate is undecided: [`finish`](Self::finish) returns it (to the
/// pool, or to the shared session), dropping it unfinished closes a pooled connection.
pub(crate) struct HeldConn {
    conn: Option<Conn>,
}

impl HeldConn {
    pub(crate) fn new(conn: Conn) -> Self {
        HeldConn { conn: Some(conn) }
    }

    pub(crate) fn conn(&self) -> &Conn {
        self.conn
            .as_ref()
            .expect("a held connection is there until finished")
    }

    /// Finishes: the lock is released (`clean`) or its state is unknown.
    pub(crate) fn finish(mut self, clean: bool) {
        let conn = self.conn.take().expect("finished once");
        if !clean {
            conn.discard();
        }
    }

    pub(crate) fn into_conn(mut self) -> Conn {
        self.conn.take().expect("taken once")
    }
}

impl Drop for HeldConn {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            conn.discard();
        }
    }
}
