//! Requests queued on a connection now, whose answers are read in the background.
//!
//! tokio-postgres writes a request into its connection's queue on the first poll of the
//! request's future. pglock relies on that to order an undo or a release before anything sent
//! later on the connection: it polls the future once, synchronously, then leaves the rest to a
//! task. The first poll may also finish the future (the connection is closed, say), and a
//! finished `async` block must never be polled again ("`async fn` resumed after completion",
//! a panic, which aborts a process built with `panic = "abort"`). These functions are the only
//! places that poll once, so that no caller can spawn a finished future.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use tokio::runtime::Handle;

/// A request's future, to poll once and then finish in the background.
pub(crate) type Task = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Polls `task` once, which queues its request on the connection: the task, to finish, if it
/// is still pending; `None` if that first poll finished it.
#[must_use = "a pending task must still be finished (spawned or awaited)"]
pub(crate) fn queue(mut task: Task) -> Option<Task> {
    poll_once(task.as_mut()).is_pending().then_some(task)
}

/// [`queue`]s `task`, and spawns what is left of it on the current runtime. Without a runtime
/// the request queued still runs on the server; only its answer is not read.
pub(crate) fn queue_and_spawn(task: Task) {
    spawn(queue(task));
}

/// Spawns `task` (the remainder of a [`queue`]d one, if any) on the current runtime; without a
/// runtime it is dropped.
pub(crate) fn spawn(task: Option<Task>) {
    if let (Some(task), Ok(runtime)) = (task, Handle::try_current()) {
        runtime.spawn(task);
    }
}

/// Polls `future` once, queueing its request, and drops it: for requests whose answer nobody
/// reads (no runtime to read it on, or a runtime shutting down).
pub(crate) fn queue_and_forget<F: Future + ?Sized>(future: Pin<&mut F>) {
    let _ = poll_once(future);
}

/// Polls `future` once, with a waker that does nothing.
fn poll_once<F: Future + ?Sized>(future: Pin<&mut F>) -> Poll<F::Output> {
    future.poll(&mut Context::from_waker(Waker::noop()))
}
