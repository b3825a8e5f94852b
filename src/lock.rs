//! [`AdvisoryLock`]: a key, where its connection comes from, and the ways to acquire it.

use std::future::{poll_fn, Future};
use std::sync::{Arc, Weak};
use std::task::{ready, Poll};
use std::time::Duration;

use futures_util::future::Either;
use tokio::runtime::Handle;
use tokio::time::Instant;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{CancelToken, Row, Statement};

use crate::background;
use crate::cancel::Canceller;
use crate::connection::{Conn, ConnectionSource, Reservation};
use crate::error::{Error, Result};
use crate::guard::{release, release_in_background, unlock_outcome, ConnSlot, Release};
use crate::handoff::{
    Claimed, DeferredUnlock, Parking, PriorRelease, ReleaseInFlight, ReleaseTask,
};
use crate::loss::HealthCheck;
use crate::sql::{first_row, statement, unlock_then, Checks, Form, KeyParams, Op, PreparedUnlock};
use crate::trace;
use crate::{AdvisoryKey, AdvisoryLockGuard, LockMode, LockScope, WaitStrategy};

/// A named (or numbered) advisory lock and where to take it.
///
/// Cheap to clone; it holds nothing on the server. Each acquisition returns an
/// [`AdvisoryLockGuard`] that holds the lock until it is dropped or unlocked.
///
/// | method | waits | busy result |
/// |---|---|---|
/// | [`lock`](Self::lock) / [`lock_shared`](Self::lock_shared) | until granted | — |
/// | [`try_lock`](Self::try_lock) / [`try_lock_shared`](Self::try_lock_shared) | never | `Ok(None)` |
/// | [`try_lock_for`](Self::try_lock_for) / [`try_lock_until`](Self::try_lock_until) (and `_shared_`) | until the deadline | `Ok(None)` |
///
/// # Examples
///
/// ```no_run
/// # async fn demo(pool: deadpool_postgres::Pool) -> pglock::Result<()> {
/// use std::time::Duration;
/// use pglock::{AdvisoryLock, AdvisoryLockGuard};
///
/// let lock = AdvisoryLock::new(&pool, "migrations");
/// match lock.try_lock_for(Duration::from_secs(30)).await? {
///     Some(guard) => {
///         guard.batch_execute("CREATE TABLE IF NOT EXISTS t (id int)").await?;
///         AdvisoryLockGuard::unlock(guard).await?;
///     }
///     None => eprintln!("another instance held the lock for 30 s"),
/// }
/// # Ok(()) }
/// ```
///
/// # Re-entrancy
///
/// PostgreSQL counts session locks per session: locking a key twice on one session needs two
/// unlocks. pglock never does that. On a pool every acquisition uses its own connection, so a
/// second acquisition of a held key, even from the same task, waits like any other session
/// (and would wait forever for a holder in the same task: drop the first guard first). On a
/// [`Session`](crate::Session), asking for a key the session holds waits in-process until the
/// guard that holds it is dropped (`try_lock` answers `Ok(None)`), without stacking it.
///
/// # Sessions
///
/// On a shared [`Session`](crate::Session) (the default) waits poll and transaction scope is
/// refused, so that nothing pglock does reaches another task's statements; a session declared
/// [`dedicated`](crate::Session::dedicated) waits in the server's queue. See the `Session`
/// docs.
#[derive(Clone, Debug)]
pub struct AdvisoryLock {
    source: ConnectionSource,
    key: AdvisoryKey,
    scope: LockScope,
    wait: WaitStrategy,
    health: Option<Arc<HealthCheck>>,
    /// The pooled connection of the last dropped guard, while its unlock is in flight (pool
    /// sources only; shared by clones).
    parking: Option<Arc<Parking>>,
}

/// When an acquisition gives up.
#[derive(Clone, Copy, Debug)]
enum Deadline {
    Never,
    Now,
    At(Instant),
}

impl Deadline {
    /// How long to wait in-process for a key another guard of the same session holds (see
    /// `Conn::reserve`).
    fn in_process(self) -> Option<Option<Instant>> {
        match self {
            Deadline::Now => None,
            Deadline::Never => Some(None),
            Deadline::At(at) => Some(Some(at)),
        }
    }
}

/// `$lock.acquire($mode, $deadline).await`, measured for the metrics (`trace::Measure`, empty
/// without the `metrics` feature) in the caller's own future: a wrapping future would cost
/// every lock a copy of the acquisition's future.
macro_rules! measured {
    ($lock:expr, $mode:expr, $deadline:expr) => {{
        let (mode, deadline) = ($mode, $deadline);
        let measure = trace::Measure::start();
        let result = $lock.acquire(mode, deadline).await;
        measure.ended(mode, matches!(deadline, Deadline::At(_)), &result);
        result
    }};
}

impl AdvisoryLock {
    /// A session-scoped lock on `key`, taken on connections from `source`.
    ///
    /// `source` is a [`deadpool_postgres::Pool`] (or `&Pool`), or an `Arc<`[`Session`](crate::Session)`>`;
    /// `key` is anything that converts into an [`AdvisoryKey`]: a name (`&str`, hashed with
    /// [`AdvisoryKey::from_name`]), an `i64`, or an `(i32, i32)` pair.
    pub fn new(source: impl Into<ConnectionSource>, key: impl Into<AdvisoryKey>) -> Self {
        let source = source.into();
        let parking = source.is_pool().then(Arc::default);
        AdvisoryLock {
            source,
            key: key.into(),
            scope: LockScope::Session,
            wait: WaitStrategy::Block,
            health: None,
            parking,
        }
    }

    /// Sets how long the lock is held: for the session (the default) or for a transaction.
    pub fn scope(mut self, scope: LockScope) -> Self {
        self.scope = scope;
        self
    }

    /// Sets how a blocked acquisition waits (the default is [`WaitStrategy::Block`]).
    pub fn wait_strategy(mut self, wait: WaitStrategy) -> Self {
        self.wait = wait;
        self
    }

    /// Sets how the guards of this lock watch for its loss (the default is
    /// [`HealthCheck::default`]: a probe every second, each given a second to answer).
    ///
    /// It applies to guards on pooled connections; a [`Session`](crate::Session)'s own
    /// [`with_health_check`](crate::Session::with_health_check) takes precedence for locks on
    /// that session, since one probe serves all of them (a session without one uses the health
    /// check of the lock whose guard first asks). Nothing is probed until a guard's
    /// [`loss_signal`](AdvisoryLockGuard::loss_signal) or
    /// [`is_lost`](AdvisoryLockGuard::is_lost) is first called.
    pub fn health_check(mut self, health: HealthCheck) -> Self {
        self.health = Some(Arc::new(health));
        self
    }

    /// The lock's key.
    pub fn key(&self) -> AdvisoryKey {
        self.key
    }

    /// This lock without the parking of dropped guards' connections: for a lock whose guard
    /// shares its connection with another guard (a semaphore's queue key), so that a drop never
    /// offers a connection still in use to the next acquisition.
    pub(crate) fn without_parking(mut self) -> Self {
        self.parking = None;
        self
    }

    pub(crate) fn lock_scope(&self) -> LockScope {
        self.scope
    }

