//! [`CohortLock`]: many tasks of one process share one server-side lock (lock cohorting).
//!
//! With a plain [`AdvisoryLock`] on a pool, every task that waits for a busy key takes a pooled
//! connection into PostgreSQL's lock queue, and every handoff between two tasks of the same
//! process costs a round trip (unlock on one connection, grant on another). A `CohortLock`
//! queues the tasks of this process in memory instead: only one of them waits in PostgreSQL,
//! and when a holder releases while local tasks wait, the held lock (with its connection) moves
//! to the next local waiter without touching the server.
//!
//! Handoffs are bounded, so that other processes waiting for the key in PostgreSQL are not
//! starved: after [`max_handoffs`](CohortLock::max_handoffs) local handoffs, or once the cohort
//! has held the lock for [`max_hold`](CohortLock::max_hold), the next release goes to the
//! server, and the next local waiter queues in PostgreSQL behind whoever was already waiting
//! there.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::ops::Deref;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::guard::AdvisoryLockGuard;
use crate::lock::AdvisoryLock;
use crate::scope::LockScope;

/// An exclusive advisory lock whose local waiters are served in-process (lock cohorting).
///
/// Clone it (cheap, shared state) into every task of this process that takes the key: the
/// tasks then queue in memory, in arrival order, and at most one connection of this process
/// waits in PostgreSQL for the key. Two `CohortLock`s built separately do not share a queue:
/// each behaves as a separate process would.
///
/// # Fairness to other processes
///
/// A release hands the lock to the next local waiter without a round trip only while the
/// cohort's *budget* lasts: at most [`max_handoffs`](Self::max_handoffs) handoffs (default
/// 1,000) and at most [`max_hold`](Self::max_hold) (default 5 ms) since the cohort took the
/// lock from the server. The release after that goes to the server, and the next local waiter
/// asks the server again, behind sessions already queued there (PostgreSQL grants a busy key in
/// queue order). So another process that waits for the key gets it within
///
/// > `max_hold` + the longest single critical section + one round trip
///
/// of queueing (the budget is checked at release, so a critical section that started in
/// budget finishes first). Without other waiters the cost of the budget is one extra round
/// trip per `max_handoffs` handoffs.
///
/// # Examples
///
/// ```no_run
/// # async fn demo(pool: deadpool_postgres::Pool) -> pglock::Result<()> {
/// use pglock::{AdvisoryLock, CohortLock};
///
/// let lock = CohortLock::new(AdvisoryLock::new(&pool, "counter"));
/// let mut tasks = Vec::new();
/// for _ in 0..100 {
///     let lock = lock.clone();
///     tasks.push(tokio::spawn(async move {
///         let guard = lock.lock().await?;
///         guard.execute("UPDATE counters SET n = n + 1", &[]).await?;
///         Ok::<_, pglock::Error>(())
///     }));
/// }
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct CohortLock {
    inner: Arc<Inner>,
}

struct Inner {
    lock: AdvisoryLock,
    max_handoffs: u32,
    max_hold: Duration,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// A local task holds the server lock, or holds the right to ask the server for it.
    owned: bool,
    /// Local tasks waiting for their turn, in arrival order. Entries whose task is gone are
    /// skipped when their turn comes.
    waiters: VecDeque<oneshot::Sender<Turn>>,
}

/// What a local waiter is given when its turn comes.
enum Turn {
    /// The lock itself, still held on the server.
    Handoff(Held),
    /// The right to ask the server for the lock.
    Acquire,
}

/// The server lock while the cohort holds it.
struct Held {
    guard: AdvisoryLockGuard,
    /// When the cohort took the lock from the server.
    since: Instant,
    /// Local handoffs since then.
    handoffs: u32,
}

impl CohortLock {
    /// A cohort around `lock`, which must be session-scoped (the default).
    ///
    /// The lock's source may be a pool (the usual case) or a [`Session`](crate::Session); its
    /// wait strategy is used for the one waiter that asks the server.
    pub fn new(lock: AdvisoryLock) -> Self {
        CohortLock {
            inner: Arc::new(Inner {
                lock,
                max_handoffs: 1_000,
                max_hold: Duration::from_millis(5),
                state: Mutex::new(State::default()),
            }),
        }
    }

    /// Sets how many local handoffs may follow one server acquisition (default 1,000; 0 turns
    /// cohorting off: every release goes to the server).
    ///
    /// Call it before cloning the lock: it builds a new, separate cohort.
    pub fn max_handoffs(self, n: u32) -> Self {
        self.rebuild(n, self.inner.max_hold)
    }

    /// Sets how long the cohort may keep the lock from the server by handing it on locally
    /// (default 5 ms). Other processes wait at most about this long plus one critical section.
    ///
    /// Call it before cloning the lock: it builds a new, separate cohort.
    pub fn max_hold(self, d: Duration) -> Self {
        self.rebuild(self.inner.max_handoffs, d)
    }

