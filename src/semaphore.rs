//! [`Semaphore`]: at most `n` holders of a name across every process, on advisory locks.
//!
//! A semaphore named `name` with `n` permits keeps each permit on one of `n` slot keys, the
//! pair keys `(space, k)` for `0 <= k < n`, where `space` is
//! [`AdvisoryKey::semaphore_space`]`(name)`. Its waiters queue on a gate key, `(space, -1)`,
//! through the lock's own machinery ([`AdvisoryLock`]): only the waiter at the head of the
//! queue holds the gate, and only it looks for a free slot, with one statement that tries the
//! slots in order and, when all are busy, tries again on the server every few milliseconds for
//! up to a second before it answers. The other waiters wait in PostgreSQL's lock queue and send
//! nothing. Once the head has a slot it releases the gate and the next waiter becomes the head.
//! `docs/semaphores.md` explains the design and its costs.

use std::fmt;
use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::base::error::{Error, Result};
use crate::base::health::HealthCheck;
use crate::base::key::AdvisoryKey;
use crate::base::loss::LossSignal;
use crate::base::scope::{LockMode, LockScope};
use crate::base::sql::{statement, Form, Op, PreparedUnlock};
use crate::conn::handle::Conn;
use crate::conn::session::Reservation;
use crate::conn::source::ConnectionSource;
use crate::guard::AdvisoryLockGuard;
use crate::lock::AdvisoryLock;
use crate::release::background::release_in_background;
use crate::release::statement::Release;

/// The statement the head waiter sends: it tries the slots `0..$2` of space `$1` in order,
/// skipping those in `$3` (held by this session already), and takes the first it gets. While
/// none is free it tries again every 5 ms, for at most `$4` seconds. It answers the slot taken
/// (NULL if none) and the backend that ran it.
///
/// `LIMIT 1` stops the scan at the first slot granted, so the statement never takes two. The
/// `CASE`s fix the order of evaluation (a slot this session holds is never tried, which would
/// stack it; the pause comes before each new try), and `a.n >= 0` ties the repeated subquery
/// to the row of the recursion, so that it runs again for each try instead of once.
const SEARCH: &str = "\
WITH RECURSIVE attempt(n, slot) AS (
    SELECT 0, (SELECT k FROM generate_series(0, $2::int4 - 1) AS k
               WHERE CASE WHEN k = ANY($3::int4[]) THEN false
                          ELSE pg_try_advisory_lock($1::int4, k) END
               LIMIT 1)
  UNION ALL
    SELECT a.n + 1,
           CASE WHEN pg_sleep(0.005) IS NULL THEN NULL ELSE
               (SELECT k FROM generate_series(0, $2::int4 - 1) AS k
                WHERE a.n >= 0 AND CASE WHEN k = ANY($3::int4[]) THEN false
                                        ELSE pg_try_advisory_lock($1::int4, k) END
                LIMIT 1) END
    FROM attempt AS a
    WHERE a.slot IS NULL
      AND clock_timestamp() < statement_timestamp() + make_interval(secs => $4::float8))
SELECT (SELECT slot FROM attempt WHERE slot IS NOT NULL LIMIT 1), pg_backend_pid()";

/// How long one search statement keeps trying on a pooled connection before it answers, so
/// that the client can check its deadline: a waiter at the head of the queue costs the server
/// about one statement per this long while every slot stays busy.
const WINDOW_POOLED: Duration = Duration::from_secs(1);

/// The same on a dedicated session that holds other locks, shorter so that their statements
/// (their loss probes) are not held up for long.
const WINDOW_DEDICATED: Duration = Duration::from_millis(250);

/// The pauses between tries on a shared session, where nothing waits on the server (as for a
/// lock's polling wait): from the first to the longest.
const SHARED_POLL: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(1));

/// When an acquisition gives up.
#[derive(Clone, Copy, Debug)]
enum Deadline {
    Never,
    Now,
    At(Instant),
}