    /// Acquires the lock exclusively, waiting as long as it takes.
    ///
    /// # Errors
    ///
    /// [`Error::PoolExhausted`] and other pool errors, [`Error::ConnectionLost`],
    /// [`Error::Deadlock`] if the server's deadlock detector ends the wait,
    /// [`Error::Cancelled`] if the wait is cancelled on the server, [`Error::ReadOnlyStandby`],
    /// [`Error::TransactionOnSharedSession`] for transaction scope on a shared
    /// [`Session`](crate::Session), [`Error::UnexpectedAnswer`] if the statement's answer comes
    /// back without its row (never from PostgreSQL itself).
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: if the future is dropped at any point, no lock is left held and no waiter is
    /// left in the server's queue. A wait in progress is cancelled on the server by a cancel
    /// request, repeated until the statement has ended (PostgreSQL ignores one that arrives
    /// before the statement has started); the pooled connection is then closed. If the grant
    /// crossed the cancellation, the lock is released again. All of this runs in a background
    /// task, so dropping the future returns at once. On a shared [`Session`](crate::Session)
    /// nothing waits on the server, so no cancel request is sent: the attempt in flight is
    /// undone by a conditional release queued behind it.
    pub async fn lock(&self) -> Result<AdvisoryLockGuard> {
        measured!(self, LockMode::Exclusive, Deadline::Never)
            .map(|guard| guard.expect("an acquisition without deadline returns a guard"))
    }

    /// Acquires the lock in shared mode, waiting as long as it takes.
    ///
    /// # Errors
    ///
    /// As [`lock`](Self::lock).
    ///
    /// # Cancel safety
    ///
    /// As [`lock`](Self::lock).
    pub async fn lock_shared(&self) -> Result<AdvisoryLockGuard> {
        measured!(self, LockMode::Shared, Deadline::Never)
            .map(|guard| guard.expect("an acquisition without deadline returns a guard"))
    }

    /// Tries once to acquire the lock exclusively; `Ok(None)` if it is busy.
    ///
    /// # Errors
    ///
    /// As [`lock`](Self::lock), except that it never waits, so never deadlocks.
    ///
    /// # Cancel safety
    ///
    /// As [`lock`](Self::lock).
    pub async fn try_lock(&self) -> Result<Option<AdvisoryLockGuard>> {
        measured!(self, LockMode::Exclusive, Deadline::Now)
    }

    /// Tries once to acquire the lock in shared mode; `Ok(None)` if an exclusive holder has it.
    ///
    /// # Errors
    ///
    /// As [`try_lock`](Self::try_lock).
    ///
    /// # Cancel safety
    ///
    /// As [`lock`](Self::lock).
    pub async fn try_lock_shared(&self) -> Result<Option<AdvisoryLockGuard>> {
        measured!(self, LockMode::Shared, Deadline::Now)
    }

    /// Acquires the lock exclusively, waiting at most `timeout`; `Ok(None)` if it stayed busy.
    ///
    /// The deadline is enforced by the server (`lock_timeout`, set for this one statement), so
    /// the lock can never be granted after this returns `Ok(None)`. Time spent waiting for a
    /// pooled connection counts against the timeout.
    ///
    /// # Errors
    ///
    /// As [`lock`](Self::lock).
    ///
    /// # Cancel safety
    ///
    /// As [`lock`](Self::lock).
    pub async fn try_lock_for(&self, timeout: Duration) -> Result<Option<AdvisoryLockGuard>> {
        self.try_lock_until(Instant::now() + timeout).await
    }

    /// Acquires the lock exclusively, waiting at most until `deadline`; `Ok(None)` if it stayed
    /// busy.
    ///
    /// # Errors
    ///
    /// As [`lock`](Self::lock).
    ///
    /// # Cancel safety
    ///
    /// As [`lock`](Self::lock).
    pub async fn try_lock_until(&self, deadline: Instant) -> Result<Option<AdvisoryLockGuard>> {
        measured!(self, LockMode::Exclusive, Deadline::At(deadline))
    }

    /// Acquires the lock in shared mode, waiting at most `timeout`; `Ok(None)` if it stayed busy.
    ///
    /// # Errors
    ///
    /// As [`lock`](Self::lock).
    ///
    /// # Cancel safety
    ///
    /// As [`lock`](Self::lock).
    pub async fn try_lock_shared_for(
        &self,
        timeout: Duration,
    ) -> Result<Option<AdvisoryLockGuard>> {
        self.try_lock_shared_until(Instant::now() + timeout).await
    }

    /// Acquires the lock in shared mode, waiting at most until `deadline`.
    ///
    /// # Errors
    ///
    /// As [`lock`](Self::lock).
    ///
    /// # Cancel safety
    ///
    /// As [`lock`](Self::lock).
    pub async fn try_lock_shared_until(
        &self,
        deadline: Instant,
    ) -> Result<Option<AdvisoryLockGuard>> {
        measured!(self, LockMode::Shared, Deadline::At(deadline))
    }

    async fn acquire(
        &self,
        mode: LockMode,
        deadline: Deadline,
    ) -> Result<Option<AdvisoryLockGuard>> {
        if trace::acquisitions_traced() {
            // Boxed: the span and the clock would otherwise enlarge every acquisition's future.
            return Box::pin(self.acquire_traced(mode, deadline)).await;
        }
        let (mut attempt, acquire_statement, unlock) = match self.start_direct(mode, deadline) {
            Start::Direct(attempt, statement, unlock) => (attempt, statement, unlock),
            Start::General(claimed) => {
                return self.acquire_untraced(mode, deadline, claimed, false).await
            }
        };
        // The common case, written out flat: on a CPU shared with the server, which evicts the
        // client's code at every round trip, each line of code a cycle runs is fetched again.
        let may_wait = attempt.may_wait;
        let params = KeyParams::new(self.key);
        // A dropped guard's unlock of the key may ride in the statement (see `Attempt::run`);
        // on a verified connection the combined statement takes the key alone, as this one.
        let combined = attempt.combined.take();
        let statement = match (&combined, &acquire_statement) {
            (Some((combined, _)), _) => combined,
            (None, Some(statement)) => statement,
            (None, None) => unreachable!("a direct start has a statement to send"),
        };
        // Set before the first poll, which sends the statement (see `Attempt::run`).
        attempt.in_flight = true;
        let client = client_conn(&attempt.slot).client();
        let answer = first_row(client, statement, params.with(None).as_slice()).await;
        attempt.in_flight = false;
        attempt.may_wait = false;
        let answer = match answer {
            Ok(Some(row)) => Ok(row),
            Ok(None) => return Err(attempt.unexpected_answer()),
            Err(error) => Err(error),
        };
        let read = match combined {
            None => None,
            Some((_, granted_on)) => {
                let (read, prior_ok) = attempt.read_combined(&answer, granted_on, may_wait);
                if !prior_ok {
                    // Marked to be closed, which ends whatever it holds: start again elsewhere.
                    drop(attempt);
                    trace::prior_release_failed(self.key);
                    return Box::pin(self.acquire_untraced(mode, deadline, None, false)).await;
                }
                read
            }
        };
        let (granted, pid) = match answer {
            Ok(row) => read.unwrap_or_else(|| attempt.checks.acquired(&row, may_wait)),
            Err(error) => {
                attempt
                    .failed(error)
                    .map_err(|error| self.reported(error))?;
                // Deallocated: start again, preparing anew, once.
                drop(attempt);
                trace::statements_deallocated(self.key);
                // Boxed, as a rare path.
                return Box::pin(self.acquire_untraced(mode, deadline, None, true)).await;
            }
        };
        match granted {
            Some(true) => Ok(Some(self.granted(attempt, mode, pid, Some(unlock)))),
            Some(false) if matches!(deadline, Deadline::Never) => {
                // The first attempt of a polling `lock`: poll on (boxed, as the waiting path).
                drop(attempt);
                Box::pin(self.acquire_untraced(mode, deadline, None, false)).await
            }
            Some(false) => Ok(None),
            None => Err(Error::ReadOnlyStandby),
        }
    }

