//! A dropped guard's session unlock, recorded rather than sent at once ([`DeferredUnlock`]), and
//! the queue of a shared session that keeps them ([`DeferredUnlocks`]).
//!
//! While the dropping task runs on, the unlock is only recorded, on the shared session or in the
//! parking, and a task is woken to send it: the task that drives the session's connection, when
//! pglock runs it ([`DeferredUnlocks::drive`]), or else the one flusher of the session or of the
//! parking (see [`FlushBell`](crate::release::flush::FlushBell)). If the next acquisition on the
//! connection comes first and asks for the same key in the same mode, it claims the unlock and
//! sends one statement that releases and then acquires (`sql::unlock_then`): one message each
//! way per cycle instead of two. Otherwise the task sends the unlock as soon as the runtime runs
//! it, which is when the dropping task next yields. On a shared session, the unlocks of every
//! guard dropped meanwhile go out with it, together
//! ([`unlock_together`](crate::release::together::unlock_together)).

use std::future::{poll_fn, Future};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::base::key::AdvisoryKey;
use crate::base::scope::LockMode;
use crate::base::sql::{Checks, Form, PreparedUnlock, MAX_BATCH};
use crate::conn::handle::Conn;
use crate::conn::session::Reservation;
use crate::release::background::release_in_background_traced;
use crate::release::flush::{Bell, FlushBell, Flushed};
use crate::release::parking::Parking;
use crate::release::statement::Release;
use crate::release::together::unlock_together;

/// A dropped guard's session unlock, recorded but not sent yet (see the module's
/// documentation). It holds everything the release needs: the connection (a share of it), the
/// prepared unlock and the pid it must run on, the key's reservation on a shared session (so
/// that the key cannot be taken again there before it is released) and the parking of a pooled
/// connection.
///
/// Whoever takes it either sends it alone ([`send_alone`](Self::send_alone)) or sends it in
/// the combined statement and reports its outcome ([`into_combined`](Self::into_combined)).
/// Dropped otherwise (an acquisition abandoned just after claiming it), it sends itself alone.
///
/// While it waits, the key is marked as being cleaned up on a shared session: an acquisition of
/// the key that does not claim it (because a task on another thread is sending it) waits for the
/// mark to go instead of failing with [`Error::AlreadyHeld`](crate::Error::AlreadyHeld).
pub(crate) struct DeferredUnlock {
    conn: Option<Conn>,
    pub(crate) key: AdvisoryKey,
    pub(crate) mode: LockMode,
    pub(crate) granted_on: i32,
    /// `None` once sent or combined.
    statement: Option<PreparedUnlock>,
    reservation: Option<Reservation>,
    parking: Option<Arc<Parking>>,
}

impl DeferredUnlock {
    pub(crate) fn new(
        conn: Conn,
        key: AdvisoryKey,
        mode: LockMode,
        granted_on: i32,
        statement: PreparedUnlock,
        reservation: Option<Reservation>,
        parking: Option<Arc<Parking>>,
    ) -> Self {
        if let Some(reservation) = &reservation {
            reservation.mark_cleaning();
        }
        DeferredUnlock {
            conn: Some(conn),
            key,
            mode,
            granted_on,
            statement: Some(statement),
            reservation,
            parking,
        }
    }

    /// Records the unlock on its session (or in its parking), to be sent once the dropping task
    /// yields unless an acquisition claims it first. Sent at once when there is nowhere to
    /// record it.
    #[inline]
    pub(crate) fn defer(self) {
        if let Some(parking) = self.parking.clone() {
            parking.defer(self);
            return;
        }
        match self.conn() {
            Conn::Session(session) => {
                let unlocks = session.deferred_unlocks.clone();
                unlocks.push(self);
                unlocks.bell.ring(&unlocks);
            }
            Conn::Pooled(_) => self.send_alone(),
        }
    }

    /// Sends the unlock alone, confirmed in the background, as a dropped guard's release that
    /// nobody claimed (the pooled connection is parked again for the next acquisition).
    pub(crate) fn send_alone(mut self) {
        self.send_now();
    }

