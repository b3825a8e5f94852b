//! Requests for many keys on one shared [`Session`], sent as one statement: the concurrent
//! `try_lock`s of a [`LockSet`](crate::LockSet) ([`try_lock`]), and the unlocks of guards
//! dropped together (`release::together::unlock_together`).
//!
//! While a batch is on the wire, the requests that arrive for the same session wait in its
//! queue; when the answer is in, everything queued goes out as the next statement. A lone
//! request therefore goes out at once, as a batch of one, and under load a batch is as large as
//! the number of requests that arrived during one round trip.
//!
//! One statement instead of one per key matters twice. The client sends and reads one message
//! per batch. And the server ends one transaction per batch instead of one per key, which is
//! where a backend holding many locks spends its time: at every transaction end PostgreSQL walks
//! the backend's whole table of held locks to release the transaction-scoped advisory locks, so
//! one statement per key costs time in proportion to the locks the session already holds.
//!
//! A batch changes nothing a caller can observe: each request still gets its own guard, busy
//! answer or error. When the statement fails (a full lock table, say), whether some of its keys
//! were taken is unknown, since a session lock survives the error of the statement that took
//! it: each of its keys is released if the session holds it, and every request of the batch is
//! then retried alone, so that each gets the error (or the lock) a single `try_lock` would.

use std::sync::{Arc, Mutex};

use futures_util::future::join_all;
use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio_postgres::types::ToSql;

use crate::base::background;
use crate::base::error::{Error, Result};
use crate::base::key::AdvisoryKey;
use crate::base::scope::{LockMode, LockScope};
use crate::conn::handle::Conn;
use crate::conn::session::{Reservation, Session};
use crate::guard::AdvisoryLockGuard;
use crate::release::statement::{release, Release};

use crate::base::sql::{
    self, by_index, statement, Checks, Form, KeyArrays, Op, PreparedUnlock, MAX_BATCH,
};

/// The `try_lock` requests waiting for a session's next batch.
#[derive(Default)]
pub(crate) struct TryLockQueue {
    state: Mutex<QueueState>,
}

#[derive(Default)]
struct QueueState {
    waiting: Vec<Request>,
    /// A task is sending batches: requests only need to join the queue.
    sending: bool,
}

/// One caller's request: its key, reserved on the session, and where its answer goes.
struct Request {
    key: AdvisoryKey,
    reservation: SharedReservation,
    reply: oneshot::Sender<Answer>,
}

/// A request's reservation of its key, shared by the batch (which takes it, to hand it to a
/// guard or drop it) and the caller (which, if it gives up first, marks the key as being cleaned
/// up, as an abandoned single acquisition does: new acquisitions of the key then wait for the
/// batch to settle it instead of failing with `AlreadyHeld`).
#[derive(Clone)]
struct SharedReservation(Arc<Mutex<Option<Reservation>>>);

impl SharedReservation {
    /// The reservation, taken by the batch (once).
    fn take(&self) -> Reservation {
        self.0
            .lock()
            .unwrap()
            .take()
            .expect("a batch takes a request's reservation once")
    }

    fn mark_cleaning(&self) {
        if let Some(reservation) = self.0.lock().unwrap().as_ref() {
            reservation.mark_cleaning();
        }
    }
}

/// A caller waiting for its answer: if it gives up, the key is marked as being cleaned up.
struct Waiting {
    reservation: SharedReservation,
    answered: bool,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if !self.answered {
            self.reservation.mark_cleaning();
        }
    }
}

/// What a batch answers one request.
pub(crate) enum Answer {
    Granted(AdvisoryLockGuard),
    /// Held elsewhere; the pid of the session's backend that asked (`None`: held by another
    /// guard of the same session, found without asking the server).
    Busy(Option<i32>),
    /// The server is a standby: nothing was taken.
    Standby,
    /// The batch failed and was undone: ask again alone.
    Retry,
    /// The batch failed and so did its undo, for this reason.
    Failed(Error),
}

