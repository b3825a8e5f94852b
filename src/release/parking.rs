//! The parking of a lock: a pooled connection kept aside, after a dropped guard's unlock, for the
//! next acquisition of the same lock.
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
//!
//! What the guard's unlock leaves on the connection (a release on the wire, or an unlock not
//! sent yet) goes with it: see `in_flight` and `deferred`.

use std::sync::{Arc, Mutex, Weak};

use tokio::sync::oneshot;

use crate::conn::handle::Conn;
use crate::release::deferred::DeferredUnlock;
use crate::release::flush::{FlushBell, Flushed};
use crate::release::in_flight::ReleaseInFlight;

/// Where an [`AdvisoryLock`](crate::AdvisoryLock) parks the connection of its last dropped
/// guard. Shared by the lock's clones.
#[derive(Default)]
pub(crate) struct Parking {
    parked: Mutex<Option<Claimed>>,
    /// Wakes the task that sends a deferred unlock, or returns an idle connection to the pool,
    /// that no acquisition claimed.
    bell: FlushBell,
}

/// What a claimer finds in the parking.
pub(crate) enum Claimed {
    /// A connection whose unlock is on the wire.
    InFlight(Parked),
    /// A connection whose unlock is not sent yet.
    Deferred(DeferredUnlock),
    /// A connection whose unlock was confirmed (`unlock`), parked until the releasing task
    /// yields.
    Idle(Conn),
}

/// A connection whose release is in flight, and how that release will end.
pub(crate) struct Parked {
    pub(crate) conn: Conn,
    /// `true` once the release is confirmed; `false` (or a closed channel) if it failed, and
    /// the connection is then marked to be closed.
    pub(crate) released: PriorRelease,
    /// The release itself, for the claimer to read its answer.
    pub(crate) in_flight: Weak<ReleaseInFlight>,
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
    pub(crate) fn park(
        &self,
        conn: Conn,
        released: PriorRelease,
        in_flight: Weak<ReleaseInFlight>,
    ) {
        let before = self
            .parked
            .lock()
            .unwrap()
            .replace(Claimed::InFlight(Parked {
                conn,
                released,
                in_flight,
            }));
        send_if_deferred(before);
    }

    /// Parks `conn`, whose lock was released and confirmed, for the next acquisition of the
    /// lock: a `lock` + `unlock` loop then stays on one connection (one backend) instead of
    /// checking out another each time. The connection goes back to the pool as soon as the
    /// releasing task yields, unless an acquisition took it first.
    pub(crate) fn park_idle(self: &Arc<Self>, conn: Conn) {
        let displaced = self.parked.lock().unwrap().replace(Claimed::Idle(conn));
        send_if_deferred(displaced);
        self.bell.ring(self);
    }

    /// Takes the parked connection, if one is parked and still open.
    /// Keeps a dropped guard's unlock here, to be sent once the dropping task yields unless an
    /// acquisition claims it first.
    pub(crate) fn defer(self: &Arc<Self>, unlock: DeferredUnlock) {
        let displaced = self
            .parked
            .lock()
            .unwrap()
            .replace(Claimed::Deferred(unlock));
        send_if_deferred(displaced);
        self.bell.ring(self);
    }

    pub(crate) fn claim(&self) -> Option<Claimed> {
        let claimed = self.parked.lock().unwrap().take()?;
        match claimed {
            Claimed::InFlight(parked) => {
                (!parked.conn.client().is_closed()).then_some(Claimed::InFlight(parked))
            }
            Claimed::Deferred(deferred) if deferred.conn().client().is_closed() => {
                // Sent all the same: it fails, which closes the connection for good.
                deferred.send_alone();
                None
            }
            Claimed::Idle(conn) if conn.client().is_closed() => None,
            other => Some(other),
        }
    }

    /// Lets the parked connection go back to the pool as soon as it is released: an idle one
    /// at once, one with its unlock in flight when its release task confirms it, one with its
    /// unlock deferred once that is sent (now).
    pub(crate) fn let_go(&self) {
        let parked = self.parked.lock().unwrap().take();
        if let Some(Claimed::Deferred(deferred)) = parked {
            deferred.send_alone();
            // Sending parked it again, with the unlock in flight.
            self.parked.lock().unwrap().take();
        }
    }

    /// Called by the release task of `conn` once the release has answered: takes the
    /// connection out of the parking if nobody claimed it, so that it can go back to the pool.
    pub(crate) fn unpark(&self, conn: &Conn) {
        let mut parked = self.parked.lock().unwrap();
        if matches!(&*parked, Some(Claimed::InFlight(p)) if p.conn.same_as(conn)) {
            *parked = None;
        }
    }
}

/// A deferred unlock displaced from its place by a newer one is sent at once.
pub(crate) fn send_if_deferred(displaced: Option<Claimed>) {
    if let Some(Claimed::Deferred(deferred)) = displaced {
        deferred.send_alone();
    }
}

impl Flushed for Parking {
    fn bell(&self) -> &FlushBell {
        &self.bell
    }

    /// A connection whose unlock is in flight is left to its release task.
    fn flush(&self) {
        let mut parked = self.parked.lock().unwrap();
        let taken = match &*parked {
            Some(Claimed::Deferred(_) | Claimed::Idle(_)) => parked.take(),
            _ => None,
        };
        // Out of the lock: an idle connection goes back to its pool as it drops.
        drop(parked);
        if let Some(Claimed::Deferred(deferred)) = taken {
            deferred.send_alone();
        }
    }
}

impl Drop for Parking {
    fn drop(&mut self) {
        self.bell.stop();
    }
}

impl std::fmt::Debug for Parking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parked = self.parked.lock().map(|p| p.is_some()).unwrap_or(false);
        f.debug_struct("Parking").field("parked", &parked).finish()
    }
}