/// A counting semaphore across processes: at most [`permits`](Self::permits) holders of its
/// name at once, in every process that uses the same name and number of permits.
///
/// Each [`SemaphorePermit`] holds one slot, numbered from 0, on its own connection (a pooled
/// connection, or a share of a [`Session`](crate::Session)) for as long as it lives. The slots
/// are advisory locks on keys derived from the name by a stable, documented function
/// ([`AdvisoryKey::semaphore_space`]), so a program in another language can take a slot too.
/// Nothing is stored in tables.
///
/// Every process must use the same number of permits for a name: a process that believes in
/// more slots uses the extra ones as well.
///
/// # Fairness
///
/// [`acquire`](Self::acquire) and the timed forms wait in PostgreSQL's queue for the
/// semaphore's gate key, which grants in arrival order; only the waiter at the head of that
/// queue looks for a free slot. So a waiter is never overtaken by an acquisition that started
/// after it reached the queue, and [`try_acquire`](Self::try_acquire) gives up (`Ok(None)`)
/// rather than take a slot while anyone waits. On a shared [`Session`](crate::Session),
/// where nothing waits on the server, waiting acquisitions poll for the gate instead and are
/// served in no particular order, as polling locks are.
///
/// # Examples
///
/// ```no_run
/// # async fn demo(pool: deadpool_postgres::Pool) -> pglock::Result<()> {
/// use pglock::Semaphore;
///
/// // At most three exports at once, across the fleet.
/// let exports = Semaphore::new(&pool, "nightly-export", 3);
/// let permit = exports.acquire().await?;
/// println!("exporting in slot {}", permit.slot());
/// permit.execute("SELECT 1", &[]).await?; // the permit derefs to its connection's client
/// permit.release().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Semaphore {
    source: ConnectionSource,
    name: Arc<str>,
    permits: u32,
    space: i32,
    gate: AdvisoryLock,
    health: Option<Arc<HealthCheck>>,
}

impl Semaphore {
    /// A semaphore named `name` with `permits` slots, taken on connections from `source` (a
    /// [`deadpool_postgres::Pool`], `&Pool`, or an `Arc<`[`Session`](crate::Session)`>`).
    ///
    /// `permits` must be between 1 and `i32::MAX`; otherwise every acquisition fails with
    /// [`Error::Config`]. A search for a free slot costs the server time in proportion to the
    /// number of slots, so keep it to what you mean (tens, not millions).
    pub fn new(source: impl Into<ConnectionSource>, name: &str, permits: u32) -> Self {
        let source = source.into();
        let space = AdvisoryKey::semaphore_space(name);
        let gate =
            AdvisoryLock::new(source.clone(), AdvisoryKey::Pair(space, -1)).without_parking();
        Semaphore {
            source,
            name: name.into(),
            permits,
            space,
            gate,
            health: None,
        }
    }

    /// Sets how permits watch for the loss of their slot (the default is
    /// [`HealthCheck::default`]), as [`AdvisoryLock::health_check`] does for guards.
    pub fn health_check(mut self, health: HealthCheck) -> Self {
        self.gate = self.gate.health_check(health);
        self.health = Some(Arc::new(health));
        self
    }

    /// The semaphore's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How many holders the semaphore admits at once.
    pub fn permits(&self) -> u32 {
        self.permits
    }

    /// The key of slot `slot`: `(space, slot)` with [`AdvisoryKey::semaphore_space`].
    pub fn slot_key(&self, slot: u32) -> AdvisoryKey {
        AdvisoryKey::Pair(self.space, slot as i32)
    }

    /// The key waiters queue on: `(space, -1)`.
    pub fn gate_key(&self) -> AdvisoryKey {
        AdvisoryKey::Pair(self.space, -1)
    }

