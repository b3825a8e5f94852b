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
//!
//! The same goes for reading the release's answer: a [`ReleaseInFlight`] is offered to the next
//! acquisition on the same connection (through the parking, or through the shared
//! [`Session`](crate::Session)), which reads it alongside its own statement, as a hand-written
//! pipeline would. Only a release nobody adopts before its answer arrives gets a task of its own.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Wake, Waker};

use tokio::runtime::Handle;
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
        *self.parked.lock().unwrap() = Some(Parked {
            conn,
            released,
            in_flight,
        });
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

/// The task that reads a release's answer and settles the connection accordingly.
pub(crate) type ReleaseTask = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A release queued on a connection whose answer nobody reads yet.
///
/// Either the next acquisition on the connection adopts the task and polls it alongside its own
/// statement, or, when the answer arrives first, the wake-up it causes spawns the task on the
/// runtime. Holders other than the waker keep a [`Weak`] reference: once the answer has been
/// read, nothing is left to adopt.
pub(crate) struct ReleaseInFlight {
    state: Mutex<InFlightState>,
    runtime: Handle,
}

struct InFlightState {
    /// The task, until adopted or spawned.
    task: Option<ReleaseTask>,
    /// Woken before the task was stored: [`start`](ReleaseInFlight::start) spawns it.
    woken: bool,
}

impl ReleaseInFlight {
    /// Polls `task` once, which queues its request on the connection, then hands `offer` a
    /// reference through which the next user of the connection can adopt the task. `offer` is
    /// not called if the task is over at once.
    ///
    /// `offer` runs before the task can run anywhere else: the task may take its connection
    /// back from where `offer` puts it.
    pub(crate) fn start(mut task: ReleaseTask, runtime: Handle, offer: impl FnOnce(Weak<Self>)) {
        let this = Arc::new(ReleaseInFlight {
            state: Mutex::new(InFlightState {
                task: None,
                woken: false,
            }),
            runtime,
        });
        let waker = Waker::from(this.clone());
        if task
            .as_mut()
            .poll(&mut Context::from_waker(&waker))
            .is_ready()
        {
            return;
        }
        // A wake-up from now on waits for the lock, and then finds the task.
        let mut state = this.state.lock().unwrap();
        offer(Arc::downgrade(&this));
        if state.woken {
            drop(state);
            this.runtime.spawn(task);
        } else {
            state.task = Some(task);
        }
    }

    /// Takes the task over, to poll it in the caller's own task; `None` if it is already
    /// running on its own (or over).
    pub(crate) fn adopt(in_flight: &Weak<Self>) -> Option<ReleaseTask> {
        in_flight.upgrade()?.state.lock().unwrap().task.take()
    }
}

impl Wake for ReleaseInFlight {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let mut state = self.state.lock().unwrap();
        match state.task.take() {
            Some(task) => {
                drop(state);
                self.runtime.spawn(task);
            }
            None => state.woken = true,
        }
    }
}
