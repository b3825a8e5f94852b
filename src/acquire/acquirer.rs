//! How a lock is acquired: the [`Acquirer`] an [`AdvisoryLock`](crate::AdvisoryLock) wraps (the
//! connection source, the key and how to wait), and its two paths: the direct one, a single
//! prepared statement in the common case, and the general one for everything else.

use std::ops::ControlFlow;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::time::Instant;
use tokio_postgres::error::SqlState;
use tokio_postgres::Statement;

use crate::acquire::attempt::{client_conn, Acquire, Attempt, Attempted};
use crate::base::error::{Error, Result};
use crate::base::health::HealthCheck;
use crate::base::key::AdvisoryKey;
use crate::base::scope::{LockMode, LockScope, WaitStrategy};
use crate::base::trace;
use crate::conn::handle::Conn;
use crate::conn::held::HeldConn;
use crate::conn::session::{Reservation, Session};
use crate::conn::source::ConnectionSource;
use crate::guard::AdvisoryLockGuard;
use crate::release::deferred::DeferredUnlock;
use crate::release::in_flight::ReleaseInFlight;
use crate::release::parking::{Claimed, Parking, PriorRelease};
use crate::release::statement::{release, Release};

use crate::base::sql::{
    first_row, statement, unlock_then, Checks, Form, KeyParams, Op, PreparedUnlock,
};

/// What an [`AdvisoryLock`](crate::AdvisoryLock) acquires with: where its connections come
/// from, its key, its scope, how it waits and how its guards are watched.
#[derive(Clone, Debug)]
pub(crate) struct Acquirer {
    pub(crate) source: ConnectionSource,
    pub(crate) key: AdvisoryKey,
    pub(crate) scope: LockScope,
    pub(crate) wait: WaitStrategy,
    pub(crate) health: Option<Arc<HealthCheck>>,
    /// The pooled connection of the last dropped guard, while its unlock is in flight (pool
    /// sources only; shared by clones).
    pub(crate) parking: Option<Arc<Parking>>,
}

/// When an acquisition gives up.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Deadline {
    Never,
    Now,
    At(Instant),
}

impl Deadline {
    /// How long to wait in-process for a key another guard of the same session holds (see
    /// `Conn::reserve`).
    pub(crate) fn in_process(self) -> Option<Option<Instant>> {
        match self {
            Deadline::Now => None,
            Deadline::Never => Some(None),
            Deadline::At(at) => Some(Some(at)),
        }
    }
}

/// How an acquisition starts: see [`Acquirer::start_direct`].
enum Start {
    /// Nothing to send or read before the acquiring statement, which is prepared, but possibly
    /// a dropped guard's unlock riding in it: the attempt ready to send (carrying the combined
    /// statement, if so), the acquiring statement (unless combined), and the unlock its guard
    /// will use.
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
    /// A claimed parked connection whose unlock is not sent yet, to send in the acquisition's
    /// own statement.
    Deferred(RidingUnlock),
}

/// A dropped guard's unlock of the key, in the mode and scope the acquisition asks for, that
/// rides in the acquisition's statement (`sql::unlock_then`): the key's reservation passes from
/// the unlock to the acquisition.
struct RidingUnlock {
    deferred: DeferredUnlock,
    /// The combined statement, prepared on the connection.
    statement: Statement,
    /// What the combined statement checks; the acquisition's other statements check the same.
    checks: Checks,
}

impl RidingUnlock {
    /// Takes the unlock over: the key's reservation, the combined statement with the pid the
    /// unlock must run on, and the dropped guard's prepared unlock, for the new guard when it
    /// makes the same checks.
    #[inline(always)]
    fn take_over(self) -> (Reservation, (Statement, i32), Option<PreparedUnlock>) {
        let (reservation, granted_on, unlock) = self.deferred.into_combined();
        let reservation = reservation.expect("a deferred unlock keeps its reservation");
        (reservation, (self.statement, granted_on), unlock)
    }
}

/// A deferred unlock that could not ride in the acquisition's statement was sent alone.
struct SentAlone;

/// What an acquisition does after an attempt on one connection, on either path (see
/// [`Acquirer::after`]).
enum Next {
    /// The acquisition's outcome.
    Done(Result<Option<AdvisoryLockGuard>>),
    /// Start again on another connection (or the same session); `deallocated` says whether the
    /// statements were found deallocated already.
    Again { deallocated: bool },
}