    /// Acquires a permit, waiting as long as it takes.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] if the number of permits is out of range;
    /// [`Error::SessionLockBehindPooler`] on a source declared behind a transaction pooler
    /// (slots are session locks, which such a pooler cannot keep); otherwise as
    /// [`AdvisoryLock::lock`].
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: if the future is dropped at any point, no slot is left held and no waiter
    /// is left in the server's queue. A wait for the gate is abandoned as
    /// [`AdvisoryLock::lock`]'s is. A search for a slot in flight on a pooled connection gets
    /// the connection closed (the server then frees whatever the search took); on a
    /// [`Session`](crate::Session), a conditional release of each slot it tried is queued
    /// behind it.
    pub async fn acquire(&self) -> Result<SemaphorePermit> {
        self.acquire_by(Deadline::Never)
            .await
            .map(|permit| permit.expect("an acquisition without deadline returns a permit"))
    }

    /// Acquires a permit if one is free now and nobody waits for one; `Ok(None)` otherwise.
    ///
    /// It tries each slot once. It does not take a slot while an [`acquire`](Self::acquire)
    /// of the same semaphore waits (or is between the queue and its slot), so it never
    /// overtakes a waiter.
    ///
    /// # Errors
    ///
    /// As [`acquire`](Self::acquire).
    ///
    /// # Cancel safety
    ///
    /// As [`acquire`](Self::acquire).
    pub async fn try_acquire(&self) -> Result<Option<SemaphorePermit>> {
        self.acquire_by(Deadline::Now).await
    }

    /// Acquires a permit, waiting at most `timeout`; `Ok(None)` if none came free in time.
    ///
    /// # Errors
    ///
    /// As [`acquire`](Self::acquire).
    ///
    /// # Cancel safety
    ///
    /// As [`acquire`](Self::acquire). When it answers `Ok(None)`, nothing is held.
    pub async fn try_acquire_for(&self, timeout: Duration) -> Result<Option<SemaphorePermit>> {
        self.acquire_by(Deadline::At(Instant::now() + timeout))
            .await
    }

    /// Acquires a permit, waiting until `deadline` at the latest; `Ok(None)` if none came free
    /// by then.
    ///
    /// # Errors
    ///
    /// As [`acquire`](Self::acquire).
    ///
    /// # Cancel safety
    ///
    /// As [`try_acquire_for`](Self::try_acquire_for).
    pub async fn try_acquire_until(&self, deadline: Instant) -> Result<Option<SemaphorePermit>> {
        self.acquire_by(Deadline::At(deadline)).await
    }

    fn check(&self) -> Result<()> {
        if self.permits == 0 || self.permits > i32::MAX as u32 {
            return Err(Error::Config(format!(
                "a semaphore needs between 1 and {} permits, not {}",
                i32::MAX,
                self.permits
            )));
        }
        if self.source.behind_pooler() {
            return Err(Error::SessionLockBehindPooler {
                key: self.gate_key(),
            });
        }
        Ok(())
    }

    async fn acquire_by(&self, deadline: Deadline) -> Result<Option<SemaphorePermit>> {
        self.check()?;
        let gate = match deadline {
            Deadline::Now => self.gate.try_lock().await?,
            Deadline::Never => Some(self.gate.lock().await?),
            Deadline::At(at) => self.gate.try_lock_until(at).await?,
        };
        // Dropped on every way out (a permit, a timeout, an error, a dropped future): its
        // unlock is queued behind the search, on the same connection.
        let Some(gate) = gate else {
            return Ok(None);
        };
        let shared = self.source.is_shared_session();
        let mut pause = SHARED_POLL.0;
        loop {
            let full_window = match gate.conn() {
                _ if shared => Duration::ZERO,
                Conn::Pooled(_) => WINDOW_POOLED,
                // The gate is all pglock holds on the session: no other lock's statements or
                // loss probes to hold up.
                Conn::Session(session) if session.held_keys() <= 1 => WINDOW_POOLED,
                Conn::Session(_) => WINDOW_DEDICATED,
            };
            let window = match deadline {
                Deadline::Now => Duration::ZERO,
                Deadline::Never => full_window,
                Deadline::At(at) => full_window.min(at.saturating_duration_since(Instant::now())),
            };
            if let Some(permit) = self.search(&gate, window).await? {
                return Ok(Some(permit));
            }
            let until = match deadline {
                Deadline::Now => return Ok(None),
                Deadline::At(at) if Instant::now() >= at => return Ok(None),
                Deadline::At(at) => Some(at),
                Deadline::Never => None,
            };
            if shared {
                let wake = Instant::now() + pause;
                tokio::time::sleep_until(until.map_or(wake, |at| at.min(wake))).await;
                pause = (pause * 2).min(SHARED_POLL.1);
            }
        }
    }