    /// Gives up what a statement that releases several keys at once needs (see
    /// [`send_together`]): the connection, and the pid to release on. The reservation is
    /// returned too, to be dropped once that statement is queued.
    fn into_batched(mut self) -> (Conn, i32, Option<Reservation>) {
        self.statement = None;
        let conn = self.conn.take().expect("a deferred unlock is sent once");
        (conn, self.granted_on, self.reservation.take())
    }

    fn send_now(&mut self) {
        let (Some(conn), Some(statement)) = (self.conn.take(), self.statement.take()) else {
            return;
        };
        release_in_background_traced(
            conn,
            Release::Unlock(statement, self.granted_on, self.mode),
            self.key,
            Some(self.granted_on),
            self.parking.take(),
        );
        // Only now that the unlock is queued may the key be taken again on a shared session.
        self.reservation = None;
    }

    /// The checks the unlock makes on the server.
    pub(crate) fn checks(&self) -> Checks {
        self.statement
            .as_ref()
            .map_or(Checks::InStatement, |unlock| unlock.checks)
    }

    /// The connection the unlock is for.
    pub(crate) fn conn(&self) -> &Conn {
        self.conn
            .as_ref()
            .expect("a deferred unlock holds its connection until sent")
    }

    /// Gives up the parts an acquisition that sends the unlock in its own statement takes
    /// over: the key's reservation (it holds the same key, so the mark of a key being cleaned
    /// up goes), the pid to release on, and the unlock statement (which the acquisition's guard
    /// may use in turn: the same key, mode and connection).
    #[inline]
    pub(crate) fn into_combined(mut self) -> (Option<Reservation>, i32, Option<PreparedUnlock>) {
        let statement = self.statement.take();
        let reservation = self.reservation.take();
        if let Some(reservation) = &reservation {
            reservation.mark_held();
        }
        (reservation, self.granted_on, statement)
    }
}

impl Drop for DeferredUnlock {
    fn drop(&mut self) {
        self.send_now();
    }
}

/// A shared session's deferred unlocks: usually one (a `lock` + drop loop), more when several
/// guards of the session are dropped before the dropping task yields.
///
/// The task that drives the session's connection sends them, when pglock runs that task
/// ([`drive`](Self::drive)); otherwise a flusher of their own does (see [`FlushBell`]).
#[derive(Default)]
pub(crate) struct DeferredUnlocks {
    unlocks: Mutex<QueuedUnlocks>,
    /// Whether `unlocks` holds any, kept under its lock: read first, so that an acquisition
    /// with nothing deferred before it (a `lock` + `unlock` loop) takes no lock.
    occupied: AtomicBool,
    bell: FlushBell,
}

/// The first deferred unlock apart, so that the common case allocates nothing.
#[derive(Default)]
struct QueuedUnlocks {
    first: Option<DeferredUnlock>,
    more: Vec<DeferredUnlock>,
}

/// Ends [`DeferredUnlocks::drive`]'s listening, however the task ends (the connection closed, the
/// session dropped, the runtime shut down): a later drop then starts a flusher, and what was
/// deferred before is sent now (on a closed connection it fails, which frees its key).
struct StopListening<'a> {
    unlocks: &'a DeferredUnlocks,
    bell: &'a Arc<Bell>,
}

impl Drop for StopListening<'_> {
    fn drop(&mut self) {
        self.unlocks.bell.stop_listening(self.bell);
        self.unlocks.flush();
    }
}

impl DeferredUnlocks {
    #[inline]
    fn push(&self, deferred: DeferredUnlock) {
        let mut unlocks = self.unlocks.lock().unwrap();
        match unlocks.first {
            None => unlocks.first = Some(deferred),
            Some(_) => unlocks.more.push(deferred),
        }
        self.occupied.store(true, Ordering::Release);
    }

    /// Whether a deferred unlock may be waiting. A `false` may be stale only against a push on
    /// another thread that has not returned yet, which the caller could not have waited for.
    fn occupied(&self) -> bool {
        self.occupied.load(Ordering::Acquire)
    }

