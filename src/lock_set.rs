//! [`LockSet`]: many held locks sharing a few connections.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::acquire::try_lock_queue;
use crate::conn::session::Session;
use crate::error::{Error, Result};
use crate::guard::AdvisoryLockGuard;
use crate::key::AdvisoryKey;
use crate::lock::AdvisoryLock;
use crate::scope::{LockMode, LockScope, WaitStrategy};
use crate::trace;

/// Many session locks held at once by one process, on a small, fixed set of connections.
///
/// A pool keeps one connection per held lock, which caps the held locks at the pool's size. A
/// `LockSet` spreads keys over a few [`Session`]s instead (a key always maps to the same
/// session, so a key held through the set is never taken twice), and requests share the
/// round trips of their session: concurrent [`try_lock`](Self::try_lock)s on one session are
/// *batched*, sent as one statement for all of them (while one batch is on the wire, the
/// requests that arrive meanwhile wait for the next), and the guards of a session dropped
/// together (a `Vec` of them, say, before the dropping task yields) are released together, in
/// one statement per key form.
///
/// Batching matters because of how PostgreSQL ends a transaction: it walks the whole table of
/// locks its backend holds, so one statement per key costs time in proportion to the locks the
/// session already holds. A batch pays that once for all its keys. Each request still gets its
/// own guard, `None` or error; if a batch's statement fails (a full lock table, say), its keys
/// are released where the session may have taken them and each request is tried again alone.
///
/// Waiting never occupies a shared connection: [`lock`](Self::lock) polls, each attempt a
/// batched `try_lock` (backing off between [`WaitStrategy::poll`]'s bounds by default), so a
/// busy key never blocks the other holders of its session, and many waiting keys cost one
/// statement per session and round of attempts. Polling waiters are not served in
/// order; use an [`AdvisoryLock`] on a pool when a key is contended and order matters.
///
/// # Limits
///
/// Every held lock takes a slot in the server's shared lock table, which has room for about
/// `max_locks_per_transaction × (max_connections + max_prepared_transactions)` locks for all
/// sessions together (PostgreSQL lets one session use more while the table has room). Past
/// that, acquisitions fail with [`Error::OutOfLockMemory`], which names the setting; the locks
/// already held stay held.
///
/// # Examples
///
/// ```no_run
/// # async fn demo() -> pglock::Result<()> {
/// use pglock::LockSet;
///
/// let set = LockSet::connect("postgres://postgres@localhost/test", 4).await?;
/// let mut held = Vec::new();
/// for shard in 0..1_000i64 {
///     if let Some(guard) = set.try_lock(shard).await? {
///         held.push(guard);
///     }
/// }
/// println!("holding {} shards on 4 connections", set.held());
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct LockSet {
    sessions: Arc<[Arc<Session>]>,
    wait: WaitStrategy,
}

impl LockSet {
    /// Opens `connections` sessions to `url` (see [`Session::connect`]).
    ///
    /// # Errors
    ///
    /// [`Error::Config`] if `connections` is 0 or the URL is malformed, [`Error::Connect`] if a
    /// connection fails.
    pub async fn connect(url: &str, connections: usize) -> Result<Self> {
        if connections == 0 {
            return Err(Error::Config(
                "a LockSet needs at least one connection".to_owned(),
            ));
        }
        let opening = (0..connections).map(|_| Session::connect(url));
        let sessions = futures_util::future::join_all(opening).await;
        let sessions = sessions
            .into_iter()
            .map(|session| session.map(Arc::new))
            .collect::<Result<Vec<_>>>()?;
        LockSet::from_sessions(sessions)
    }

    /// A set over sessions the caller opened (with TLS, say).
    ///
    /// # Errors
    ///
    /// [`Error::Config`] if `sessions` is empty.
    pub fn from_sessions(sessions: impl IntoIterator<Item = Arc<Session>>) -> Result<Self> {
        let sessions: Arc<[Arc<Session>]> = sessions.into_iter().collect();
        if sessions.is_empty() {
            return Err(Error::Config(
                "a LockSet needs at least one session".to_owned(),
            ));
        }
        Ok(LockSet {
            sessions,
            wait: WaitStrategy::poll(),
        })
    }

    /// Sets the polling bounds of [`lock`](Self::lock) and of the locks from
    /// [`advisory_lock`](Self::advisory_lock) (default [`WaitStrategy::poll`]).
    /// [`WaitStrategy::Block`] is refused, as it would hold up every lock of a session.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for [`WaitStrategy::Block`].
    pub fn wait_strategy(mut self, wait: WaitStrategy) -> Result<Self> {
        if wait == WaitStrategy::Block {
            return Err(Error::Config(
                "a LockSet shares its connections: a blocking wait would stall every lock on the session; use WaitStrategy::Poll".to_owned(),
            ));
        }
        self.wait = wait;
        Ok(self)
    }

    /// The sessions of the set.
    pub fn sessions(&self) -> &[Arc<Session>] {
        &self.sessions
    }

    /// The session that `key` always maps to.
    pub fn session_for(&self, key: impl Into<AdvisoryKey>) -> &Arc<Session> {
        let key = key.into();
        let bits = match key {
            AdvisoryKey::Single(k) => k as u64,
            AdvisoryKey::Pair(a, b) => ((a as u32 as u64) << 32) | b as u32 as u64,
        };
        // Fibonacci hashing spreads consecutive keys evenly.
        let spread = bits.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32;
        &self.sessions[(spread % self.sessions.len() as u64) as usize]
    }

