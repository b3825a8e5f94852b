//! What a dropped guard leaves to the next acquisition on its connection: its unlock, not sent
//! yet or on the wire, and on a pool the connection itself.
//!
//! A guard dropped on a pooled connection queues its `pg_advisory_unlock` and confirms it in the
//! background; the connection goes back to the pool only once the unlock has answered, so that a
//! failed unlock can close it instead. A loop of `lock` + drop would then take its next lock on
//! another pooled connection, whose backend must be woken by the unlock of the first: two
//! sockets and a cross-process wakeup per cycle. Instead, the lock keeps the connection aside
//! (parks it) for the length of that round trip, and the next acquisition of the same
//! [`AdvisoryLock`](crate::AdvisoryLock) (or one of its clones) sends its lock on it, right
//! behind the unlock: one round trip per cycle, as the wire allows.
//!
//! The acquisition that claims a parked connection trusts its own answer only once the unlock
//! before it has been confirmed. If that unlock failed, the connection is closed (which frees
//! whatever the session held, the new grant included) and the acquisition starts again on a
//! fresh connection from the pool.
//!
//! The same goes for reading the release's answer: a [`ReleaseInFlight`] is offered to the next
//! acquisition on the same connection (through the parking, or through the shared
//! [`Session`](crate::Session)), which reads it alongside its own statement, as a hand-written
//! pipeline would. Only a release nobody adopts before its answer arrives gets a task of its own.
//!
//! A dropped guard's session unlock need not even travel alone. While the dropping task runs
//! on, it is only recorded ([`DeferredUnlock`]), on the shared session or in the parking, and
//! a task is woken to send it: the task that drives the session's connection, when pglock
//! runs it ([`DeferredSlot::drive`]), or else the one flusher of the session or of the parking
//! (see [`FlushBell`]). If the next acquisition on the connection comes first and
//! asks for the same key in the same mode (the loop above), it claims the unlock and sends one
//! statement that releases and then acquires (`sql::unlock_then`): one message each way per
//! cycle instead of two. Otherwise the task sends the unlock as soon as the runtime runs it,
//! which is when the dropping task next yields. On a shared session, the unlocks of every
//! guard dropped meanwhile go out with it, together (`batch::unlock_together`).

use std::future::{poll_fn, Future};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;
use tokio::runtime::Handle;
use tokio::sync::oneshot;

use crate::batch;
use crate::conn::handle::Conn;
use crate::conn::session::Reservation;
use crate::guard::{release_in_background_traced, Release};
use crate::key::AdvisoryKey;
use crate::scope::LockMode;
use crate::sql::{Checks, Form, PreparedUnlock};

/// Where an [`AdvisoryLock`](crate::AdvisoryLock) parks the connection of its last dropped
/// guard. Shared by the lock's clones.
#[derive(Default)]
pub(crate) struct Parking {
    parked: Mutex<Option<Claimed>>,
    /// Wakes the task that sends a deferred unlock, or returns an idle connection to the pool,
    /// that no acquisition claimed.
    bell: FlushBell,
}

/// What a claimer finds in the parking.
pub(crate) enum Claimed {
    /// A connection whose unlock is on the wire.
    InFlight(Parked),
    /// A connection whose unlock is not sent yet.
    Deferred(DeferredUnlock),
    /// A connection whose unlock was confirmed (`unlock`), parked until the releasing task
    /// yields.
    Idle(Conn),
}

/// A connection whose release is in flight, and how that release will end.
pub(crate) struct Parked {
    pub(crate) conn: Conn,
    /// `true` once the release is confirmed; `false` (or a closed channel) if it failed, and
    /// the connection is then marked to be closed.
    pub(crate) released: PriorRelease,
    /// The release itself, for the claimer to read its answer.
    pub(crate) in_flight: Weak<ReleaseInFlight>,
}

/// The outcome of the release that was in flight on a claimed connection.
pub(crate) type PriorRelease = oneshot::Receiver<bool>;

/// The releasing side of a parked connection: reports the outcome to a claimer, if any.
pub(crate) type ReleaseReport = oneshot::Sender<bool>;