    /// An acquisition that starts with at most a dropped guard's unlock of the same key before
    /// its own statement, which it sends in that statement, on a connection verified as direct
    /// where its statements are prepared: the attempt ready to send, its statement, and the
    /// unlock a guard will need. Otherwise the general path takes over, on the connection
    /// claimed on the way if one was.
    ///
    /// Only `lock` and `try_lock` qualify: a timeout or a polling wait takes the general path.
    fn start_direct(&self, mode: LockMode, deadline: Deadline) -> Start {
        // A polling wait sends `TryLock` until its deadline: not `Now`, so not direct, except
        // for the first attempt of a `lock` on a session (which polls when shared): granted,
        // it is done; busy, the general path polls on.
        let op = self.op(deadline);
        let first_try = op == Op::TryLock
            && matches!(deadline, Deadline::Never)
            && self.source.session().is_some();
        if self.scope != LockScope::Session
            || self.source.behind_pooler()
            || !(op == Op::Lock || matches!(deadline, Deadline::Now) || first_try)
        {
            return Start::General(None);
        }
        let (conn, combined) = match (&self.parking, self.source.session()) {
            (None, Some(session)) if session.offered_release_answered() => {
                let conn = Conn::Session(session.clone());
                match session.deferred_unlock.take_for(self.key, mode) {
                    None => (conn, None),
                    Some(deferred) => match self.combinable(deferred, mode, deadline) {
                        Some(combined) => (conn, Some(combined)),
                        // Sent alone: the general path waits until that has freed the key.
                        None => return Start::General(None),
                    },
                }
            }
            // With tasks waiting for the pool, the general path lets the parked connection go.
            (Some(parking), None) if !self.source.pool_has_waiters() => match parking.claim() {
                Some(Claimed::Deferred(deferred)) => {
                    match self.combinable(deferred, mode, deadline) {
                        Some(combined) => (combined.0.conn().share(), Some(combined)),
                        // Sent alone, which parked the connection again with the unlock in
                        // flight: claim it that way.
                        None => return Start::General(parking.claim().and_then(in_flight)),
                    }
                }
                Some(Claimed::Idle(conn)) => (conn, None),
                claimed => return Start::General(claimed.and_then(in_flight)),
            },
            _ => return Start::General(None),
        };
        let checks = conn.verification().checks();
        let form = Form::of(self.key);
        let unlock_sql = || statement(Op::Unlock, mode, self.scope, form, checks);
        // The acquiring statement (not needed when the combined one is sent) and the unlock a
        // guard will use (the dropped guard's own, when it makes the same checks).
        let prepared = match (checks, &combined) {
            (Checks::InStatement, _) => None,
            (_, Some((deferred, _, combined_checks))) => match *combined_checks == checks {
                false => None,
                true if deferred.checks() == checks => Some((None, None)),
                true => conn.cached(unlock_sql()).map(|unlock| (None, Some(unlock))),
            },
            (_, None) => {
                let acquire = conn.cached(statement(op, mode, self.scope, form, checks));
                let unlock = conn.cached(unlock_sql());
                // A guard's drop may need the combined statement later: `prepare` prepares it
                // with the others when it is missing.
                let combined_prepared = match unlock_then(op, mode, form, checks) {
                    Some(sql) => conn.cached(sql).is_some(),
                    None => true,
                };
                let prepared = acquire.zip(unlock).filter(|_| combined_prepared);
                prepared.map(|(acquire, unlock)| (Some(acquire), Some(unlock)))
            }
        };
        let prior = |combined: Option<(DeferredUnlock, Statement, Checks)>| {
            combined.map_or(Prior::None, |(deferred, statement, checks)| {
                Prior::Deferred(deferred, statement, checks)
            })
        };
        let Some((acquire, unlock)) = prepared else {
            return Start::General(Some((conn, prior(combined))));
        };
        let (reservation, combined, unlock) = match (combined, &conn) {
            // The key's reservation passes from the dropped guard's unlock to this acquisition.
            (Some((deferred, statement, _)), _) => {
                let (reservation, granted_on, dropped_unlock) = deferred.into_combined();
                let reservation = reservation.expect("a deferred unlock keeps its reservation");
                let unlock = unlock
                    .or(dropped_unlock.map(|unlock| unlock.statement))
                    .expect("the dropped guard's unlock, found with the same checks");
                (reservation, Some((statement, granted_on)), unlock)
            }
            (None, Conn::Session(session)) => match session.try_reserve(self.key) {
                Some(reservation) => (reservation, None, unlock.expect("looked up")),
                None => return Start::General(Some((conn, Prior::None))),
            },
            (None, Conn::Pooled(_)) => {
                let reservation = Reservation::none(self.key, self.scope);
                (reservation, None, unlock.expect("looked up"))
            }
        };
        let may_wait = op == Op::Lock;
        let canceller = may_wait.then(|| self.source.canceller(&conn));
        let mut attempt = Attempt::new(ConnSlot::new(conn), reservation, self, mode, checks);
        attempt.canceller = canceller;
        attempt.may_wait = may_wait;
        attempt.combined = combined;
        let unlock = PreparedUnlock {
            statement: unlock,
            checks,
        };
        Start::Direct(attempt, acquire, unlock)
    }

    /// The guard of a granted attempt, with this lock's health check and parking.
    fn granted(
        &self,
        attempt: Attempt,
        mode: LockMode,
        pid: i32,
        unlock: Option<PreparedUnlock>,
    ) -> AdvisoryLockGuard {
        attempt
            .into_guard(mode, pid, unlock)
            .with_health_check(self.health.as_ref())
            .with_parking(self.parking.as_ref())
    }

    /// An acquisition in its DEBUG span, with its outcome's event.
    async fn acquire_traced(
        &self,
        mode: LockMode,
        deadline: Deadline,
    ) -> Result<Option<AdvisoryLockGuard>> {
        use tracing::Instrument;
        let timer = trace::Timer::start();
        let span = trace::acquire_span(self.key, mode, self.scope);
        let result = self
            .acquire_untraced(mode, deadline, None, false)
            .instrument(span.clone())
            .await;
        span.in_scope(|| trace::acquired(self.key, mode, self.scope, &result, &timer));
        result
    }