    fn rebuild(&self, max_handoffs: u32, max_hold: Duration) -> Self {
        CohortLock {
            inner: Arc::new(Inner {
                lock: self.inner.lock.clone(),
                max_handoffs,
                max_hold,
                state: Mutex::new(State::default()),
            }),
        }
    }

    /// The underlying lock.
    pub fn advisory_lock(&self) -> &AdvisoryLock {
        &self.inner.lock
    }

    /// Acquires the lock exclusively, from a local holder or from the server, waiting as long
    /// as it takes.
    ///
    /// # Errors
    ///
    /// As [`AdvisoryLock::lock`], for the task that asks the server; [`Error::Config`] if the
    /// lock is transaction-scoped.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe. A task dropped while queued locally leaves the queue; if the lock was
    /// handed to it in the meantime, it moves on to the next waiter (or back to the server), so
    /// no lock is ever parked with a task that cannot release it. A task dropped while asking
    /// the server cancels as [`AdvisoryLock::lock`] does and passes its turn on.
    pub async fn lock(&self) -> Result<CohortGuard> {
        self.acquire(None)
            .await
            .map(|guard| guard.expect("an acquisition without deadline returns a guard"))
    }

    /// Acquires the lock if no local task holds it and the server grants it at once;
    /// `Ok(None)` otherwise.
    ///
    /// # Errors
    ///
    /// As [`lock`](Self::lock).
    ///
    /// # Cancel safety
    ///
    /// As [`lock`](Self::lock).
    pub async fn try_lock(&self) -> Result<Option<CohortGuard>> {
        self.inner.check_scope()?;
        let baton = {
            let mut state = self.inner.state.lock().unwrap();
            if state.owned {
                return Ok(None);
            }
            state.owned = true;
            Baton::new(&self.inner)
        };
        match self.inner.lock.try_lock().await? {
            Some(guard) => Ok(Some(baton.granted(guard))),
            None => Ok(None),
        }
    }

    /// Acquires the lock, waiting at most `timeout` in all (locally and on the server);
    /// `Ok(None)` if it stayed busy.
    ///
    /// # Errors
    ///
    /// As [`lock`](Self::lock).
    ///
    /// # Cancel safety
    ///
    /// As [`lock`](Self::lock).
    pub async fn try_lock_for(&self, timeout: Duration) -> Result<Option<CohortGuard>> {
        self.acquire(Some(Instant::now() + timeout)).await
    }

    async fn acquire(&self, deadline: Option<Instant>) -> Result<Option<CohortGuard>> {
        self.inner.check_scope()?;
        let queued = {
            let mut state = self.inner.state.lock().unwrap();
            if state.owned {
                let (tx, rx) = oneshot::channel();
                state.waiters.push_back(tx);
                Some(Queued {
                    rx: Some(rx),
                    inner: &self.inner,
                })
            } else {
                state.owned = true;
                None
            }
        };
        let baton = match queued {
            None => Baton::new(&self.inner),
            Some(queued) => {
                let turn = match deadline {
                    None => queued.await,
                    Some(at) => match tokio::time::timeout_at(at, queued).await {
                        Ok(turn) => turn,
                        Err(_) => return Ok(None),
                    },
                };
                match turn {
                    Turn::Handoff(held) => {
                        return Ok(Some(CohortGuard {
                            held: Some(held),
                            inner: self.inner.clone(),
                        }))
                    }
                    Turn::Acquire => Baton::new(&self.inner),
                }
            }
        };
        let guard = match deadline {
            None => Some(self.inner.lock.lock().await?),
            Some(at) => self.inner.lock.try_lock_until(at).await?,
        };
        Ok(guard.map(|guard| baton.granted(guard)))
    }
}

impl Inner {
    fn check_scope(&self) -> Result<()> {
        match self.lock.lock_scope() {
            LockScope::Session => Ok(()),
            LockScope::Transaction => Err(Error::Config(
                "a CohortLock hands the lock between tasks, so it needs a session-scoped lock"
                    .to_owned(),
            )),
        }
    }

    /// Passes the right to ask the server to the next live local waiter, or marks the key free
    /// in this process.
    fn pass_turn(&self) {
        let mut state = self.state.lock().unwrap();
        while let Some(waiter) = state.waiters.pop_front() {
            if waiter.send(Turn::Acquire).is_ok() {
                return;
            }
        }
        state.owned = false;
    }

    /// Gives a released lock to the next local waiter while the budget lasts, otherwise back to
    /// the server (and then the next waiter asks the server).
    fn release(&self, mut held: Held) {
        let in_budget = held.handoffs < self.max_handoffs && held.since.elapsed() < self.max_hold;
        if in_budget {
            let mut state = self.state.lock().unwrap();
            held.handoffs += 1;
            while let Some(waiter) = state.waiters.pop_front() {
                match waiter.send(Turn::Handoff(held)) {
                    Ok(()) => return,
                    Err(Turn::Handoff(back)) => held = back,
                    Err(Turn::Acquire) => unreachable!("sent a handoff"),
                }
            }
            state.owned = false;
            drop(state);
            // Nobody local waits: release on the server (pipelined, as any guard drop).
            drop(held.guard);
        } else {
            // Queue the unlock on the server first, so that the next local waiter's request
            // reaches the server's queue after it, behind any other process already waiting.
            drop(held.guard);
            self.pass_turn();
        }
    }
}

