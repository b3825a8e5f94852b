//! The one task that sends what the owners of a [`FlushBell`] record, woken when they ring it:
//! the deferred unlocks of a shared session or of a lock's parking.

use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;
use tokio::runtime::Handle;

/// The bell of the task that sends what dropped guards left to the next acquisition and no
/// acquisition claimed: a session's deferred unlocks, or what a parking holds (a deferred
/// unlock, or an idle connection to return to the pool).
///
/// One long-lived task (the flusher) per session or parking, started by the first deferral
/// and woken by each, unless another task listens instead ([`listen`](Self::listen)): it
/// sends whatever is pending when it runs, which on a current-thread runtime is once the tasks
/// that deferred them have yielded. A task spawned per dropped
/// guard instead cost an allocation and Tokio's bookkeeping on every `lock` + drop cycle,
/// about a point of that loop's rate.
#[derive(Default)]
pub(crate) struct FlushBell(Mutex<Option<Arc<Bell>>>);

/// What wakes one flusher: a flag and the flusher's waker. Rung once per dropped guard, so kept
/// to two atomic operations and a wake-up (`Notify` takes a lock and walks a waiter list).
#[derive(Default)]
pub(crate) struct Bell {
    pending: AtomicBool,
    flusher: AtomicWaker,
}

impl Bell {
    pub(crate) fn ring(&self) {
        self.pending.store(true, Ordering::Release);
        self.flusher.wake();
    }

    /// Whether the bell rang since the last check, once the next ring is sure to wake the task
    /// of `cx`: registered on every check, since a ring's wake-up takes the waker, and before
    /// the flag is read, so that a ring in between is seen here or wakes the task again.
    #[inline]
    pub(crate) fn poll_ring(&self, cx: &Context<'_>) -> bool {
        self.flusher.register(cx.waker());
        // Read before it is swapped: most checks (the connection task's polls) find nothing.
        self.pending.load(Ordering::Relaxed) && self.pending.swap(false, Ordering::Acquire)
    }

    /// Waits for the next ring (or returns at once if one came since the last wait).
    async fn next_ring(&self) {
        poll_fn(|cx| {
            if self.poll_ring(cx) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }
}

/// What a flusher serves.
pub(crate) trait Flushed: Send + Sync + 'static {
    fn bell(&self) -> &FlushBell;
    /// Sends (or returns to the pool) whatever is pending.
    fn flush(&self);
}

impl FlushBell {
    /// Wakes the flusher of `owner`, or starts one on the current runtime when none runs (not
    /// started yet, or dropped with its runtime). Outside a runtime, with no flusher to wake,
    /// flushes `owner` at once.
    pub(crate) fn ring<T: Flushed>(&self, owner: &Arc<T>) {
        let (new, runtime) = {
            let mut bell = self.0.lock().unwrap();
            if let Some(bell) = &*bell {
                bell.ring();
                return;
            }
            // Looked up only here: a ring that wakes a running flusher (the common case) needs
            // no runtime handle, whose clone costs a thread-local lookup and an atomic count.
            let Ok(runtime) = Handle::try_current() else {
                drop(bell);
                owner.flush();
                return;
            };
            let new = Arc::new(Bell::default());
            *bell = Some(new.clone());
            (new, runtime)
        };
        let flusher = Flusher {
            owner: Arc::downgrade(owner),
            bell: new,
        };
        // Out of the lock: a runtime shutting down drops the task inside `spawn`, and the
        // flusher's drop (which sends what is pending) takes the lock.
        runtime.spawn(flusher.run());
    }

    /// A bell that a task other than a flusher answers (see [`DeferredUnlocks::drive`]): rings
    /// wake that task, and no flusher is started while it listens.
    pub(crate) fn listen(&self) -> Arc<Bell> {
        let bell = Arc::new(Bell::default());
        *self.0.lock().unwrap() = Some(bell.clone());
        bell
    }

    /// Forgets `bell`, if it is still the one rung: the next ring starts a flusher.
    pub(crate) fn stop_listening(&self, bell: &Arc<Bell>) {
        let mut current = self.0.lock().unwrap();
        if current
            .as_ref()
            .is_some_and(|current| Arc::ptr_eq(current, bell))
        {
            *current = None;
        }
    }

    /// Ends the flusher: called as its owner goes.
    pub(crate) fn stop(&self) {
        if let Some(bell) = self.0.lock().unwrap().take() {
            bell.ring();
        }
    }
}

struct Flusher<T: Flushed> {
    owner: Weak<T>,
    bell: Arc<Bell>,
}

impl<T: Flushed> Flusher<T> {
    async fn run(self) {
        loop {
            // The first round answers the ring that started the flusher. The owner is only
            // borrowed for a round, so that it can go between rounds.
            match self.owner.upgrade() {
                Some(owner) => owner.flush(),
                None => return,
            }
            self.bell.next_ring().await;
        }
    }
}

impl<T: Flushed> Drop for Flusher<T> {
    /// Ended, or dropped with its runtime: the bell goes first, so that a deferral after this
    /// point starts a new flusher, and what was deferred before is sent now.
    fn drop(&mut self) {
        let Some(owner) = self.owner.upgrade() else {
            return;
        };
        owner.bell().stop_listening(&self.bell);
        owner.flush();
    }
}