    /// The general path: any source, scope, wait and connection state. `claimed` is the
    /// connection [`start_direct`](Self::start_direct) claimed, if it did; `deallocated` says
    /// the statements were found deallocated once already.
    async fn acquire_untraced(
        &self,
        mode: LockMode,
        deadline: Deadline,
        claimed: Option<(Conn, Prior)>,
        mut deallocated: bool,
    ) -> Result<Option<AdvisoryLockGuard>> {
        let behind_pooler = self.source.behind_pooler();
        if behind_pooler && self.scope == LockScope::Session {
            return Err(Error::SessionLockBehindPooler { key: self.key });
        }
        if self.scope == LockScope::Transaction && self.source.is_shared_session() {
            return Err(Error::TransactionOnSharedSession { key: self.key });
        }
        // One call site for `acquire_on`, so that its future is stored (and its code generated)
        // once in this one.
        let mut next = match (&self.parking, self.scope) {
            _ if claimed.is_some() => claimed,
            // Tasks wait for a connection of the pool: the parked one goes to them first (once
            // its release is confirmed), and this acquisition queues for the pool behind them.
            (Some(parking), LockScope::Session) if self.source.pool_has_waiters() => {
                parking.let_go();
                None
            }
            (Some(parking), LockScope::Session) => match parking.claim() {
                Some(Claimed::Deferred(deferred)) => {
                    match self.combinable(deferred, mode, deadline) {
                        Some((deferred, statement, checks)) => Some((
                            deferred.conn().share(),
                            Prior::Deferred(deferred, statement, checks),
                        )),
                        // Sent alone, which parked the connection again with the unlock in
                        // flight: claim it that way.
                        None => parking.claim().and_then(in_flight),
                    }
                }
                claimed => claimed.and_then(in_flight),
            },
            _ => None,
        };
        loop {
            let (conn, prior) = match next.take() {
                Some(claimed) => claimed,
                None => (self.source.checkout().await?, Prior::None),
            };
            let attempted = match self.acquire_on(conn, prior, mode, deadline).await {
                Ok(attempted) => attempted,
                Err(error) => return Err(self.reported(error)),
            };
            match attempted {
                Attempted::Done(guard) => return Ok(guard),
                // The unlock before ours failed, and that connection is being closed: start
                // again on a fresh one.
                Attempted::Retry => trace::prior_release_failed(self.key),
                // Once: a server that refuses the statements again is not deallocating them.
                Attempted::Deallocated(error) if deallocated => return Err(self.reported(error)),
                Attempted::Deallocated(_) => {
                    trace::statements_deallocated(self.key);
                    deallocated = true;
                }
            }
        }
    }

    /// `error`, once a backend that changed under the acquisition is reported (at WARN: a
    /// pooler in the wrong mode, which the operator should hear of).
    fn reported(&self, error: Error) -> Error {
        if let Error::BackendChanged { .. } = &error {
            trace::backend_changed(self.key, &error);
        }
        error
    }

    /// The pauses of a polling wait, first and longest: the lock's wait strategy's, or on a
    /// shared session (where nothing waits on the server, see `Session::dedicated`) those of
    /// [`WaitStrategy::poll`]. `None` for a blocking wait.
    fn polling(&self) -> Option<(Duration, Duration)> {
        match self.wait {
            WaitStrategy::Poll { initial, max } => Some((initial, max)),
            WaitStrategy::Block if self.source.is_shared_session() => match WaitStrategy::poll() {
                WaitStrategy::Poll { initial, max } => Some((initial, max)),
                WaitStrategy::Block => unreachable!("a polling strategy"),
            },
            WaitStrategy::Block => None,
        }
    }

    /// The acquiring statement's kind for `deadline` and the lock's wait strategy.
    fn op(&self, deadline: Deadline) -> Op {
        let polling = self.polling().is_some();
        match deadline {
            Deadline::Now => Op::TryLock,
            _ if polling => Op::TryLock,
            Deadline::Never => Op::Lock,
            Deadline::At(_) => Op::LockWithTimeout,
        }
    }

    /// `deferred` (a dropped guard's unlock on the same connection) with the statement that
    /// sends it in this acquisition's own, and the checks that statement makes, when it can:
    /// the same key in the same mode, session scope, an acquiring statement that has a
    /// combined form, already prepared there. Otherwise the unlock is sent alone, now, ahead
    /// of anything this acquisition sends.
    fn combinable(
        &self,
        deferred: DeferredUnlock,
        mode: LockMode,
        deadline: Deadline,
    ) -> Option<(DeferredUnlock, Statement, Checks)> {
        // The connection's checks; else, while the plain forms are not prepared there, those of
        // the dropped guard's unlock, whose combined form was prepared with it.
        let combined = |checks| {
            (deferred.key == self.key && deferred.mode == mode && self.scope == LockScope::Session)
                .then(|| unlock_then(self.op(deadline), mode, Form::of(self.key), checks))
                .flatten()
                .and_then(|sql| deferred.conn().cached(sql))
                .map(|statement| (statement, checks))
        };
        let statement = combined(deferred.conn().verification().checks())
            .or_else(|| combined(deferred.checks()));
        match statement {
            Some((statement, checks)) => Some((deferred, statement, checks)),
            None => {
                deferred.send_alone();
                None
            }
        }
    }