    /// The [`AdvisoryLock`] for `key` on its session, with the set's polling strategy: for the
    /// other acquisition methods (`try_lock_until`, shared mode, ...), which are not batched.
    pub fn advisory_lock(&self, key: impl Into<AdvisoryKey>) -> AdvisoryLock {
        let key = key.into();
        AdvisoryLock::new(self.session_for(key).clone(), key).wait_strategy(self.wait)
    }

    /// Tries once to take `key` exclusively; `Ok(None)` if another session holds it, or if the
    /// set holds it already (another guard of the set has it).
    ///
    /// Sent in one statement with the other `try_lock`s queued on the same session meanwhile
    /// (see [`LockSet`]): a lone request costs one round trip, as [`AdvisoryLock::try_lock`];
    /// many concurrent ones share theirs.
    ///
    /// # Errors
    ///
    /// As [`AdvisoryLock::try_lock`]: notably [`Error::OutOfLockMemory`] when the server's
    /// lock table is full.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: no lock is left held by a dropped future. Dropped before its batch is sent,
    /// the request leaves the batch; dropped after, its guard, granted to nobody, is dropped by
    /// the batch, which releases the lock as any drop does.
    pub async fn try_lock(&self, key: impl Into<AdvisoryKey>) -> Result<Option<AdvisoryLockGuard>> {
        Ok(self.attempt(key.into(), None).await?.0)
    }

    /// One attempt at `key`, in its session's next batch: the guard, or `None` with the pid of
    /// the session's backend that found the key busy (when known). While another guard of the
    /// set holds the key, waits in-process first, as `wait` says (see `Conn::reserve`).
    async fn attempt(
        &self,
        key: AdvisoryKey,
        wait: Option<Option<Instant>>,
    ) -> Result<(Option<AdvisoryLockGuard>, Option<i32>)> {
        let session = self.session_for(key);
        if !session.is_behind_pooler() {
            let timer = trace::Timer::start();
            let measure = trace::Measure::start();
            let answer = try_lock_queue::try_lock(session, key, wait).await;
            let busy_on = match &answer {
                Ok(try_lock_queue::Answer::Busy(backend_pid)) => *backend_pid,
                _ => None,
            };
            if let Some(result) =
                answer.map_or_else(|e| Some(Err(e)), try_lock_queue::Answer::into_result)
            {
                trace::acquired(
                    key,
                    LockMode::Exclusive,
                    LockScope::Session,
                    &result,
                    &timer,
                );
                measure.ended(LockMode::Exclusive, false, &result);
                return result.map(|guard| (guard, busy_on));
            }
        }
        // Behind a pooler (which refuses session locks with its own error), or after a batch
        // that could not answer for this key: alone, as any `try_lock`.
        Ok((self.advisory_lock(key).try_lock().await?, None))
    }

    /// Takes `key` exclusively, polling until it is free. Never blocks the session's other
    /// locks.
    ///
    /// Each attempt is a [`try_lock`](Self::try_lock), batched with the session's other
    /// requests; between attempts the pause doubles within the bounds of the set's
    /// [`WaitStrategy`]. While another guard of the set holds the key (another task's, or
    /// this task's: drop it first), the wait is in-process, and the attempt follows as soon as
    /// that guard is dropped.
    ///
    /// # Errors
    ///
    /// As [`try_lock`](Self::try_lock).
    ///
    /// # Cancel safety
    ///
    /// As [`try_lock`](Self::try_lock): no lock is left held by a dropped future.
    pub async fn lock(&self, key: impl Into<AdvisoryKey>) -> Result<AdvisoryLockGuard> {
        let guard = self.poll(key.into(), None).await?;
        Ok(guard.expect("polling without a deadline ends granted"))
    }

    /// Takes `key` exclusively, polling for at most `timeout`; `Ok(None)` if it stayed busy.
    ///
    /// # Errors
    ///
    /// As [`try_lock`](Self::try_lock).
    ///
    /// # Cancel safety
    ///
    /// As [`try_lock`](Self::try_lock).
    pub async fn try_lock_for(
        &self,
        key: impl Into<AdvisoryKey>,
        timeout: Duration,
    ) -> Result<Option<AdvisoryLockGuard>> {
        self.poll(key.into(), Some(Instant::now() + timeout)).await
    }

    /// Attempts `key` until granted or, after the attempt that follows `deadline`, busy.
    async fn poll(
        &self,
        key: AdvisoryKey,
        deadline: Option<Instant>,
    ) -> Result<Option<AdvisoryLockGuard>> {
        let (mut pause, max) = match self.wait {
            WaitStrategy::Poll { initial, max } => (initial, max),
            WaitStrategy::Block => unreachable!("a set starts polling, and refuses Block"),
        };
        loop {
            // While another guard of the set holds the key, the attempt waits in-process for it
            // to go (until the deadline), and only then asks the server.
            let (guard, busy_on) = self.attempt(key, Some(deadline)).await?;
            if guard.is_some() {
                return Ok(guard);
            }
            let now = Instant::now();
            let wake = match deadline {
                Some(deadline) if deadline <= now => return Ok(None),
                Some(deadline) => deadline.min(now + pause),
                None => now + pause,
            };
            trace::polling(key, busy_on, pause);
            tokio::time::sleep_until(wake).await;
            pause = (pause * 2).min(max);
        }
    }

    /// How many locks pglock holds (or is taking or releasing) on the set's sessions.
    pub fn held(&self) -> usize {
        self.sessions.iter().map(|s| s.held_count()).sum()
    }
}

impl fmt::Debug for LockSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockSet")
            .field("sessions", &self.sessions.len())
            .field("held", &self.held())
            .field("wait", &self.wait)
            .finish()
    }
}