impl Parking {
    /// A channel for the outcome of a release: the task that confirms the release keeps the
    /// sender, [`park`](Self::park) takes the receiver.
    pub(crate) fn report_channel() -> (ReleaseReport, PriorRelease) {
        oneshot::channel()
    }

    /// Parks `conn`, whose release is already queued on it (so that whatever a claimer sends
    /// travels behind the release), until its release task takes it back. A connection parked
    /// before is left to its own release task.
    pub(crate) fn park(
        &self,
        conn: Conn,
        released: PriorRelease,
        in_flight: Weak<ReleaseInFlight>,
    ) {
        let before = self
            .parked
            .lock()
            .unwrap()
            .replace(Claimed::InFlight(Parked {
                conn,
                released,
                in_flight,
            }));
        send_if_deferred(before);
    }

    /// Parks `conn`, whose lock was released and confirmed, for the next acquisition of the
    /// lock: a `lock` + `unlock` loop then stays on one connection (one backend) instead of
    /// checking out another each time. The connection goes back to the pool as soon as the
    /// releasing task yields, unless an acquisition took it first.
    pub(crate) fn park_idle(self: &Arc<Self>, conn: Conn) {
        let displaced = self.parked.lock().unwrap().replace(Claimed::Idle(conn));
        send_if_deferred(displaced);
        self.bell.ring(self);
    }

    /// Takes the parked connection, if one is parked and still open.
    pub(crate) fn claim(&self) -> Option<Claimed> {
        let claimed = self.parked.lock().unwrap().take()?;
        match claimed {
            Claimed::InFlight(parked) => {
                (!parked.conn.client().is_closed()).then_some(Claimed::InFlight(parked))
            }
            Claimed::Deferred(deferred) if deferred.conn().client().is_closed() => {
                // Sent all the same: it fails, which closes the connection for good.
                deferred.send_alone();
                None
            }
            Claimed::Idle(conn) if conn.client().is_closed() => None,
            other => Some(other),
        }
    }

    /// Lets the parked connection go back to the pool as soon as it is released: an idle one
    /// at once, one with its unlock in flight when its release task confirms it, one with its
    /// unlock deferred once that is sent (now).
    pub(crate) fn let_go(&self) {
        let parked = self.parked.lock().unwrap().take();
        if let Some(Claimed::Deferred(deferred)) = parked {
            deferred.send_alone();
            // Sending parked it again, with the unlock in flight.
            self.parked.lock().unwrap().take();
        }
    }

    /// Called by the release task of `conn` once the release has answered: takes the
    /// connection out of the parking if nobody claimed it, so that it can go back to the pool.
    pub(crate) fn unpark(&self, conn: &Conn) {
        let mut parked = self.parked.lock().unwrap();
        if matches!(&*parked, Some(Claimed::InFlight(p)) if p.conn.same_as(conn)) {
            *parked = None;
        }
    }
}