    /// Acquires on `conn`, after `prior`: what a dropped guard left on the connection.
    async fn acquire_on(
        &self,
        conn: Conn,
        prior: Prior,
        mode: LockMode,
        deadline: Deadline,
    ) -> Result<Attempted> {
        let key = self.key;
        let behind_pooler = self.source.behind_pooler();
        let op = self.op(deadline);
        let polling = self.polling();
        // A dropped guard's unlock of this key in this mode rides in this acquisition's
        // statement, and the key's reservation passes to it; any other is sent alone first.
        let (prior_release, offered, combined) = match prior {
            Prior::None => match &conn {
                Conn::Session(session) => (
                    None,
                    Weak::new(),
                    session
                        .deferred_unlock
                        .take_for(self.key, mode)
                        .and_then(|deferred| self.combinable(deferred, mode, deadline)),
                ),
                Conn::Pooled(_) => (None, Weak::new(), None),
            },
            Prior::InFlight(released, in_flight) => (Some(released), in_flight, None),
            Prior::Deferred(deferred, statement, checks) => {
                (None, Weak::new(), Some((deferred, statement, checks)))
            }
        };
        let reservation = match &combined {
            Some(_) => None,
            // Held by another guard of the session: a wait waits in-process until it goes.
            None => match conn.reserve(key, self.scope, deadline.in_process()).await? {
                Some(reservation) => Some(reservation),
                None => return Ok(Attempted::Done(None)),
            },
        };
        // The statements all make the checks the combined one was chosen with, if any: the
        // connection may have been verified since, but the checking forms work on any.
        let checks = match &combined {
            Some((_, _, checks)) => *checks,
            None => conn.verification().checks(),
        };
        let slot = ConnSlot::new(conn);
        let form = Form::of(key);
        let acquire_sql = statement(op, mode, self.scope, form, checks);
        let found = self.cached(
            &slot,
            op,
            acquire_sql,
            (form, mode, checks),
            combined.is_some(),
        );
        let prepared = match found {
            Some(prepared) => Ok(prepared),
            None => {
                // Boxed: preparing is rare (once per connection), and its future would otherwise
                // double the size of every acquisition's.
                Box::pin(self.prepare(&slot, op, acquire_sql, (form, mode, checks), behind_pooler))
                    .await
            }
        };
        let (acquire_statement, unlock) = match prepared {
            Ok(prepared) => prepared,
            Err(error) => {
                if let Some((deferred, ..)) = combined {
                    deferred.send_alone();
                }
                // On a claimed connection, the statement may have failed for what the unlock
                // before it left behind (an aborted transaction): start again elsewhere then.
                if let Some(prior) = prior_release {
                    if !prior.await.unwrap_or(false) {
                        return Ok(Attempted::Retry);
                    }
                }
                return Err(error);
            }
        };
        let (reservation, combined) = match combined {
            Some((deferred, statement, _)) => {
                let (reservation, granted_on, _) = deferred.into_combined();
                let reservation = reservation.expect("a deferred unlock keeps its reservation");
                (reservation, Some((statement, granted_on)))
            }
            None => (reservation.expect("reserved above"), None),
        };
        // A release queued on the connection before this statement: read its answer alongside.
        let offered = match slot.conn() {
            Conn::Session(session) => session.take_offered_release(),
            Conn::Pooled(_) => offered,
        };
        let mut attempt = Attempt::new(slot, reservation, self, mode, checks);
        attempt.offered = offered;
        attempt.prior_release = prior_release;
        attempt.combined = combined;
        let (mut pause, max_pause) = self.polling().unwrap_or_default();
        loop {
            let lock_timeout = match (op, deadline) {
                (Op::LockWithTimeout, Deadline::At(at)) => {
                    let left = at.saturating_duration_since(Instant::now());
                    // lock_timeout = 0 would mean "wait forever": never send less than 1 ms.
                    Some(format!("{}ms", left.as_millis().max(1)))
                }
                _ => None,
            };
            let may_wait = op != Op::TryLock;
            if may_wait && attempt.canceller.is_none() {
                let conn = attempt
                    .slot
                    .as_ref()
                    .expect("idle attempt holds its connection")
                    .conn();
                attempt.canceller = Some(self.source.canceller(conn));
            }
            let answer = attempt
                .run(&acquire_statement, lock_timeout, may_wait)
                .await;
            if attempt.prior_release_failed {
                // Whatever the answer, the connection is marked to be closed, which ends
                // anything it holds; dropping the attempt lets it go.
                return Ok(Attempted::Retry);
            }
            match answer {
                Ok((granted, pid)) => {
                    if checks == Checks::InStatement && self.source.may_verify() {
                        let conn = attempt.slot.as_ref().expect("idle attempt").conn();
                        if conn.verification().is_pending() {
                            conn.learn_backend(pid, granted.is_none());
                        }
                    }
                    match granted {
                        Some(true) => {
                            let guard = self.granted(attempt, mode, pid, unlock);
                            return Ok(Attempted::Done(Some(guard)));
                        }
                        Some(false) => {
                            if polling.is_some() && !matches!(deadline, Deadline::Now) {
                                trace::polling(key, Some(pid), pause);
                            }
                        }
                        None => return Err(Error::ReadOnlyStandby),
                    }
                }
                Err(e)
                    if op == Op::LockWithTimeout
                        && e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) =>
                {
                    if self.scope == LockScope::Session {
                        // The grant and the timeout can cross: the server grants the lock, then
                        // reports the timeout that fired meanwhile, and a session lock survives
                        // that error. Release it if so before reporting "busy", so that nothing
                        // is ever held once this returns.
                        let conn = attempt.slot.as_ref().expect("idle attempt").conn();
                        // Boxed, as a rare path.
                        if Box::pin(release(conn, &Release::UnlockIfHeld(mode), key))
                            .await
                            .is_err()
                        {
                            attempt.settle_unknown();
                        }
                    }
                    attempt.end_transaction().await;
                    return Ok(Attempted::Done(None));
                }
                Err(e) => return attempt.failed(e),
            }
            // Busy after a single attempt: give up, or pause and poll again.
            let now = Instant::now();
            let until = match deadline {
                Deadline::At(at) if at > now => at,
                Deadline::Never => now + pause,
                Deadline::Now | Deadline::At(_) => {
                    attempt.end_transaction().await;
                    return Ok(Attempted::Done(None));
                }
            };
            tokio::time::sleep_until(until.min(now + pause)).await;
            pause = (pause * 2).min(max_pause);
        }
    }

    /// The session-scope statements [`prepare`](Self::prepare) would return, when they are
    /// prepared on this connection already (the common case): no future to create and poll.
    fn cached(
        &self,
        slot: &ConnSlot,
        op: Op,
        acquire_sql: &'static str,
        (form, mode, checks): (Form, LockMode, Checks),
        combined_found: bool,
    ) -> Option<(Acquire, Option<PreparedUnlock>)> {
        if self.scope != LockScope::Session {
            return None;
        }
        let conn = slot.conn();
        let unlock_sql = statement(Op::Unlock, mode, self.scope, form, checks);
        let (acquire, unlock) = conn.cached(acquire_sql).zip(conn.cached(unlock_sql))?;
        // The combined statement a guard's drop may need on this connection later (unless the
        // caller found it already): when it is missing, `prepare` prepares it with the others.
        if !combined_found {
            if let Some(combined_sql) = unlock_then(op, mode, form, checks) {
                conn.cached(combined_sql)?;
            }
        }
        let unlock = PreparedUnlock {
            statement: unlock,
            checks,
        };
        Some((Acquire::Prepared(acquire), Some(unlock)))
    }

    /// Prepares the acquiring statement and, for session scope, the unlock (cached per
    /// connection: a round trip the first time only), so that a guard can always release
    /// without preparing.
    async fn prepare(
        &self,
        slot: &ConnSlot,
        op: Op,
        acquire_sql: &'static str,
        (form, mode, checks): (Form, LockMode, Checks),
        behind_pooler: bool,
    ) -> Result<(Acquire, Option<PreparedUnlock>)> {
        let key = self.key;
        let conn = slot.conn();
        let map = |e| Error::from_postgres(Some(key), e);
        Ok(match self.scope {
            // Behind a transaction pooler a prepared statement may not exist on the server
            // connection the next transaction gets: send the statement unprepared (session
            // scope was refused above, so there is no unlock statement to prepare).
            LockScope::Transaction if behind_pooler => (Acquire::Unnamed(acquire_sql), None),
            LockScope::Session => {
                // In one round trip: the acquiring statement, its unlock, and the combined one,
                // for the next acquisition on the connection after a guard's drop. On a
                // connection not verified yet, their plain forms too: this acquisition's answer
                // may verify it, and the next one, a dropped guard's included, then finds them.
                let unlock_sql = statement(Op::Unlock, mode, self.scope, form, checks);
                let mut others: Vec<&'static str> =
                    unlock_then(op, mode, form, checks).into_iter().collect();
                if checks == Checks::InStatement
                    && conn.verification().is_pending()
                    && self.source.may_verify()
                {
                    // The texts of the plain forms do not depend on the pid.
                    let plain = Checks::Verified(0);
                    others.push(statement(op, mode, self.scope, form, plain));
                    others.push(statement(Op::Unlock, mode, self.scope, form, plain));
                    others.extend(unlock_then(op, mode, form, plain));
                }
                let (a, u, others) = futures_util::future::join3(
                    conn.prepare(acquire_sql),
                    conn.prepare(unlock_sql),
                    futures_util::future::join_all(others.into_iter().map(|sql| conn.prepare(sql))),
                )
                .await;
                for prepared in others {
                    prepared.map_err(map)?;
                }
                let unlock = PreparedUnlock {
                    statement: u.map_err(map)?,
                    checks,
                };
                (Acquire::Prepared(a.map_err(map)?), Some(unlock))
            }
            LockScope::Transaction => (
                Acquire::Prepared(conn.prepare(acquire_sql).await.map_err(map)?),
                None,
            ),
        })
    }
}