/// The right to ask the server for the lock. Dropped without a grant (an error, a timeout, a
/// cancelled future), it passes the turn to the next local waiter.
struct Baton<'a> {
    inner: Option<&'a Arc<Inner>>,
}

impl<'a> Baton<'a> {
    fn new(inner: &'a Arc<Inner>) -> Self {
        Baton { inner: Some(inner) }
    }

    fn granted(mut self, guard: AdvisoryLockGuard) -> CohortGuard {
        let inner = self.inner.take().expect("granted once");
        CohortGuard {
            held: Some(Held {
                guard,
                since: Instant::now(),
                handoffs: 0,
            }),
            inner: inner.clone(),
        }
    }
}

impl Drop for Baton<'_> {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take() {
            inner.pass_turn();
        }
    }
}

/// A local waiter's place in the queue. Dropped early, it hands on whatever its turn brought.
struct Queued<'a> {
    rx: Option<oneshot::Receiver<Turn>>,
    inner: &'a Arc<Inner>,
}

impl Future for Queued<'_> {
    type Output = Turn;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Turn> {
        let rx = self.rx.as_mut().expect("polled after completion");
        match Pin::new(rx).poll(cx) {
            Poll::Ready(Ok(turn)) => {
                self.rx = None;
                Poll::Ready(turn)
            }
            // Senders are only dropped unsent when their receiver is gone, or with the whole
            // cohort (and the cohort outlives this borrow).
            Poll::Ready(Err(_)) => unreachable!("a queued waiter's turn is never dropped"),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        if let Some(mut rx) = self.rx.take() {
            // Refuse any later turn, then pass on one that already arrived.
            rx.close();
            match rx.try_recv() {
                Ok(Turn::Handoff(held)) => self.inner.release(held),
                Ok(Turn::Acquire) => self.inner.pass_turn(),
                Err(_) => {}
            }
        }
    }
}

/// The lock held by one task of a [`CohortLock`]. Dropping it hands the lock to the next local
/// waiter, or releases it on the server.
///
/// Derefs to the [`AdvisoryLockGuard`] of the server lock (and through it to the connection's
/// `tokio_postgres::Client`): `AdvisoryLockGuard::backend_pid(&guard)` and
/// `guard.query(...)` both work.
#[must_use = "if unused the lock is released immediately"]
#[clippy::has_significant_drop]
pub struct CohortGuard {
    held: Option<Held>,
    inner: Arc<Inner>,
}

impl CohortGuard {
    /// Releases the lock now: to the next local waiter (no round trip) or to the server (one
    /// round trip, reporting its errors).
    ///
    /// # Errors
    ///
    /// As [`AdvisoryLockGuard::unlock`] when the release goes to the server.
    ///
    /// # Cancel safety
    ///
    /// If the future is dropped, the release still completes in the background and the next
    /// local waiter gets its turn.
    pub async fn unlock(mut this: Self) -> Result<()> {
        let held = this.held.take().expect("held until released");
        let inner = &this.inner;
        let in_budget = held.handoffs < inner.max_handoffs && held.since.elapsed() < inner.max_hold;
        let waiting = !inner.state.lock().unwrap().waiters.is_empty();
        if in_budget && waiting {
            inner.release(held);
            return Ok(());
        }
        // The turn passes on when `baton` drops, after the server confirmed the release (or
        // when this future is dropped).
        let baton = Baton::new(inner);
        AdvisoryLockGuard::unlock(held.guard).await?;
        drop(baton);
        Ok(())
    }

    /// How many local handoffs preceded this one since the cohort took the lock from the
    /// server (0 for the task that took it from the server).
    pub fn handoffs(this: &Self) -> u32 {
        this.held.as_ref().expect("held until released").handoffs
    }
}

impl Deref for CohortGuard {
    type Target = AdvisoryLockGuard;

    fn deref(&self) -> &AdvisoryLockGuard {
        &self.held.as_ref().expect("held until released").guard
    }
}

impl Drop for CohortGuard {
    fn drop(&mut self) {
        if let Some(held) = self.held.take() {
            self.inner.release(held);
        }
    }
}

impl fmt::Debug for CohortGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CohortGuard")
            .field("guard", &self.held.as_ref().map(|h| &h.guard))
            .field("handoffs", &self.held.as_ref().map(|h| h.handoffs))
            .finish()
    }
}

impl fmt::Debug for CohortLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.inner.state.lock().unwrap();
        f.debug_struct("CohortLock")
            .field("lock", &self.inner.lock)
            .field("max_handoffs", &self.inner.max_handoffs)
            .field("max_hold", &self.inner.max_hold)
            .field("owned", &state.owned)
            .field("waiters", &state.waiters.len())
            .finish()
    }
}