/// A deferred unlock displaced from its place by a newer one is sent at once.
fn send_if_deferred(displaced: Option<Claimed>) {
    if let Some(Claimed::Deferred(deferred)) = displaced {
        deferred.send_alone();
    }
}

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
    pub(crate) fn defer(self) {
        if let Some(parking) = self.parking.clone() {
            let displaced = parking
                .parked
                .lock()
                .unwrap()
                .replace(Claimed::Deferred(self));
            send_if_deferred(displaced);
            parking.bell.ring(&parking);
            return;
        }
        match self.conn() {
            Conn::Session(session) => {
                let slot = session.deferred_unlock.clone();
                slot.push(self);
                slot.bell.ring(&slot);
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
pub(crate) struct DeferredSlot {
    unlocks: Mutex<DeferredUnlocks>,
    /// Whether `unlocks` holds any, kept under its lock: read first, so that an acquisition
    /// with nothing deferred before it (a `lock` + `unlock` loop) takes no lock.
    occupied: AtomicBool,
    bell: FlushBell,
}

/// The first deferred unlock apart, so that the common case allocates nothing.
#[derive(Default)]
struct DeferredUnlocks {
    first: Option<DeferredUnlock>,
    more: Vec<DeferredUnlock>,
}

/// Ends [`DeferredSlot::drive`]'s listening, however the task ends (the connection closed, the
/// session dropped, the runtime shut down): a later drop then starts a flusher, and what was
/// deferred before is sent now (on a closed connection it fails, which frees its key).
struct StopListening<'a> {
    slot: &'a DeferredSlot,
    bell: &'a Arc<Bell>,
}

impl Drop for StopListening<'_> {
    fn drop(&mut self) {
        self.slot.bell.stop_listening(self.bell);
        self.slot.flush();
    }
}

impl DeferredSlot {
    fn push(&self, deferred: DeferredUnlock) {
        let mut slot = self.unlocks.lock().unwrap();
        match slot.first {
            None => slot.first = Some(deferred),
            Some(_) => slot.more.push(deferred),
        }
        self.occupied.store(true, Ordering::Release);
    }

    /// Whether a deferred unlock may be waiting. A `false` may be stale only against a push on
    /// another thread that has not returned yet, which the caller could not have waited for.
    fn occupied(&self) -> bool {
        self.occupied.load(Ordering::Acquire)
    }

    /// Drives `connection`, a session's connection future, and sends this slot's deferred
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
            slot: &self,
            bell: &bell,
        };
        let mut connection = std::pin::pin!(connection);
        let output_of_connection = poll_fn(|cx| {
            if bell.rang(cx) {
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
        let mut slot = self.unlocks.lock().unwrap();
        let first = slot.first.take()?;
        // Emptied below, under the lock.
        self.occupied.store(false, Ordering::Release);
        if slot.more.is_empty() {
            drop(slot);
            if first.key == key && first.mode == mode {
                return Some(first);
            }
            first.send_alone();
            return None;
        }
        let mut others = std::mem::take(&mut slot.more);
        drop(slot);
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
        let mut slot = self.unlocks.lock().unwrap();
        // `more` fills only behind `first`.
        let Some(first) = slot.first.take() else {
            return Vec::new();
        };
        self.occupied.store(false, Ordering::Release);
        let mut all = std::mem::take(&mut slot.more);
        all.push(first);
        all
    }
}

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
struct Bell {
    rung: AtomicBool,
    flusher: AtomicWaker,
}

impl Bell {
    fn ring(&self) {
        self.rung.store(true, Ordering::Release);
        self.flusher.wake();
    }

    /// Whether the bell rang since the last check, once the next ring is sure to wake the task
    /// of `cx`: registered on every check, since a ring's wake-up takes the waker, and before
    /// the flag is read, so that a ring in between is seen here or wakes the task again.
    #[inline]
    fn rang(&self, cx: &Context<'_>) -> bool {
        self.flusher.register(cx.waker());
        // Read before it is swapped: most checks (the connection task's polls) find nothing.
        self.rung.load(Ordering::Relaxed) && self.rung.swap(false, Ordering::Acquire)
    }

    /// Waits for the next ring (or returns at once if one came since the last wait).
    async fn rung(&self) {
        poll_fn(|cx| {
            if self.rang(cx) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }
}

/// What a flusher serves.
trait Flushed: Send + Sync + 'static {
    fn bell(&self) -> &FlushBell;
    /// Sends (or returns to the pool) whatever is pending.
    fn flush(&self);
}

impl FlushBell {
    /// Wakes the flusher of `owner`, or starts one on the current runtime when none runs (not
    /// started yet, or dropped with its runtime). Outside a runtime, with no flusher to wake,
    /// flushes `owner` at once.
    fn ring<T: Flushed>(&self, owner: &Arc<T>) {
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

    /// A bell that a task other than a flusher answers (see [`DeferredSlot::drive`]): rings
    /// wake that task, and no flusher is started while it listens.
    fn listen(&self) -> Arc<Bell> {
        let bell = Arc::new(Bell::default());
        *self.0.lock().unwrap() = Some(bell.clone());
        bell
    }

    /// Forgets `bell`, if it is still the one rung: the next ring starts a flusher.
    fn stop_listening(&self, bell: &Arc<Bell>) {
        let mut current = self.0.lock().unwrap();
        if current
            .as_ref()
            .is_some_and(|current| Arc::ptr_eq(current, bell))
        {
            *current = None;
        }
    }

    /// Ends the flusher: called as its owner goes.
    fn stop(&self) {
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
            self.bell.rung().await;
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

impl Flushed for DeferredSlot {
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

impl Flushed for Parking {
    fn bell(&self) -> &FlushBell {
        &self.bell
    }

    /// A connection whose unlock is in flight is left to its release task.
    fn flush(&self) {
        let mut parked = self.parked.lock().unwrap();
        let taken = match &*parked {
            Some(Claimed::Deferred(_) | Claimed::Idle(_)) => parked.take(),
            _ => None,
        };
        // Out of the lock: an idle connection goes back to its pool as it drops.
        drop(parked);
        if let Some(Claimed::Deferred(deferred)) = taken {
            deferred.send_alone();
        }
    }
}

impl Drop for Parking {
    fn drop(&mut self) {
        self.bell.stop();
    }
}

/// Sends unlocks that dropped guards of one session left: together where they can share a
/// statement (the same mode and key form, see `batch::unlock_together`), alone otherwise.
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
            let rest = group.split_off(group.len().min(batch::MAX_BATCH));
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
            batch::unlock_together(conn, mode, form, unlocks);
            group = rest;
        }
        group.into_iter().for_each(DeferredUnlock::send_alone);
    }
}

impl std::fmt::Debug for Parking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parked = self.parked.lock().map(|p| p.is_some()).unwrap_or(false);
        f.debug_struct("Parking").field("parked", &parked).finish()
    }
}

/// The task that reads a release's answer and settles the connection accordingly.
pub(crate) type ReleaseTask = crate::background::Task;

/// A release queued on a connection whose answer nobody reads yet.
///
/// Either the next acquisition on the connection adopts the task and polls it alongside its own
/// statement, or, when the answer arrives first, the wake-up it causes spawns the task on the
/// runtime. Holders other than the waker keep a [`Weak`] reference: once the answer has been
/// read, nothing is left to adopt.
pub(crate) struct ReleaseInFlight {
    state: Mutex<InFlightState>,
    runtime: Handle,
}

struct InFlightState {
    /// The task, until adopted or spawned.
    task: Option<ReleaseTask>,
    /// Woken before the task was stored: [`start`](ReleaseInFlight::start) spawns it.
    woken: bool,
}

impl ReleaseInFlight {
    /// Polls `task` once, which queues its request on the connection, then hands `offer` a
    /// reference through which the next user of the connection can adopt the task. `offer` is
    /// not called if the task is over at once.
    ///
    /// `offer` runs before the task can run anywhere else: the task may take its connection
    /// back from where `offer` puts it.
    pub(crate) fn start(mut task: ReleaseTask, runtime: Handle, offer: impl FnOnce(Weak<Self>)) {
        let this = Arc::new(ReleaseInFlight {
            state: Mutex::new(InFlightState {
                task: None,
                woken: false,
            }),
            runtime,
        });
        let waker = Waker::from(this.clone());
        if task
            .as_mut()
            .poll(&mut Context::from_waker(&waker))
            .is_ready()
        {
            return;
        }
        // A wake-up from now on waits for the lock, and then finds the task.
        let mut state = this.state.lock().unwrap();
        offer(Arc::downgrade(&this));
        if state.woken {
            drop(state);
            this.runtime.spawn(task);
        } else {
            state.task = Some(task);
        }
    }

    /// Takes the task over, to poll it in the caller's own task; `None` if it is already
    /// running on its own (or over).
    pub(crate) fn adopt(in_flight: &Weak<Self>) -> Option<ReleaseTask> {
        in_flight.upgrade()?.state.lock().unwrap().task.take()
    }
}

impl Wake for ReleaseInFlight {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let mut state = self.state.lock().unwrap();
        match state.task.take() {
            Some(task) => {
                drop(state);
                self.runtime.spawn(task);
            }
            None => state.woken = true,
        }
    }
}