    /// Drives `connection`, a session's connection future, and sends these deferred
    /// unlocks whenever a dropped guard rings, from the same task.
    ///
    /// A flusher task of its own would be woken by every drop, and on a current-thread runtime
    /// polled before the connection task that writes the next acquisition's statement: Tokio's
    /// bookkeeping for a task that usually finds nothing to send (the acquisition claimed the
    /// unlock), on the critical path of each `lock` + drop cycle. The connection task is woken
    /// by that statement anyway, so the two wake-ups make one poll, and the unlock, when it has
    /// to go alone, is written in that very poll.
    ///
    /// `ended` gets the connection's output (one state machine fewer than awaiting this in
    /// another, on every poll of the connection).
    pub(crate) async fn drive<F: Future>(
        self: Arc<Self>,
        connection: F,
        ended: impl FnOnce(F::Output),
    ) {
        let bell = self.bell.listen();
        let _stop = StopListening {
            unlocks: &self,
            bell: &bell,
        };
        let mut connection = std::pin::pin!(connection);
        let output_of_connection = poll_fn(|cx| {
            if bell.poll_ring(cx) {
                self.flush();
            }
            connection.as_mut().poll(cx)
        })
        .await;
        ended(output_of_connection)
    }

    /// Ends the flusher: called as the session goes.
    pub(crate) fn stop_flusher(&self) {
        self.bell.stop();
    }

    /// For an acquisition of `key` in `mode` on the session: takes the deferred unlock of that
    /// key in that mode, if any, and sends every other one now, so that they travel ahead of
    /// the acquisition's statement (which may wait in the server's queue).
    pub(crate) fn take_for(&self, key: AdvisoryKey, mode: LockMode) -> Option<DeferredUnlock> {
        if !self.occupied() {
            return None;
        }
        let mut unlocks = self.unlocks.lock().unwrap();
        let first = unlocks.first.take()?;
        // Emptied below, under the lock.
        self.occupied.store(false, Ordering::Release);
        if unlocks.more.is_empty() {
            drop(unlocks);
            if first.key == key && first.mode == mode {
                return Some(first);
            }
            first.send_alone();
            return None;
        }
        let mut others = std::mem::take(&mut unlocks.more);
        drop(unlocks);
        others.push(first);
        let found = others
            .iter()
            .position(|d| d.key == key && d.mode == mode)
            .map(|i| others.swap_remove(i));
        send_together(others);
        found
    }

    /// Every deferred unlock, to send them together.
    fn take_all(&self) -> Vec<DeferredUnlock> {
        // Usually the acquisition that claimed the unlock took everything, and the flusher
        // finds nothing.
        if !self.occupied() {
            return Vec::new();
        }
        let mut unlocks = self.unlocks.lock().unwrap();
        // `more` fills only behind `first`.
        let Some(first) = unlocks.first.take() else {
            return Vec::new();
        };
        self.occupied.store(false, Ordering::Release);
        let mut all = std::mem::take(&mut unlocks.more);
        all.push(first);
        all
    }
}

impl Flushed for DeferredUnlocks {
    fn bell(&self) -> &FlushBell {
        &self.bell
    }

    fn flush(&self) {
        let unlocks = self.take_all();
        // Usually empty (the acquisition claimed the unlock): not worth a call.
        if !unlocks.is_empty() {
            send_together(unlocks);
        }
    }
}

/// Sends unlocks that dropped guards of one session left: together where they can share a
/// statement (the same mode and key form, see `release::together::unlock_together`), alone otherwise.
pub(crate) fn send_together(unlocks: Vec<DeferredUnlock>) {
    if unlocks.len() < 2 {
        unlocks.into_iter().for_each(DeferredUnlock::send_alone);
        return;
    }
    let mut groups: [Vec<DeferredUnlock>; 4] = Default::default();
    for deferred in unlocks {
        let index = 2 * usize::from(deferred.mode == LockMode::Shared)
            + usize::from(Form::of(deferred.key) == Form::Pair);
        groups[index].push(deferred);
    }
    for mut group in groups {
        while group.len() > 1 {
            let rest = group.split_off(group.len().min(MAX_BATCH));
            let (mode, form) = (group[0].mode, Form::of(group[0].key));
            let mut conn = None;
            let unlocks = group
                .into_iter()
                .map(|deferred| {
                    let key = deferred.key;
                    let (shared, granted_on, reservation) = deferred.into_batched();
                    conn.get_or_insert(shared);
                    (key, granted_on, reservation)
                })
                .collect();
            let conn = conn.expect("a group has unlocks");
            unlock_together(conn, mode, form, unlocks);
            group = rest;
        }
        group.into_iter().for_each(DeferredUnlock::send_alone);
    }
}