/// A claimed parked connection as the acquisition's start: idle, or with its unlock in flight.
/// A deferred unlock found instead (another clone's drop came in between) is sent alone, and the
/// acquisition takes a fresh connection.
fn prior_of(claimed: Claimed) -> Option<(Conn, Prior)> {
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

impl Acquirer {
    pub(crate) async fn acquire(
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
        // Every decision before and after the send is the general path's (`start_direct`,
        // `after`); only the send and the read are restated, as `Attempt::run` makes them.
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
        attempt.awaiting_answer = true;
        let client = client_conn(&attempt.held).client();
        let answer = first_row(client, statement, params.with(None).as_slice()).await;
        attempt.awaiting_answer = false;
        attempt.may_wait = false;
        let answer = match answer {
            Ok(Some(row)) => Ok(row),
            Ok(None) => return Err(attempt.unexpected_answer()),
            Err(error) => Err(error),
        };
        let next = 'next: {
            let read = match combined {
                None => None,
                Some((_, granted_on)) => {
                    let (read, prior_ok) = attempt.read_combined(&answer, granted_on, may_wait);
                    if !prior_ok {
                        break 'next self.after(Attempted::Retry, false);
                    }
                    read
                }
            };
            let (granted, pid) = match answer {
                Ok(row) => read.unwrap_or_else(|| attempt.checks.acquired(&row, may_wait)),
                Err(error) => {
                    let attempted = attempt.failed(error).map_err(|e| self.reported(e))?;
                    break 'next self.after(attempted, false);
                }
            };
            match granted {
                Some(true) => return Ok(Some(self.granted(attempt, mode, pid, Some(unlock)))),
                // The first attempt of a polling `lock`: poll on.
                Some(false) if matches!(deadline, Deadline::Never) => {
                    Next::Again { deallocated: false }
                }
                Some(false) => return Ok(None),
                None => return Err(Error::ReadOnlyStandby),
            }
        };
        // Whatever it holds is settled (or its connection marked to be closed): let it go.
        drop(attempt);
        match next {
            Next::Done(outcome) => outcome,
            // Boxed, as a rare path (or, polling, the waiting one).
            Next::Again { deallocated } => {
                Box::pin(self.acquire_untraced(mode, deadline, None, deallocated)).await
            }
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
        let (conn, riding) = match (&self.parking, self.source.session()) {
            (None, Some(session)) if session.offered_release_answered() => {
                match self.riding_on_session(session, mode, deadline) {
                    Ok(riding) => (Conn::Session(session.clone()), riding),
                    // The general path waits until that has freed the key.
                    Err(SentAlone) => return Start::General(None),
                }
            }
            (Some(parking), None) => match self.claim_parked(parking, mode, deadline) {
                Some((conn, Prior::None)) => (conn, None),
                Some((conn, Prior::Deferred(riding))) => (conn, Some(riding)),
                claimed => return Start::General(claimed),
            },
            _ => return Start::General(None),
        };
        let checks = self.checks_on(&conn, riding.as_ref());
        // An unverified connection's answer may verify it, which only the general path reads.
        let found = match checks {
            Checks::InStatement => None,
            _ => self.cached(&conn, op, (mode, checks), riding.as_ref(), true),
        };
        let Some((acquire, unlock)) = found else {
            let prior = riding.map_or(Prior::None, Prior::Deferred);
            return Start::General(Some((conn, prior)));
        };
        let (reservation, combined, unlock) = match (riding, &conn) {
            (Some(riding), _) => {
                let (reservation, combined, dropped_unlock) = riding.take_over();
                let unlock = unlock.or(dropped_unlock.map(|unlock| unlock.statement));
                (reservation, Some(combined), unlock)
            }
            (None, Conn::Session(session)) => match session.try_reserve(self.key) {
                Some(reservation) => (reservation, None, unlock),
                None => return Start::General(Some((conn, Prior::None))),
            },
            (None, Conn::Pooled(_)) => (Reservation::none(self.key, self.scope), None, unlock),
        };
        let may_wait = op == Op::Lock;
        let canceller = may_wait.then(|| self.source.canceller(&conn));
        let mut attempt = Attempt::new(
            HeldConn::new(conn),
            reservation,
            (self.key, self.scope),
            mode,
            checks,
        );
        attempt.canceller = canceller;
        attempt.may_wait = may_wait;
        attempt.combined = combined;
        let unlock = PreparedUnlock {
            statement: unlock.expect("the dropped guard's unlock, found with the same checks"),
            checks,
        };
        Start::Direct(attempt, acquire, unlock)
    }

    /// The parked connection of this lock's last dropped guard, claimed for this acquisition
    /// (session scope), with what the guard left there: nothing, its unlock in flight, or its
    /// unlock deferred and riding in this acquisition's statement. With tasks waiting for the
    /// pool, the parked connection goes to them first (once its release is confirmed), and this
    /// acquisition queues for the pool behind them.
    #[inline(always)]
    fn claim_parked(
        &self,
        parking: &Parking,
        mode: LockMode,
        deadline: Deadline,
    ) -> Option<(Conn, Prior)> {
        if self.source.pool_has_waiters() {
            parking.let_go();
            return None;
        }
        match parking.claim() {
            Some(Claimed::Deferred(deferred)) => match self.riding(deferred, mode, deadline) {
                Ok(riding) => Some((riding.deferred.conn().share(), Prior::Deferred(riding))),
                // Sent alone, which parked the connection again with the unlock in flight:
                // claim it that way.
                Err(SentAlone) => parking.claim().and_then(prior_of),
            },
            claimed => claimed.and_then(prior_of),
        }
    }

    /// A dropped guard's unlock deferred on `session` for this key and mode, riding in this
    /// acquisition's statement when it can; any other is sent alone first.
    #[inline(always)]
    fn riding_on_session(
        &self,
        session: &Session,
        mode: LockMode,
        deadline: Deadline,
    ) -> Result<Option<RidingUnlock>, SentAlone> {
        match session.deferred_unlocks.take_for(self.key, mode) {
            None => Ok(None),
            Some(deferred) => self.riding(deferred, mode, deadline).map(Some),
        }
    }

    /// The checks this acquisition's statements make on `conn`: those of the combined
    /// statement, if one is sent (the connection may have been verified since it was chosen,
    /// but the checking forms work on any), else the connection's.
    #[inline(always)]
    fn checks_on(&self, conn: &Conn, riding: Option<&RidingUnlock>) -> Checks {
        match riding {
            Some(riding) => riding.checks,
            None => conn.verification().checks(),
        }
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
        let mut next = match (&self.parking, self.scope) {
            _ if claimed.is_some() => claimed,
            (Some(parking), LockScope::Session) => self.claim_parked(parking, mode, deadline),
            _ => None,
        };
        loop {
            let (conn, prior) = match next.take() {
                Some(claimed) => claimed,
                None => (self.source.checkout().await?, Prior::None),
            };
            // One call site for `acquire_on`, so that its future is stored (and its code
            // generated) once in this one.
            let attempted = match self.acquire_on(conn, prior, mode, deadline).await {
                Ok(attempted) => attempted,
                Err(error) => return Err(self.reported(error)),
            };
            match self.after(attempted, deallocated) {
                Next::Done(outcome) => return outcome,
                Next::Again { deallocated: again } => deallocated = again,
            }
        }
    }

    /// What follows an attempt on one connection, on either path: its outcome, or starting
    /// again, on a fresh connection after the unlock before it failed (that connection is
    /// being closed), or once after the statements were found deallocated (a server that
    /// refuses them again is not deallocating them).
    fn after(&self, attempted: Attempted, deallocated: bool) -> Next {
        match attempted {
            Attempted::Done(guard) => Next::Done(Ok(guard)),
            Attempted::Retry => {
                trace::prior_release_failed(self.key);
                Next::Again { deallocated }
            }
            Attempted::Deallocated(error) if deallocated => Next::Done(Err(self.reported(error))),
            Attempted::Deallocated(_) => {
                trace::statements_deallocated(self.key);
                Next::Again { deallocated: true }
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

    /// `deferred` (a dropped guard's unlock on the same connection) riding in this
    /// acquisition's statement, when it can: the same key in the same mode, session scope, an
    /// acquiring statement that has a combined form, already prepared there. Otherwise the
    /// unlock is sent alone, now, ahead of anything this acquisition sends.
    fn riding(
        &self,
        deferred: DeferredUnlock,
        mode: LockMode,
        deadline: Deadline,
    ) -> Result<RidingUnlock, SentAlone> {
        // The connection's checks; else, while the plain forms are not prepared there, those of
        // the dropped guard's unlock, whose combined form was prepared with it.
        let statement = self
            .combined_statement(
                &deferred,
                mode,
                deadline,
                deferred.conn().verification().checks(),
            )
            .or_else(|| self.combined_statement(&deferred, mode, deadline, deferred.checks()));
        match statement {
            Some((statement, checks)) => Ok(RidingUnlock {
                deferred,
                statement,
                checks,
            }),
            None => {
                deferred.send_alone();
                Err(SentAlone)
            }
        }
    }

    /// The combined statement that sends `deferred` in this acquisition's, in the form that
    /// makes `checks`, with those checks, if it is prepared on the connection.
    #[inline(always)]
    fn combined_statement(
        &self,
        deferred: &DeferredUnlock,
        mode: LockMode,
        deadline: Deadline,
        checks: Checks,
    ) -> Option<(Statement, Checks)> {
        if deferred.key != self.key || deferred.mode != mode || self.scope != LockScope::Session {
            return None;
        }
        let sql = unlock_then(self.op(deadline), mode, Form::of(self.key), checks)?;
        Some((deferred.conn().cached(sql)?, checks))
    }

    /// Acquires on `conn`, after `prior`: what a dropped guard left on the connection.
    async fn acquire_on(
        &self,
        conn: Conn,
        prior: Prior,
        mode: LockMode,
        deadline: Deadline,
    ) -> Result<Attempted> {
        match self.attempt_on(conn, prior, mode, deadline).await? {
            ControlFlow::Continue((attempt, acquire, unlock)) => {
                self.wait_on(attempt, &acquire, unlock, mode, deadline)
                    .await
            }
            ControlFlow::Break(attempted) => Ok(attempted),
        }
    }

    /// The attempt on `conn` ready to send its first statement, with that statement and the
    /// unlock its guard will use: the key reserved, the statements prepared, and what a dropped
    /// guard left there dealt with (its unlock riding in the statement, or its release in
    /// flight read alongside). Or how the acquisition ends before that: busy in-process, or to
    /// start again elsewhere.
    async fn attempt_on(
        &self,
        conn: Conn,
        prior: Prior,
        mode: LockMode,
        deadline: Deadline,
    ) -> Result<ControlFlow<Attempted, (Attempt, Acquire, Option<PreparedUnlock>)>> {
        let op = self.op(deadline);
        let (prior_release, offered, riding) = match prior {
            Prior::None => match &conn {
                Conn::Session(session) => (
                    None,
                    Weak::new(),
                    // One sent alone instead is waited for by the reservation, below.
                    self.riding_on_session(session, mode, deadline)
                        .unwrap_or(None),
                ),
                Conn::Pooled(_) => (None, Weak::new(), None),
            },
            Prior::InFlight(released, in_flight) => (Some(released), in_flight, None),
            Prior::Deferred(riding) => (None, Weak::new(), Some(riding)),
        };
        let reservation = match &riding {
            // The key's reservation passes from the riding unlock.
            Some(_) => None,
            // Held by another guard of the session: a wait waits in-process until it goes.
            None => match conn
                .reserve(self.key, self.scope, deadline.in_process())
                .await?
            {
                Some(reservation) => Some(reservation),
                None => return Ok(ControlFlow::Break(Attempted::Done(None))),
            },
        };
        let checks = self.checks_on(&conn, riding.as_ref());
        let held = HeldConn::new(conn);
        let found = self
            .cached(held.conn(), op, (mode, checks), riding.as_ref(), false)
            .and_then(|(acquire, unlock)| {
                let unlock = unlock.map(|statement| PreparedUnlock { statement, checks });
                Some((Acquire::Prepared(acquire?), unlock))
            });
        let prepared = match found {
            Some(found) => Ok(found),
            None => {
                let form = Form::of(self.key);
                let acquire_sql = statement(op, mode, self.scope, form, checks);
                let behind_pooler = self.source.behind_pooler();
                // Boxed: preparing is rare (once per connection), and its future would otherwise
                // double the size of every acquisition's.
                Box::pin(self.prepare(&held, op, acquire_sql, (form, mode, checks), behind_pooler))
                    .await
            }
        };
        let (acquire, unlock) = match prepared {
            Ok(prepared) => prepared,
            Err(error) => {
                if let Some(riding) = riding {
                    riding.deferred.send_alone();
                }
                // On a claimed connection, the statement may have failed for what the unlock
                // before it left behind (an aborted transaction): start again elsewhere then.
                if let Some(prior) = prior_release {
                    if !prior.await.unwrap_or(false) {
                        return Ok(ControlFlow::Break(Attempted::Retry));
                    }
                }
                return Err(error);
            }
        };
        let (reservation, combined, unlock) = match riding {
            Some(riding) => {
                let (reservation, combined, dropped_unlock) = riding.take_over();
                (reservation, Some(combined), unlock.or(dropped_unlock))
            }
            None => (reservation.expect("reserved above"), None, unlock),
        };
        // A release queued on the connection before this statement: read its answer alongside.
        let offered = match held.conn() {
            Conn::Session(session) => session.take_offered_release(),
            Conn::Pooled(_) => offered,
        };
        let mut attempt = Attempt::new(held, reservation, (self.key, self.scope), mode, checks);
        attempt.offered = offered;
        attempt.prior_release = prior_release;
        attempt.combined = combined;
        Ok(ControlFlow::Continue((attempt, acquire, unlock)))
    }

    /// Sends the attempt's statement until the acquisition ends: once for a blocking wait or a
    /// `try_lock`, again after each pause for a polling wait, until it is granted, its deadline
    /// passes or it fails.
    async fn wait_on(
        &self,
        mut attempt: Attempt,
        acquire: &Acquire,
        unlock: Option<PreparedUnlock>,
        mode: LockMode,
        deadline: Deadline,
    ) -> Result<Attempted> {
        let op = self.op(deadline);
        let polling = self.polling();
        let (mut pause, max_pause) = polling.unwrap_or_default();
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
                attempt.canceller = Some(self.source.canceller(client_conn(&attempt.held)));
            }
            let answer = attempt.run(acquire, lock_timeout, may_wait).await;
            if attempt.prior_release_failed {
                // Whatever the answer, the connection is marked to be closed, which ends
                // anything it holds; dropping the attempt lets it go.
                return Ok(Attempted::Retry);
            }
            match answer {
                Ok((granted, pid)) => {
                    if attempt.checks == Checks::InStatement && self.source.may_verify() {
                        let conn = client_conn(&attempt.held);
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
                                trace::polling(self.key, Some(pid), pause);
                            }
                        }
                        None => return Err(Error::ReadOnlyStandby),
                    }
                }
                Err(e)
                    if op == Op::LockWithTimeout
                        && e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) =>
                {
                    return Ok(self.timed_out(attempt, mode).await);
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

    /// Ends an attempt whose lock timeout fired, as busy. The grant and the timeout can cross:
    /// the server grants the lock, then reports the timeout that fired meanwhile, and a session
    /// lock survives that error. It is released if so before "busy" is reported, so that
    /// nothing is ever held once the acquisition returns.
    async fn timed_out(&self, mut attempt: Attempt, mode: LockMode) -> Attempted {
        if self.scope == LockScope::Session {
            let conn = client_conn(&attempt.held);
            // Boxed, as a rare path.
            if Box::pin(release(conn, &Release::UnlockIfHeld(mode), self.key))
                .await
                .is_err()
            {
                attempt.settle_unknown();
            }
        }
        attempt.end_transaction().await;
        Attempted::Done(None)
    }

    /// The statements an acquisition on `conn` needs, as `(acquiring statement, unlock)`, when
    /// all are prepared there already (the common case: no future to create and poll); session
    /// scope only. The acquiring statement is `None` when a riding unlock's combined statement
    /// is sent instead and nothing follows it (`single`); the unlock is `None` when the new
    /// guard takes over the riding unlock's own, which makes the same checks. Without a riding
    /// unlock, the combined statement a guard's drop may need later must be prepared too (if
    /// not, [`prepare`](Self::prepare) prepares it with the others).
    #[inline(always)]
    fn cached(
        &self,
        conn: &Conn,
        op: Op,
        (mode, checks): (LockMode, Checks),
        riding: Option<&RidingUnlock>,
        single: bool,
    ) -> Option<(Option<Statement>, Option<Statement>)> {
        if self.scope != LockScope::Session {
            return None;
        }
        let form = Form::of(self.key);
        let acquire = match (riding, single) {
            (Some(_), true) => None,
            _ => Some(conn.cached(statement(op, mode, self.scope, form, checks))?),
        };
        let unlock = match riding {
            Some(riding) if riding.deferred.checks() == checks => None,
            _ => Some(conn.cached(statement(Op::Unlock, mode, self.scope, form, checks))?),
        };
        if riding.is_none() {
            if let Some(combined) = unlock_then(op, mode, form, checks) {
                conn.cached(combined)?;
            }
        }
        Some((acquire, unlock))
    }

    /// Prepares the acquiring statement and, for session scope, the unlock (cached per
    /// connection: a round trip the first time only), so that a guard can always release
    /// without preparing.
    async fn prepare(
        &self,
        held: &HeldConn,
        op: Op,
        acquire_sql: &'static str,
        (form, mode, checks): (Form, LockMode, Checks),
        behind_pooler: bool,
    ) -> Result<(Acquire, Option<PreparedUnlock>)> {
        let key = self.key;
        let conn = held.conn();
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