    /// One search statement on the gate holder's connection: a permit, or `None` if every
    /// slot stayed busy for `window`.
    async fn search(
        &self,
        gate: &AdvisoryLockGuard,
        window: Duration,
    ) -> Result<Option<SemaphorePermit>> {
        let conn = gate.conn();
        let key_error = |e| Error::from_postgres(Some(self.gate_key()), e);
        let checks = conn.verification().checks();
        let search = conn.prepare(SEARCH).await.map_err(key_error)?;
        let unlock = conn
            .prepare(statement(
                Op::Unlock,
                LockMode::Exclusive,
                LockScope::Session,
                Form::Pair,
                checks,
            ))
            .await
            .map_err(key_error)?;
        // On a session, the slots it holds already (other permits of this semaphore) must not
        // be tried: PostgreSQL would grant them again. The others are reserved, so that no
        // other acquisition on the session touches them while the statement runs.
        let mut pending = PendingSearch {
            conn: conn.share(),
            space: self.space,
            tried: Vec::new(),
            armed: false,
        };
        let mut held_here = Vec::new();
        if let Conn::Session(session) = conn {
            for slot in 0..self.permits as i32 {
                match session.try_reserve(AdvisoryKey::Pair(self.space, slot)) {
                    Some(reservation) => pending.tried.push((slot, Some(reservation))),
                    None => held_here.push(slot),
                }
            }
        }
        let permits = self.permits as i32;
        let seconds = window.as_secs_f64();
        pending.armed = true;
        let row = conn
            .client()
            .query_one(&search, &[&self.space, &permits, &held_here, &seconds])
            .await
            .map_err(key_error)?;
        let slot: Option<i32> = row.get(0);
        let ran_on: i32 = row.get(1);
        let Some(slot) = slot else {
            pending.armed = false;
            return Ok(None);
        };
        let key = AdvisoryKey::Pair(self.space, slot);
        let granted_on = AdvisoryLockGuard::backend_pid(gate);
        if ran_on != granted_on {
            // Behind an undeclared pooler: the slot may be held on a backend this connection
            // no longer reaches. `pending` closes a pooled connection.
            return Err(Error::BackendChanged {
                key,
                granted_on: Some(granted_on),
                now_on: Some(ran_on),
                source: None,
            });
        }
        pending.armed = false;
        let reservation = pending
            .take(slot)
            .unwrap_or_else(|| Reservation::none(key, LockScope::Session));
        let guard = AdvisoryLockGuard::new(
            conn.share(),
            reservation,
            LockMode::Exclusive,
            ran_on,
            Some(PreparedUnlock {
                statement: unlock,
                checks,
            }),
        )
        .with_health_check(self.health.as_ref());
        Ok(Some(SemaphorePermit {
            guard,
            slot: slot as u32,
            permits: self.permits,
            name: self.name.clone(),
        }))
    }
}

impl fmt::Debug for Semaphore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Semaphore")
            .field("name", &self.name)
            .field("permits", &self.permits)
            .field("space", &self.space)
            .finish_non_exhaustive()
    }
}

/// A search statement whose outcome is not known yet. Dropped armed (the future was dropped,
/// or the statement failed), it undoes whatever the statement may have taken: a pooled
/// connection is closed (the server frees its locks as the session ends); on a session, each
/// slot it tried is released if the session holds it, by a statement queued behind the search.
struct PendingSearch {
    conn: Conn,
    space: i32,
    /// The slots the search may take, with their reservations on a session.
    tried: Vec<(i32, Option<Reservation>)>,
    armed: bool,
}

