//! The pooled connection of a dropped guard, handed to the next acquisition of the same lock
//! while its release is still on the wire.
//!
//! A guard dropped on a pooled connection queues its `pg_advisory_unlock` and confirms it in the
//! background; the connection goes back to the pool only once the unlock has answered, so that a
//! failed unlock can close it instead. A loop of `lock` + drop would then take its next lock on
//! another pooled connection, whose backend must be woken by the unlock of the first: two
//! sockets and a cross-process wakeup per cycle. Instead, the lock keeps the connection aside
//! (parks it) for the length of that round trip, and the next acquisition of the same
//! [`AdvisoryLock`](crate::AdvisoryLock) (or one of its clones) sends its lock on it, right
//! behind the unlock: one round trip per cycle, as the wire allows.
//!
//! The acquisition that claims a parked connection trusts its own answer only once the unlock
//! before it has been confirmed. If that unlock failed, the connection is closed (which frees
//! whatever the session held, the new grant included) and the acquisition starts again on a
//! fresh connection from the pool.

use std::sync::Mutex;

use tokio::sync::oneshot;

use crate::connection::Conn;

/// Where an [`AdvisoryLock`](crate::AdvisoryLock) parks the connection of its last dropped
/// guard. Shared by the lock's clones.
#[derive(Default)]
pub(crate) struct Parking {
    parked: Mutex<Option<Parked>>,
}

/// A connection whose release is in flight, and how that release will end.
pub(crate) struct Parked {
    pub(crate) conn: Conn,
    /// `true` once the release is confirmed; `false` (or a closed channel) if it failed, and
    /// the connection is then marked to be closed.
    pub(crate) released: PriorRelease,
}

/// The outcome of the release that was in flight on a claimed connection.
pub(crate) type PriorRelease = oneshot::Receiver<bool>;

/// The releasing side of a parked connection: reports the outcome to a claimer, if any.
pub(crate) type ReleaseReport = oneshot::Sender<bool>;

impl Parking {
    /// A channel for the outcome of a release: the task that confirms the release keeps the
    /// sender, [`park`](Self::park) takes the receiver.
    pub(crate) fn report_channel() -> (ReleaseReport, PriorRelease) {
        oneshot::channel()
    }

    /// Parks `conn`, whose release is already queued on it (so that whatever a claimer sends
    /// travels behind the release), until its release task takes it back. A connection parked
    /// before is left to its own release task.
    pub(crate) fn park(&self, conn: Conn, released: PriorRelease) {
        *self.parked.lock().unwrap() = Some(Parked { conn, released });
    }

    /// Takes the parked connection, if one is parked and still open.
    pub(crate) fn claim(&self) -> Option<Parked> {
        let parked = self.parked.lock().unwrap().take()?;
        (!parked.conn.client().is_closed()).then_some(parked)
    }

    /// Called by the release task of `conn` once the release has answered: takes the
    /// connection out of the parking if nobody claimed it, so that it can go back to the pool.
    pub(crate) fn unpark(&self, conn: &Conn) {
        let mut parked = self.parked.lock().unwrap();
        if parked.as_ref().is_some_and(|p| p.conn.same_as(conn)) {
            *parked = None;
        }
    }
}

impl std::fmt::Debug for Parking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parked = self.parked.lock().map(|p| p.is_some()).unwrap_or(false);
        f.debug_struct("Parking").field("parked", &parked).finish()
    }
}
