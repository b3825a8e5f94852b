//! One acquisition in progress ([`Attempt`]): the statement it sends, how its answer is read,
//! and how an abandoned one is undone (cancel requests, an undo queued behind it, or a closed
//! connection).

use std::future::{poll_fn, Future};
use std::sync::Weak;
use std::task::{ready, Poll};
use std::time::Duration;

use futures_util::future::Either;
use tokio::runtime::Handle;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{CancelToken, Row, Statement};

use crate::base::cancel::Canceller;
use crate::base::error::{Error, Result};
use crate::base::key::AdvisoryKey;
use crate::base::scope::{LockMode, LockScope};
use crate::base::sql::{Checks, KeyParams, PreparedUnlock};
use crate::base::{background, trace};
use crate::conn::handle::Conn;
use crate::conn::held::HeldConn;
use crate::conn::session::Reservation;
use crate::guard::AdvisoryLockGuard;
use crate::release::background::release_in_background;
use crate::release::in_flight::{ReleaseInFlight, ReleaseTask};
use crate::release::parking::PriorRelease;
use crate::release::statement::{release, unlock_outcome, Release};

/// How an acquisition on one connection ended, short of an error.
pub(crate) enum Attempted {
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
pub(crate) enum Acquire {
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
pub(crate) struct Attempt {
    /// The connection (taken when the attempt becomes a guard or hands it to a cleanup).
    pub(super) held: Option<HeldConn>,
    /// A release queued on the connection before this attempt's statement, whose answer
    /// nobody reads yet: the statement adopts it.
    pub(super) offered: Weak<ReleaseInFlight>,
    /// That release, adopted and not finished: polled with the statement, spawned if the
    /// attempt is dropped first.
    adopted: Option<ReleaseTask>,
    /// A statement was sent on the connection and its answer is not in yet.
    pub(super) awaiting_answer: bool,
    /// The statement in flight may sit in the server's lock queue: an abandoned attempt sends a
    /// cancel request.
    pub(super) may_wait: bool,
    /// `BEGIN` has been sent (transaction scope).
    in_transaction: bool,
    key: AdvisoryKey,
    scope: LockScope,
    pub(super) canceller: Option<Canceller>,
    /// Dropped after any undo is queued (fields drop after `Drop::drop`).
    reservation: Option<Reservation>,
    mode: LockMode,
    /// On a claimed parked connection, the outcome of the unlock queued before ours.
    pub(super) prior_release: Option<PriorRelease>,
    /// That unlock failed: the connection is marked to be closed.
    pub(super) prior_release_failed: bool,
    /// A dropped guard's unlock of the same key to send with the first statement, combined into
    /// one (`sql::unlock_then`): its statement and the pid it must run on.
    pub(super) combined: Option<(Statement, i32)>,
    /// The combined statement failed: the unlock in it may or may not have run, so the key may
    /// still be held for the dropped guard.
    combined_in_doubt: bool,
    /// What the statements check on the server, which decides the shape of their answers.
    pub(super) checks: Checks,
}

/// Whether a session lock may be held after the acquiring statement failed with `error`.
///
/// A deadlock ends the wait before any grant; a failed statement in a transaction aborts it, and
/// the transaction-scoped lock goes with it. A lock timeout is not such a proof: it can be
/// reported just after the grant, and session locks survive the error of the statement that
/// took them.
pub(crate) fn may_hold_after(error: &tokio_postgres::Error, scope: LockScope) -> bool {
    error.code() != Some(&SqlState::T_R_DEADLOCK_DETECTED) && scope == LockScope::Session
}

impl Attempt {
    /// An attempt on `held`'s connection, holding `reservation`, with nothing sent yet.
    pub(super) fn new(
        held: HeldConn,
        reservation: Reservation,
        (key, scope): (AdvisoryKey, LockScope),
        mode: LockMode,
        checks: Checks,
    ) -> Self {
        Attempt {
            held: Some(held),
            offered: Weak::new(),
            adopted: None,
            awaiting_answer: false,
            may_wait: false,
            in_transaction: false,
            key,
            scope,
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
    pub(super) fn unexpected_answer(&mut self) -> Error {
        self.settle_unknown();
        Error::UnexpectedAnswer { key: self.key }
    }

    /// Ends the attempt after its acquiring statement failed with `error`, other than by a lock
    /// timeout: returns the error, after handing the connection to a cleanup when a lock may be
    /// held; or [`Attempted::Deallocated`] when the statements were deallocated on a connection
    /// verified as direct, for the acquisition to start again.
    pub(super) fn failed(&mut self, error: tokio_postgres::Error) -> Result<Attempted> {
        if error.code() == Some(&SqlState::INVALID_SQL_STATEMENT_NAME) {
            // The server refused the statement before running it, so nothing was taken. Either
            // the backend changed under a transaction pooler (what the error reports) or the
            // statements were deallocated: in both cases what pglock remembers as prepared
            // there is wrong, and the next acquisition must not fail the same way.
            client_conn(&self.held).forget_statements();
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
    pub(super) async fn run(
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
            .held
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
        self.awaiting_answer = true;
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
            client_conn(&self.held).mark_discard();
        }
        self.awaiting_answer = false;
        self.may_wait = false;
        self.prior_release_failed = !prior_ok;
        result.map(|row| acquired.unwrap_or_else(|| self.checks.acquired(&row, may_wait)))
    }

    /// Reads the answer of a combined statement, a dropped guard's unlock of the key (granted
    /// by the backend with pid `granted_on`) then this attempt's acquisition: the acquisition's
    /// outcome if it ran, and whether the unlock's outcome leaves the connection usable (if not,
    /// it is marked to be closed).
    pub(super) fn read_combined(
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
                let ok = released.is_ok() || !client_conn(&self.held).is_pooled();
                (Some((granted, ran_on)), ok)
            }
            // Whether the unlock ran is unknown. A pooled connection is closed, which ends both
            // locks, and the acquisition starts again on another (as after a failed parked
            // unlock); on a shared session the caller undoes whatever may be held.
            Err(_) if client_conn(&self.held).is_pooled() => (None, false),
            Err(_) => {
                self.combined_in_doubt = true;
                (None, true)
            }
        };
        if !prior_ok {
            // The session may hold the key twice, or hold it for nobody: only closing the
            // connection ends both for sure.
            client_conn(&self.held).mark_discard();
        }
        (acquired, prior_ok)
    }

    pub(super) fn into_guard(
        mut self,
        mode: LockMode,
        backend_pid: i32,
        unlock: Option<PreparedUnlock>,
    ) -> AdvisoryLockGuard {
        let conn = self
            .held
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
    pub(super) async fn end_transaction(&mut self) {
        if !self.in_transaction {
            return;
        }
        // Boxed, as a rare path: see `Acquirer::timed_out`.
        if Box::pin(release(
            client_conn(&self.held),
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
    pub(super) fn settle_unknown(&mut self) {
        let held = self
            .held
            .take()
            .expect("a failed statement returned its connection");
        self.clean_up_in_background(held, None);
    }

    /// Undoes whatever the acquisition may have done on `held`'s connection, without knowing
    /// what that was (the answer of the statement may not be in yet).
    ///
    /// A pooled connection is closed: that ends its session, and with it any lock or
    /// transaction the statement took or began (tokio-postgres closes it once the answers
    /// already asked for are in, which the cancel request hastens). On a shared session, the
    /// undo is queued at once, right behind the acquiring statement, so nothing else can run
    /// there in between: a rollback in a transaction, otherwise an unlock of the key if, and
    /// only if, the session holds it. A session-scoped key stays reserved (new acquisitions of
    /// it wait) until that unlock has answered.
    fn clean_up_in_background(&mut self, held: HeldConn, cancel: Option<(CancelToken, Canceller)>) {
        let key = self.key;
        let mut reservation = self.reservation.take();
        // On a session, nothing new of pglock's starts until the cancel requests are over.
        let cancelling = match (held.conn(), &cancel) {
            (Conn::Session(session), Some(_)) => Some(session.cancels().start()),
            _ => None,
        };
        let mut free_when_queued = false;
        // `ended` answers once the abandoned statement has ended on the server: it is a request
        // queued right behind it. Cancel requests are repeated until then.
        let ended: Option<ReleaseTask> = match held.conn() {
            Conn::Pooled(_) if cancel.is_none() => {
                // Closed now: the connection ends once the answers already asked for are in.
                drop(held);
                None
            }
            Conn::Pooled(_) => {
                // Out of the pool at once, but kept open until the statement has ended, so that
                // the cancel requests can be repeated until one lands; closed then.
                match held.into_conn().detach() {
                    Ok(client) => Some(Box::pin(async move {
                        let _ = client.batch_execute("").await;
                    })),
                    Err(shared) => {
                        let held = HeldConn::new(shared);
                        Some(Box::pin(async move {
                            let _ = held.conn().client().batch_execute("").await;
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
                    let _ = release(held.conn(), &Release::Rollback, key).await;
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
                        match release(held.conn(), &undo, key).await {
                            Err(e) if e.code() == Some(&SqlState::QUERY_CANCELED) => {}
                            released => break released,
                        }
                    };
                    held.finish(released.is_ok());
                }))
            }
        };
        // Queued at once, right behind the statement, so nothing else runs there in between.
        let ended = ended.and_then(background::queue);
        if free_when_queued {
            // The rollback is queued: the session is free for the next transaction, whose
            // statements travel behind it (after any cancel request in flight, see
            // `PendingCancels`).
            reservation = None;
        }
        // Without a runtime, the undo already queued still runs on the server (only its answer
        // is not read), and a pooled held dropped here closes its connection.
        let Ok(runtime) = Handle::try_current() else {
            return;
        };
        if cancel.is_none() && ended.is_none() {
            return;
        }
        runtime.spawn(async move {
            let _reservation = reservation;
            let _cancelling = cancelling;
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
pub(crate) async fn begin_and_acquire(
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
pub(crate) fn client_conn(held: &Option<HeldConn>) -> &Conn {
    held.as_ref()
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
        let Some(held) = self.held.take() else {
            return;
        };
        if self.awaiting_answer || self.combined.is_some() {
            // Abandoned before the answer (or, for a combined statement, before sending the
            // dropped guard's unlock in it): undo whatever the statement may do.
            trace::abandoned(self.key, self.scope);
            let cancel = self
                .may_wait
                .then(|| held.conn().client().cancel_token())
                .zip(self.canceller.take());
            self.clean_up_in_background(held, cancel);
        } else if self.in_transaction {
            release_in_background(held.into_conn(), Release::Rollback, self.key);
        } else {
            held.finish(true);
        }
    }
}