/// Asks for `key` exclusively on `session` in the session's next batch, after waiting
/// in-process as `wait` says (see `Conn::reserve`) while another guard of the session holds it.
///
/// `Ok(Answer::Retry)` when the batch could not answer for this key (its statement failed, or
/// the runtime is shutting down): nothing is held for it then, and the caller asks alone.
///
/// # Cancel safety
///
/// Dropping the future marks the key as being cleaned up (new acquisitions of it wait). Before
/// the batch is sent, the request leaves it; after, the batch finds nobody to hand the guard to
/// and drops it, which releases the lock as any drop does.
pub(crate) async fn try_lock(
    session: &Arc<Session>,
    key: AdvisoryKey,
    wait: Option<Option<tokio::time::Instant>>,
) -> Result<Answer> {
    let Ok(runtime) = Handle::try_current() else {
        return Ok(Answer::Retry);
    };
    // Held by another guard of the session: busy, as when another session holds it; a
    // waiting caller (`LockSet::lock`) waits in-process until `wait` instead.
    let reservation = match Conn::Session(session.clone())
        .reserve(key, LockScope::Session, wait)
        .await?
    {
        Some(reservation) => reservation,
        None => return Ok(Answer::Busy(None)),
    };
    let (reply, answer) = oneshot::channel();
    let reservation = SharedReservation(Arc::new(Mutex::new(Some(reservation))));
    let mut waiting = Waiting {
        reservation: reservation.clone(),
        answered: false,
    };
    let start = {
        let mut state = session.try_locks.state.lock().unwrap();
        state.waiting.push(Request {
            key,
            reservation,
            reply,
        });
        !std::mem::replace(&mut state.sending, true)
    };
    if start {
        runtime.spawn(send_batches(session.clone()));
    }
    let answer = answer.await;
    waiting.answered = true;
    // A sender dropped unanswered: the task is gone (runtime shutting down), and the request
    // with it, reservation included.
    Ok(answer.unwrap_or(Answer::Retry))
}

/// Sends the session's queued requests, one batch at a time, until the queue is empty.
async fn send_batches(session: Arc<Session>) {
    // Whatever ends this task (the queue ran dry, a panic, the runtime dropping it), the next
    // request must start a new one, and requests left in the queue must hear back.
    struct Sending {
        session: Arc<Session>,
        /// Returned with the queue empty: a new task may be sending already.
        finished: bool,
    }
    impl Drop for Sending {
        fn drop(&mut self) {
            if self.finished {
                return;
            }
            let left = {
                // Not `unwrap`: a panic while unwinding from another would abort.
                let mut state = match self.session.try_locks.state.lock() {
                    Ok(state) => state,
                    Err(poisoned) => poisoned.into_inner(),
                };
                state.sending = false;
                std::mem::take(&mut state.waiting)
            };
            // Dropped unanswered: each caller hears `Retry`.
            drop(left);
        }
    }
    let mut sending = Sending {
        session,
        finished: false,
    };
    loop {
        let session = &sending.session;
        let batch: Vec<Request> = {
            let mut state = session.try_locks.state.lock().unwrap();
            // A caller that gave up before its request went out needs nothing from the server.
            state.waiting.retain(|request| !request.reply.is_closed());
            if state.waiting.is_empty() {
                state.sending = false;
                drop(state);
                sending.finished = true;
                return;
            }
            let n = state.waiting.len().min(MAX_BATCH);
            state.waiting.drain(..n).collect()
        };
        let (singles, pairs): (Vec<Request>, Vec<Request>) = batch
            .into_iter()
            .partition(|request| Form::of(request.key) == Form::Single);
        for requests in [singles, pairs] {
            if !requests.is_empty() {
                send_batch(session, requests).await;
            }
        }
    }
}

/// Sends one batch of requests for keys of one form, and answers each.
async fn send_batch(session: &Arc<Session>, requests: Vec<Request>) {
    let conn = Conn::Session(session.clone());
    let form = Form::of(requests[0].key);
    let checks = conn.verification().checks();
    let statements = async {
        let batch = conn.prepare(sql::try_lock_batch(form, checks)).await?;
        let unlock = conn
            .prepare(statement(
                Op::Unlock,
                LockMode::Exclusive,
                LockScope::Session,
                form,
                checks,
            ))
            .await?;
        let unlock = PreparedUnlock {
            statement: unlock,
            checks,
        };
        Ok::<_, tokio_postgres::Error>((batch, unlock))
    };
    let Ok((batch, unlock)) = statements.await else {
        // Nothing was asked for: every request asks again alone, and meets the error there.
        return answer_all(requests, || Answer::Retry);
    };
    let keys: Vec<AdvisoryKey> = requests.iter().map(|r| r.key).collect();
    let arrays = KeyArrays::new(form, &keys);
    let params: Vec<&(dyn ToSql + Sync)> = arrays
        .typed(None)
        .into_iter()
        .map(|(param, _)| param)
        .collect();
    let mut on_the_wire = OnTheWire {
        conn: &conn,
        keys: &keys,
        answered: false,
    };
    let result = conn.client().query(&batch, &params).await;
    on_the_wire.answered = true;
    match result {
        Ok(rows) => {
            let answers = by_index(&rows, requests.len(), checks);
            if checks == Checks::InStatement && session.may_verify() {
                // Any key's answer tells: they all ran on one backend, in one statement.
                if let Some((granted, ran_on)) = answers.iter().flatten().next() {
                    conn.learn_backend(*ran_on, granted.is_none());
                }
            }
            answer(&conn, requests, answers, &unlock).await
        }
        Err(_) => {
            let undone = undo(&conn, &requests).await;
            for (
                Request {
                    reservation, reply, ..
                },
                undone,
            ) in requests.into_iter().zip(undone)
            {
                drop(reservation.take());
                let _ = reply.send(match undone {
                    Ok(()) => Answer::Retry,
                    // Asking again alone could stack a lock the undo left behind: report why
                    // the undo failed instead (most often, the connection is gone).
                    Err(error) => Answer::Failed(error),
                });
            }
        }
    }
}