/// How an acquisition starts: see [`AdvisoryLock::start_direct`].
enum Start {
    /// Nothing to send or read before the acquiring statement, which is prepared, but possibly
    /// a dropped guard's unlock to combine with it: the attempt ready to send (carrying the
    /// combined statement, if so), the acquiring statement (unless combined), and the unlock
    /// its guard will use.
    Direct(Attempt, Option<Statement>, PreparedUnlock),
    /// The general path, on the connection claimed on the way, with what its last guard left
    /// there, if one was.
    General(Option<(Conn, Prior)>),
}

/// What a dropped guard left on the connection an acquisition starts on.
enum Prior {
    /// Nothing known: a connection from the source, or a shared session (whose deferred unlock
    /// the acquisition looks for itself).
    None,
    /// A claimed parked connection with its unlock in flight: how the unlock ends, and the
    /// release itself, to read its answer.
    InFlight(PriorRelease, Weak<ReleaseInFlight>),
    /// A claimed parked connection whose unlock is not sent yet, with the statement that sends
    /// it in the acquisition's own and the checks it makes.
    Deferred(DeferredUnlock, Statement, Checks),
}

/// A claimed parked connection with its unlock in flight, as the acquisition's start. A
/// deferred unlock found instead (another clone's drop came in between) is sent alone, and the
/// acquisition takes a fresh connection.
fn in_flight(claimed: Claimed) -> Option<(Conn, Prior)> {
    match claimed {
        Claimed::InFlight(parked) => Some((
            parked.conn,
            Prior::InFlight(parked.released, parked.in_flight),
        )),
        Claimed::Deferred(deferred) => {
            deferred.send_alone();
            None
        }
        Claimed::Idle(conn) => Some((conn, Prior::None)),
    }
}

/// How an acquisition on one connection ended, short of an error.
enum Attempted {
    /// Granted, or busy (`None`).
    Done(Option<AdvisoryLockGuard>),
    /// The connection was claimed from the parking and the unlock before ours failed: the
    /// connection is being closed, and the acquisition must start again on another.
    Retry,
    /// The server refused the statement as not prepared, on a connection verified as direct:
    /// the statements were deallocated, nothing ran, and the acquisition starts again (on the
    /// same session, or on another pooled connection, this one being closed). The error is
    /// what to report if it happens again.
    Deallocated(Error),
}

/// The acquiring statement: prepared on the connection, or sent unprepared (behind a
/// transaction pooler).
#[derive(Clone)]
enum Acquire {
    Prepared(Statement),
    Unnamed(&'static str),
}

/// An acquisition in progress. Whatever point it is dropped at, its `Drop` leaves the server
/// as it found it: no lock held, no waiter queued, no transaction open.
///
/// The statement in flight is owned by the acquisition's future (in place, or boxed for the
/// rarer forms), not by the attempt: if the acquisition is abandoned before its answer, the
/// cleanup does not need that answer. It treats the outcome as unknown and undoes whatever the
/// statement may have done, by means that are correct either way (closing a pooled connection,
/// or queueing an undo right behind the statement on a shared session).
struct Attempt {
    /// The connection (taken when the attempt becomes a guard or hands it to a cleanup).
    slot: Option<ConnSlot>,
    /// A release queued on the connection before this attempt's statement, whose answer
    /// nobody reads yet: the statement adopts it.
    offered: Weak<ReleaseInFlight>,
    /// That release, adopted and not finished: polled with the statement, spawned if the
    /// attempt is dropped first.
    adopted: Option<ReleaseTask>,
    /// A statement was sent on the connection and its answer is not in yet.
    in_flight: bool,
    /// The statement in flight may sit in the server's lock queue: an abandoned attempt sends a
    /// cancel request.
    may_wait: bool,
    /// `BEGIN` has been sent (transaction scope).
    in_transaction: bool,
    key: AdvisoryKey,
    scope: LockScope,
    canceller: Option<Canceller>,
    /// Dropped after any undo is queued (fields drop after `Drop::drop`).
    reservation: Option<Reservation>,
    mode: LockMode,
    /// On a claimed parked connection, the outcome of the unlock queued before ours.
    prior_release: Option<PriorRelease>,
    /// That unlock failed: the connection is marked to be closed.
    prior_release_failed: bool,
    /// A dropped guard's unlock of the same key to send with the first statement, combined into
    /// one (`sql::unlock_then`): its statement and the pid it must run on.
    combined: Option<(Statement, i32)>,
    /// The combined statement failed: the unlock in it may or may not have run, so the key may
    /// still be held for the dropped guard.
    combined_in_doubt: bool,
    /// What the statements check on the server, which decides the shape of their answers.
    checks: Checks,
}

/// Whether a session lock may be held after the acquiring statement failed with `error`.
///
/// A deadlock ends the wait before any grant; a failed statement in a transaction aborts it, and
/// the transaction-scoped lock goes with it. A lock timeout is not such a proof: it can be
/// reported just after the grant, and session locks survive the error of the statement that
/// took them.
fn may_hold_after(error: &tokio_postgres::Error, scope: LockScope) -> bool {
    error.code() != Some(&SqlState::T_R_DEADLOCK_DETECTED) && scope == LockScope::Session
}

impl Attempt {
    /// An attempt on `slot`'s connection, holding `reservation`, with nothing sent yet.
    fn new(
        slot: ConnSlot,
        reservation: Reservation,
        lock: &AdvisoryLock,
        mode: LockMode,
        checks: Checks,
    ) -> Self {
        Attempt {
            slot: Some(slot),
            offered: Weak::new(),
            adopted: None,
            in_flight: false,
            may_wait: false,
            in_transaction: false,
            key: lock.key,
            scope: lock.scope,
            canceller: None,
            reservation: Some(reservation),
            mode,
            prior_release: None,
            prior_release_failed: false,
            combined: None,
            combined_in_doubt: false,
            checks,
        }
    }

    /// Ends the attempt after its acquiring statement answered without a row: its outcome is
    /// unknown, so the connection goes to a cleanup that undoes whatever it may have taken.
    #[cold]
    fn unexpected_answer(&mut self) -> Error {
        self.settle_unknown();
        Error::UnexpectedAnswer { key: self.key }
    }

    /// Ends the attempt after its acquiring statement failed with `error`, other than by a lock
    /// timeout: returns the error, after handing the connection to a cleanup when a lock may be
    /// held; or [`Attempted::Deallocated`] when the statements were deallocated on a connection
    /// verified as direct, for the acquisition to start again.
    fn failed(&mut self, error: tokio_postgres::Error) -> Result<Attempted> {
        if error.code() == Some(&SqlState::INVALID_SQL_STATEMENT_NAME) {
            // The server refused the statement before running it, so nothing was taken. Either
            // the backend changed under a transaction pooler (what the error reports) or the
            // statements were deallocated: in both cases what pglock remembers as prepared
            // there is wrong, and the next acquisition must not fail the same way.
            client_conn(&self.slot).forget_statements();
            if self.combined_in_doubt {
                // Refused before running: the dropped guard's unlock did not run either.
                self.settle_unknown();
            } else if matches!(self.checks, Checks::Verified(_)) && self.scope == LockScope::Session
            {
                // A connection verified as direct keeps its backend: the statements were
                // deallocated (`DEALLOCATE`, `DISCARD ALL`), and starting again, preparing
                // anew, hides no misconfiguration.
                let error = Error::from_postgres(Some(self.key), error);
                return Ok(Attempted::Deallocated(error));
            }
        } else if self.combined_in_doubt || may_hold_after(&error, self.scope) {
            self.settle_unknown();
        }
        Err(Error::from_postgres(Some(self.key), error))
    }

