//! A release on the wire whose answer nobody reads yet ([`ReleaseInFlight`]).
//!
//! It is offered to the next acquisition on the same connection (through the parking, or
//! through the shared [`Session`](crate::Session)), which reads it alongside its own statement,
//! as a hand-written pipeline would. Only a release nobody adopts before its answer arrives gets
//! a task of its own.

use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Wake, Waker};

use tokio::runtime::Handle;

/// The task that reads a release's answer and settles the connection accordingly.
pub(crate) type ReleaseTask = crate::background::Task;

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