/// Hands each request its answer from the batch's rows, read by key ([`by_index`]).
async fn answer(
    conn: &Conn,
    requests: Vec<Request>,
    answers: Vec<Option<(Option<bool>, i32)>>,
    unlock: &PreparedUnlock,
) {
    let mut unanswered = Vec::new();
    for (request, answer) in requests.into_iter().zip(answers) {
        let answer = match answer {
            Some((Some(true), backend_pid)) => Answer::Granted(AdvisoryLockGuard::new(
                conn.share(),
                request.reservation.take(),
                LockMode::Exclusive,
                backend_pid,
                Some(unlock.clone()),
            )),
            Some((Some(false), backend_pid)) => {
                drop(request.reservation.take());
                Answer::Busy(Some(backend_pid))
            }
            Some((None, _)) => {
                drop(request.reservation.take());
                Answer::Standby
            }
            // The server answered no row for this key (it always does): treat it as unknown.
            None => {
                unanswered.push(request);
                continue;
            }
        };
        // A caller gone meanwhile: the answer, guard included, is dropped here, which releases.
        let _ = request.reply.send(answer);
    }
    if !unanswered.is_empty() {
        let undone = undo(conn, &unanswered).await;
        for (request, undone) in unanswered.into_iter().zip(undone) {
            drop(request.reservation.take());
            let _ = request
                .reply
                .send(undone.map_or_else(Answer::Failed, |()| Answer::Retry));
        }
    }
}

/// Answers every request alike, once its key's reservation is gone (so that a retry alone can
/// reserve it again).
fn answer_all(requests: Vec<Request>, answer: impl Fn() -> Answer) {
    for request in requests {
        drop(request.reservation.take());
        let _ = request.reply.send(answer());
    }
}

/// Releases each request's key if the session holds it: after a batch whose outcome is unknown.
/// The keys stay reserved meanwhile, marked as being cleaned up, so that other acquisitions of
/// them wait for the undo.
async fn undo(conn: &Conn, requests: &[Request]) -> Vec<Result<()>> {
    let undos = requests.iter().map(|request| {
        request.reservation.mark_cleaning();
        release(
            conn,
            &Release::UnlockIfHeld(LockMode::Exclusive),
            request.key,
        )
    });
    join_all(undos).await
}

/// A batch on the wire. Dropped before its answer (the runtime shutting down), it queues the
/// undo of each key at once, right behind the batch, so that nothing stays held for nobody.
struct OnTheWire<'a> {
    conn: &'a Conn,
    keys: &'a [AdvisoryKey],
    answered: bool,
}

impl Drop for OnTheWire<'_> {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        for key in self.keys {
            let undo = Release::UnlockIfHeld(LockMode::Exclusive);
            let mut release = std::pin::pin!(release(self.conn, &undo, *key));
            background::queue_and_forget(release.as_mut());
        }
    }
}

impl Answer {
    /// The answer as `try_lock` returns it; `None` for [`Answer::Retry`].
    pub(crate) fn into_result(self) -> Option<Result<Option<AdvisoryLockGuard>>> {
        match self {
            Answer::Granted(guard) => Some(Ok(Some(guard))),
            Answer::Busy(_) => Some(Ok(None)),
            Answer::Standby => Some(Err(Error::ReadOnlyStandby)),
            Answer::Failed(error) => Some(Err(error)),
            Answer::Retry => None,
        }
    }
}