impl PendingSearch {
    fn take(&mut self, slot: i32) -> Option<Reservation> {
        self.tried
            .iter_mut()
            .find(|(k, _)| *k == slot)
            .and_then(|(_, reservation)| reservation.take())
    }
}

impl Drop for PendingSearch {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        match &self.conn {
            Conn::Pooled(_) => self.conn.mark_discard(),
            Conn::Session(_) => {
                for (slot, reservation) in self.tried.drain(..) {
                    release_in_background(
                        self.conn.share(),
                        Release::UnlockIfHeld(LockMode::Exclusive),
                        AdvisoryKey::Pair(self.space, slot),
                    );
                    // Released once the undo is queued: anything sent later runs after it.
                    drop(reservation);
                }
            }
        }
    }
}

/// One slot of a [`Semaphore`], held until the permit is released or dropped.
///
/// The permit owns the connection its slot is held on and derefs to that slot's
/// [`AdvisoryLockGuard`] (and through it to the connection's `tokio_postgres::Client`), so the
/// protected work can run on the same session. Dropping the permit releases the slot in the
/// background, as dropping a guard does; [`release`](Self::release) releases it now and
/// reports errors. A pooled connection goes back to the pool only once the release is
/// confirmed, and is closed otherwise.
#[must_use = "if unused the permit is released immediately"]
#[clippy::has_significant_drop]
pub struct SemaphorePermit {
    guard: AdvisoryLockGuard,
    slot: u32,
    permits: u32,
    name: Arc<str>,
}

impl SemaphorePermit {
    /// The slot this permit holds, from 0 to [`permits`](Self::permits)` - 1`.
    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// How many slots the semaphore has.
    pub fn permits(&self) -> u32 {
        self.permits
    }

    /// The semaphore's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A signal that fires when the slot is lost (the session ended, the network path died):
    /// see [`AdvisoryLockGuard::loss_signal`], whose bounds apply.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo(pool: deadpool_postgres::Pool) -> pglock::Result<()> {
    /// # async fn export() {}
    /// let permit = pglock::Semaphore::new(&pool, "nightly-export", 3).acquire().await?;
    /// let mut lost = permit.loss_signal();
    /// tokio::select! {
    ///     reason = lost.lost() => eprintln!("stopped: {reason}"),
    ///     () = export() => permit.release().await?,
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Panics
    ///
    /// If called outside a Tokio runtime when the monitor must be started.
    pub fn loss_signal(&self) -> LossSignal {
        AdvisoryLockGuard::loss_signal(&self.guard)
    }

    /// Whether the slot is known to be lost, without waiting: see
    /// [`AdvisoryLockGuard::is_lost`].
    ///
    /// # Panics
    ///
    /// As [`loss_signal`](Self::loss_signal).
    pub fn is_lost(&self) -> bool {
        AdvisoryLockGuard::is_lost(&self.guard)
    }

    /// Releases the slot now and reports how it went.
    ///
    /// # Errors
    ///
    /// As [`AdvisoryLockGuard::unlock`]: [`Error::NotHeld`] if the slot was lost before,
    /// [`Error::ConnectionLost`] if the connection is gone (and the slot with it).
    ///
    /// # Cancel safety
    ///
    /// If the future is dropped before it completes, the release still happens in the
    /// background.
    pub async fn release(self) -> Result<()> {
        AdvisoryLockGuard::unlock(self.guard).await
    }
}

impl Deref for SemaphorePermit {
    type Target = AdvisoryLockGuard;

    fn deref(&self) -> &AdvisoryLockGuard {
        &self.guard
    }
}

impl fmt::Debug for SemaphorePermit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SemaphorePermit")
            .field("name", &self.name)
            .field("slot", &self.slot)
            .field("permits", &self.permits)
            .field("guard", &self.guard)
            .finish()
    }
}