    /// Sends the acquiring statement (after `BEGIN` when a transaction is due) and awaits its
    /// answer: whether the lock was granted (`None` on a standby), and the backend's pid.
    async fn run(
        &mut self,
        statement: &Acquire,
        lock_timeout: Option<String>,
        may_wait: bool,
    ) -> Result<(Option<bool>, i32), tokio_postgres::Error> {
        let begin = self.scope == LockScope::Transaction && !self.in_transaction;
        self.in_transaction |= begin;
        let key = self.key;
        let prior_release = self.prior_release.take();
        let client = self
            .slot
            .as_ref()
            .expect("one statement in flight at a time")
            .conn()
            .client();
        let combined = self.combined.take();
        let params = KeyParams::new(key);
        let extra = match &combined {
            // The combined statement's parameters are the unlock's: the key, then the pid.
            Some((_, granted_on)) => self.checks.pid_param(granted_on),
            None => lock_timeout.as_ref().map(|t| t as &(dyn ToSql + Sync)),
        };
        let params = params.with(extra);
        // Set before the first poll, which is the one that sends the statement: from here until
        // the answer, dropping the attempt must undo whatever the statement may do.
        self.in_flight = true;
        self.may_wait = may_wait;
        // The common case (a prepared statement, no `BEGIN` to send first) is awaited in place.
        // The others are boxed: their futures are larger, and every acquisition future would
        // otherwise carry the largest (2,528 bytes for `lock()` instead of 2,176).
        let statement = match (&combined, statement, begin) {
            (Some((combined, _)), _, _) => {
                Either::Left(client.query_one(combined, params.as_slice()))
            }
            (None, Acquire::Prepared(statement), false) => {
                Either::Left(client.query_one(statement, params.as_slice()))
            }
            (None, statement, begin) => Either::Right(Box::pin(begin_and_acquire(
                client,
                statement,
                params.as_slice(),
                (key, extra),
                begin,
            ))),
        };
        let result = {
            let mut statement = std::pin::pin!(statement);
            // Taken over on the first statement only (a polling wait sends several).
            self.adopted = ReleaseInFlight::adopt(&std::mem::take(&mut self.offered));
            let adopted = &mut self.adopted;
            let result = poll_fn(|cx| {
                if let Some(release) = adopted {
                    if release.as_mut().poll(cx).is_ready() {
                        *adopted = None;
                    }
                }
                statement.as_mut().poll(cx)
            })
            .await;
            // The release was queued before the statement, so its answer is in: this returns
            // at once.
            poll_fn(|cx| match adopted {
                Some(release) => {
                    ready!(release.as_mut().poll(cx));
                    *adopted = None;
                    Poll::Ready(())
                }
                None => Poll::Ready(()),
            })
            .await;
            result
        };
        let mut prior_ok = match prior_release {
            // The unlock was queued before our statement, so it has answered by now; its task
            // may just not have reported yet.
            Some(released) => released.await.unwrap_or(false),
            None => true,
        };
        let mut acquired = None;
        if let Some((_, granted_on)) = combined {
            (acquired, prior_ok) = self.read_combined(&result, granted_on, may_wait);
        } else if !prior_ok {
            // The session may hold the key twice, or hold it for nobody: only closing the
            // connection ends both for sure.
            client_conn(&self.slot).mark_discard();
        }
        self.in_flight = false;
        self.may_wait = false;
        self.prior_release_failed = !prior_ok;
        result.map(|row| acquired.unwrap_or_else(|| self.checks.acquired(&row, may_wait)))
    }

    /// Reads the answer of a combined statement, a dropped guard's unlock of the key (granted
    /// by the backend with pid `granted_on`) then this attempt's acquisition: the acquisition's
    /// outcome if it ran, and whether the unlock's outcome leaves the connection usable (if not,
    /// it is marked to be closed).
    fn read_combined(
        &mut self,
        result: &Result<Row, tokio_postgres::Error>,
        granted_on: i32,
        may_wait: bool,
    ) -> (Option<(Option<bool>, i32)>, bool) {
        let (acquired, prior_ok) = match result {
            Ok(row) => {
                let (granted, ran_on, released) = self.checks.unlocked_then_acquired(row, may_wait);
                let released = unlock_outcome(self.key, granted_on, ran_on, released);
                trace::released(self.key, granted_on, "drop", &released, true);
                // On a shared session the failure is only reported, as for an unlock sent
                // alone; a pooled connection is closed, as after a failed parked unlock.
                let ok = released.is_ok() || !client_conn(&self.slot).is_pooled();
                (Some((granted, ran_on)), ok)
            }
            // Whether the unlock ran is unknown. A pooled connection is closed, which ends both
            // locks, and the acquisition starts again on another (as after a failed parked
            // unlock); on a shared session the caller undoes whatever may be held.
            Err(_) if client_conn(&self.slot).is_pooled() => (None, false),
            Err(_) => {
                self.combined_in_doubt = true;
                (None, true)
            }
        };
        if !prior_ok {
            // The session may hold the key twice, or hold it for nobody: only closing the
            // connection ends both for sure.
            client_conn(&self.slot).mark_discard();
        }
        (acquired, prior_ok)
    }

    fn into_guard(
        mut self,
        mode: LockMode,
        backend_pid: i32,
        unlock: Option<PreparedUnlock>,
    ) -> AdvisoryLockGuard {
        let conn = self
            .slot
            .take()
            .expect("granted attempt holds its connection")
            .into_conn();
        let reservation = self
            .reservation
            .take()
            .expect("an attempt holds its reservation");
        AdvisoryLockGuard::new(conn, reservation, mode, backend_pid, unlock)
    }

    /// Rolls back the transaction of a transaction-scoped attempt that gives up, before it
    /// reports "busy": a lock granted just as the timeout fired lives until the rollback, and
    /// nothing may be held once the caller hears "busy".
    async fn end_transaction(&mut self) {
        if !self.in_transaction {
            return;
        }
        // Boxed, as a rare path: see `AdvisoryLock::acquire_on`.
        if Box::pin(release(
            client_conn(&self.slot),
            &Release::Rollback,
            self.key,
        ))
        .await
        .is_ok()
        {
            self.in_transaction = false;
        } else {
            self.settle_unknown();
        }
    }

    /// Hands the connection to a background cleanup after a statement failed in a way that may
    /// have left a session lock taken.
    fn settle_unknown(&mut self) {
        let slot = self
            .slot
            .take()
            .expect("a failed statement returned its connection");
        self.clean_up_in_background(slot, None);
    }

    /// Undoes whatever the acquisition may have done on `slot`'s connection, without knowing
    /// what that was (the answer of the statement may not be in yet).
    ///
    /// A pooled connection is closed: that ends its session, and with it any lock or
    /// transaction the statement took or began (tokio-postgres closes it once the answers
    /// already asked for are in, which the cancel request hastens). On a shared session, the
    /// undo is queued at once, right behind the acquiring statement, so nothing else can run
    /// there in between: a rollback in a transaction, otherwise an unlock of the key if, and
    /// only if, the session holds it. A session-scoped key stays reserved (new acquisitions of
    /// it wait) until that unlock has answered.
    fn clean_up_in_background(&mut self, slot: ConnSlot, cancel: Option<(CancelToken, Canceller)>) {
        let key = self.key;
        let mut reservation = self.reservation.take();
        let mut free_when_queued = false;
        // `ended` answers once the abandoned statement has ended on the server: it is a request
        // queued right behind it. Cancel requests are repeated until then.
        let ended: Option<ReleaseTask> = match slot.conn() {
            Conn::Pooled(_) if cancel.is_none() => {
                // Closed now: the connection ends once the answers already asked for are in.
                drop(slot);
                None
            }
            Conn::Pooled(_) => {
                // Out of the pool at once, but kept open until the statement has ended, so that
                // the cancel requests can be repeated until one lands; closed then.
                match slot.into_conn().detach() {
                    Ok(client) => Some(Box::pin(async move {
                        let _ = client.batch_execute("").await;
                    })),
                    Err(shared) => {
                        let slot = ConnSlot::new(shared);
                        Some(Box::pin(async move {
                            let _ = slot.conn().client().batch_execute("").await;
                        }))
                    }
                }
            }
            Conn::Session(_) if self.in_transaction => {
                // The session's transaction stays reserved until the rollback is queued (below):
                // a `BEGIN` another task queued first would run inside this transaction, and the
                // rollback would end that task's transaction with its lock.
                free_when_queued = true;
                Some(Box::pin(async move {
                    let _ = release(slot.conn(), &Release::Rollback, key).await;
                }))
            }
            Conn::Session(_) => {
                if let Some(reservation) = &reservation {
                    reservation.mark_cleaning();
                }
                let undo = Release::UnlockIfHeld(self.mode);
                Some(Box::pin(async move {
                    // The cancel requests repeat until this undo has answered, so when it runs
                    // longer than their pause they end it more often than `release` retries it:
                    // run it until one run is not cancelled, or the key would stay held here.
                    let released = loop {
                        match release(slot.conn(), &undo, key).await {
                            Err(e) if e.code() == Some(&SqlState::QUERY_CANCELED) => {}
                            released => break released,
                        }
                    };
                    slot.finish(released.is_ok());
                }))
            }
        };
        // Queued at once, right behind the statement, so nothing else runs there in between.
        let ended = ended.and_then(background::queue);
        if free_when_queued && cancel.is_none() {
            // The rollback is queued: the session is free for the next transaction, whose
            // statements travel behind it. With cancel requests in flight, it stays reserved
            // until they are over (see `cancel_until_ended`): one landing late would cancel the
            // next transaction's statement.
            reservation = None;
        }
        // Without a runtime, the undo already queued still runs on the server (only its answer
        // is not read), and a pooled slot dropped here closes its connection.
        let Ok(runtime) = Handle::try_current() else {
            return;
        };
        if cancel.is_none() && ended.is_none() {
            return;
        }
        runtime.spawn(async move {
            let _reservation = reservation;
            match (cancel, ended) {
                (Some((token, canceller)), Some(ended)) => {
                    cancel_until_ended(key, token, canceller, ended).await
                }
                (Some((token, canceller)), None) => canceller.cancel(token).await,
                (None, Some(ended)) => ended.await,
                (None, None) => {}
            }
        });
    }
}

/// The acquiring statement of [`Attempt::run`] in its rarer forms: unprepared (behind a
/// transaction pooler), or after `BEGIN` (sent in the same round trip) for transaction scope.
///
/// `params` are the prepared statement's parameters; an unnamed statement gets the same values,
/// `key` and `extra`, with their types.
async fn begin_and_acquire(
    client: &tokio_postgres::Client,
    statement: &Acquire,
    params: &[&(dyn ToSql + Sync)],
    (key, extra): (AdvisoryKey, Option<&(dyn ToSql + Sync)>),
    begin: bool,
) -> Result<Row, tokio_postgres::Error> {
    // A closure, so that each branch below creates the future it awaits: a future captured by
    // the block below would be stored beside the one in flight, doubling its size.
    let query = || async {
        match statement {
            Acquire::Prepared(statement) => client.query_one(statement, params).await,
            Acquire::Unnamed(sql) => {
                let typed = KeyParams::new(key);
                let typed = typed.typed(extra.map(|extra| (extra, Type::TEXT)));
                let rows = client.query_typed(sql, typed.as_slice()).await?;
                Ok(rows
                    .into_iter()
                    .next()
                    .expect("the statement returns one row"))
            }
        }
    };
    if begin {
        let (begun, row) = futures_util::future::join(client.batch_execute("BEGIN"), query()).await;
        begun.and(row)
    } else {
        query().await
    }
}

/// The pause before a cancel request is sent again, doubling up to [`CANCEL_RETRY_MAX`].
const CANCEL_RETRY_FIRST: Duration = Duration::from_millis(20);
const CANCEL_RETRY_MAX: Duration = Duration::from_secs(1);

/// Sends cancel requests for an abandoned statement until `ended`, a request queued right behind
/// it, has its answer.
///
/// One request is not always enough. PostgreSQL ignores a cancel request that reaches the backend
/// before it has started the statement: the backend is still reading its next command, or (on a
/// shared session) still running a query queued ahead, which the request cancels instead. A
/// blocking wait that missed its cancel would stay in the server's lock queue until the key came
/// free, then take it; on a shared session everything queued behind it would wait as long. So
/// the request is repeated, 20 ms after the first and then at doubling intervals up to a second,
/// until the statement has ended. A repeat that lands on the undo queued behind the statement
/// makes the undo run again (see [`release`]).
///
/// A request still in flight when the statement ends is waited for too (until the server has
/// acted on it, where the canceller can tell): the caller frees the connection for the next
/// statement when this returns, and a request landing then would cancel that statement.
async fn cancel_until_ended(
    key: AdvisoryKey,
    token: CancelToken,
    canceller: Canceller,
    mut ended: ReleaseTask,
) {
    use futures_util::future::{select, Either};
    let mut pause = CANCEL_RETRY_FIRST;
    loop {
        if let Either::Left(((), request)) =
            select(ended.as_mut(), canceller.cancel(token.clone())).await
        {
            request.await;
            return;
        }
        if tokio::time::timeout(pause, ended.as_mut()).await.is_ok() {
            return;
        }
        trace::cancel_repeated(key, pause);
        pause = (pause * 2).min(CANCEL_RETRY_MAX);
    }
}

/// The connection of an attempt that is not handed over.
fn client_conn(slot: &Option<ConnSlot>) -> &Conn {
    slot.as_ref()
        .expect("the attempt holds its connection")
        .conn()
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if let Some(release) = self.adopted.take() {
            // Someone must still read the answer of the release this attempt took over.
            if let Ok(runtime) = Handle::try_current() {
                runtime.spawn(release);
            }
        }
        let Some(slot) = self.slot.take() else {
            return;
        };
        if self.in_flight || self.combined.is_some() {
            // Abandoned before the answer (or, for a combined statement, before sending the
            // dropped guard's unlock in it): undo whatever the statement may do.
            trace::abandoned(self.key, self.scope);
            let cancel = self
                .may_wait
                .then(|| slot.conn().client().cancel_token())
                .zip(self.canceller.take());
            self.clean_up_in_background(slot, cancel);
        } else if self.in_transaction {
            release_in_background(slot.into_conn(), Release::Rollback, self.key);
        } else {
            slot.finish(true);
        }
    }
}
