//! Taking the lock the way the command line asked: at once, within a timeout, or whenever it
//! comes; in the server's queue or polling without a connection; telling on stderr who holds it
//! meanwhile. A waiter never has more than one connection open.

use std::future::Future;
use std::ops::ControlFlow;
use std::time::Duration;

use pglock::{AdvisoryKey, AdvisoryLock, AdvisoryLockGuard, Error, LockMode};
use tokio::time::Instant;
use tokio_postgres::Client;

use crate::args::WaitMode;
use crate::child::Signals;
use crate::connect::{jitter, AppName, Connection, Database, Refusals};
use crate::format::{human_duration, signal_name};
use crate::holders::who_holds;
use crate::http::State;
use crate::output::{with_causes, Output};
use crate::slots::{self, Waiting};

/// How long to wait.
#[derive(Clone, Copy, Debug)]
pub enum Patience {
    /// One attempt (`-n`, `--timeout 0`).
    NoWait,
    /// Until the deadline (`--timeout`).
    Until(Instant),
    /// As long as it takes (the default).
    Forever,
}

impl Patience {
    pub fn deadline(self) -> Option<Instant> {
        match self {
            Patience::NoWait => Some(Instant::now()),
            Patience::Until(deadline) => Some(deadline),
            Patience::Forever => None,
        }
    }

    /// Until when connecting may be retried: the deadline of `--timeout`; with `-n` or without
    /// a timeout, only the connect timeout bounds it.
    pub fn connect_deadline(self) -> Option<Instant> {
        match self {
            Patience::Until(deadline) => Some(deadline),
            Patience::NoWait | Patience::Forever => None,
        }
    }

    pub(crate) fn expired(self) -> bool {
        self.deadline().is_some_and(|at| Instant::now() >= at)
    }

    /// What the waiter will do, for a report.
    pub(crate) fn plan(self, waited: Duration) -> String {
        match self {
            Patience::NoWait => "not waiting (-n)".to_owned(),
            Patience::Until(deadline) => format!(
                "waiting up to {} more",
                human_duration(deadline.saturating_duration_since(Instant::now()))
            ),
            Patience::Forever if waited < Duration::from_secs(1) => "waiting".to_owned(),
            Patience::Forever => format!("waited {} so far", human_duration(waited)),
        }
    }
}

/// When the progress reports of a wait are due: the first at a given time, then one every
/// `every`. The schedule moves on after each report, so that a report that ran late is not
/// followed by a burst of catch-up reports, and a zero interval means no further reports.
pub struct Reports {
    next: Option<Instant>,
    every: Duration,
}

impl Reports {
    pub fn new(first: Instant, every: Duration) -> Self {
        Reports {
            next: Some(first),
            every,
        }
    }

    /// Whether a report is due now.
    pub fn is_due(&self) -> bool {
        self.next.is_some_and(|at| Instant::now() >= at)
    }

    /// Completes when the next report is due; never, once reports have stopped.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: the schedule changes only in [`done`](Self::done).
    pub async fn due(&self) {
        match self.next {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    }

    /// Records that the report due was made.
    pub fn done(&mut self) {
        let Some(at) = self.next else { return };
        if self.every.is_zero() {
            self.next = None;
            return;
        }
        let now = Instant::now();
        let next = at + self.every;
        self.next = Some(if next > now { next } else { now + self.every });
    }
}

/// The pause between two attempts of a polling waiter starts here and doubles up to
/// [`LONGEST_POLL`], each pause jittered so that polling waiters spread out.
pub const FIRST_POLL: Duration = Duration::from_millis(250);
pub const LONGEST_POLL: Duration = Duration::from_secs(2);
/// The first pause of a waiter that polls because the server is short of connection slots.
const FIRST_POLL_WHEN_FULL: Duration = Duration::from_secs(1);

/// The next pause of a polling waiter after `pause`.
pub fn next_poll(pause: Duration) -> Duration {
    (pause * 2).min(LONGEST_POLL)
}

/// Each waiter queued on the server adds this much to a polling waiter's pause: those waiters
/// are served first.
const POLL_PER_QUEUED: Duration = Duration::from_millis(500);

/// The longest pause of a polling waiter behind queued waiters.
pub const LONGEST_POLL_BEHIND_QUEUE: Duration = Duration::from_secs(10);

/// The pause of a polling waiter: `pause`, plus [`POLL_PER_QUEUED`] for each of the `queued`
/// waiters in the server's queue, at most [`LONGEST_POLL_BEHIND_QUEUE`] (before jitter).
pub fn poll_pause(pause: Duration, queued: i64) -> Duration {
    let queued = u32::try_from(queued.max(0)).unwrap_or(u32::MAX);
    (pause + POLL_PER_QUEUED.saturating_mul(queued)).min(LONGEST_POLL_BEHIND_QUEUE.max(pause))
}

/// A waiter: where it connects, how it waits, what it says.
pub struct Waiter<'a> {
    pub db: &'a Database,
    pub app: AppName<'a>,
    pub out: &'a Output,
    /// The lock's name (or `key 42`), for messages.
    pub label: &'a str,
    pub progress_every: Duration,
    pub mode: WaitMode,
    pub refusals: Refusals,
    /// Where the wait is, for `--http`.
    pub state: &'a State,
}

/// How an acquisition ended.
pub enum Acquired<G = AdvisoryLockGuard> {
    /// The lock (or a semaphore's slot) is held on this connection.
    Held(Connection, G),
    /// It stayed busy (`-n`, or the deadline passed).
    Busy,
    /// A signal came while waiting: the wait is abandoned on the server.
    Interrupted(i32),
}

impl<G> Acquired<G> {
    /// The same ending, with what is held turned into `H`.
    pub fn map<H>(self, held: impl FnOnce(G) -> H) -> Acquired<H> {
        match self {
            Acquired::Held(connection, guard) => Acquired::Held(connection, held(guard)),
            Acquired::Busy => Acquired::Busy,
            Acquired::Interrupted(signal) => Acquired::Interrupted(signal),
        }
    }
}

/// One call of [`Waiter::acquire`]: the lock it wants, how long it may wait, and how far it
/// has come. It outlasts each connection: a lost connection or a poll starts a new attempt,
/// not a new wait.
struct Wait {
    key: AdvisoryKey,
    mode: LockMode,
    patience: Patience,
    started: Instant,
    reports: Reports,
    /// How the waiter waits, once it has found the lock busy.
    waiting: Option<Waiting>,
    /// The pause before the next poll (see [`next_poll`]).
    pause: Duration,
    /// The holders last reported, which a report from the queue repeats.
    held_by: Option<String>,
}

impl Wait {
    fn new(key: AdvisoryKey, mode: LockMode, patience: Patience, every: Duration) -> Self {
        let started = Instant::now();
        Wait {
            key,
            mode,
            patience,
            started,
            reports: Reports::new(started, every),
            waiting: None,
            pause: FIRST_POLL,
            held_by: None,
        }
    }
}

/// What an attempt asks the server along with it, for the case the lock is busy.
#[derive(Clone, Copy)]
struct Asks {
    /// Who holds the lock, for a report due now.
    holders: bool,
    /// The server's free connection slots and the waiters queued, to choose how to wait.
    room: bool,
}

/// The answers to [`Asks`]: `None` where not asked, or not answered.
struct Answers {
    holders: Option<String>,
    free: Option<(i32, i32)>,
    queued: Option<i64>,
}

/// How a wait in the server's queue ended, for [`Waiter::acquire`], which holds the connection.
enum Queued {
    /// The lock is held.
    Held(AdvisoryLockGuard),
    /// The wait is over without the lock (`Busy` or `Interrupted`).
    Over(Acquired),
    /// The connection died while it waited: nothing is held on it, the wait goes on.
    Lost,
}

impl Waiter<'_> {
    /// Takes `key` in `mode` within `patience`: connects (waiting out passing refusals), tries,
    /// and while the lock is busy waits as [`WaitMode`] says, reporting the holders on stderr.
    /// A connection lost while waiting is replaced, within `patience`.
    ///
    /// # Errors
    ///
    /// Connection errors that do not pass by themselves (or did not within the connect
    /// timeout), and server errors.
    pub async fn acquire(
        &mut self,
        key: AdvisoryKey,
        mode: LockMode,
        patience: Patience,
        signals: &mut Signals,
    ) -> Result<Acquired, Error> {
        let mut wait = Wait::new(key, mode, patience, self.progress_every);
        loop {
            let connection = tokio::select! {
                connected = self.db.connect(self.app, patience.connect_deadline(), &mut self.refusals, self.out) => connected?,
                signal = signals.recv() => return Ok(self.interrupted(signal)),
            };
            let lock = AdvisoryLock::new(connection.session.clone(), key);
            let asks = self.asks(&wait);
            let (first, answers) = tokio::select! {
                tried = attempt(&lock, connection.session.client(), &wait, asks) => tried,
                signal = signals.recv() => return Ok(self.interrupted(signal)),
            };
            if let Some(guard) = first? {
                if wait.waiting.is_some() {
                    self.acquired(wait.started);
                }
                return Ok(Acquired::Held(connection, guard));
            }
            let waiting = match self.found_busy(&mut wait, asks, answers.holders, answers.free) {
                ControlFlow::Continue(waiting) => waiting,
                ControlFlow::Break(over) => return Ok(over),
            };
            match waiting {
                Waiting::Queue => match self
                    .in_queue(&lock, &connection, &mut wait, signals)
                    .await?
                {
                    Queued::Held(guard) => return Ok(Acquired::Held(connection, guard)),
                    Queued::Over(over) => return Ok(over),
                    Queued::Lost => {}
                },
                Waiting::Poll => {
                    // Closes the connection: a polling waiter holds none between attempts.
                    drop(lock);
                    drop(connection);
                    if let Some(signal) = self
                        .until_next_poll(&mut wait, answers.queued, signals)
                        .await
                    {
                        return Ok(self.interrupted(signal));
                    }
                }
            }
        }
    }

    /// What the next attempt asks along with it: the holders when a report is due, and the
    /// room on the server while the waiter may still choose how to wait (not with `-n`, nor
    /// once it waits in the queue, where it stays).
    fn asks(&self, wait: &Wait) -> Asks {
        Asks {
            holders: wait.reports.is_due() && !self.out.quiet,
            room: !matches!(wait.patience, Patience::NoWait)
                && wait.waiting != Some(Waiting::Queue),
        }
    }

    /// The attempt found the lock busy: says so for `--http`, and on stderr when a report is
    /// due (`holders` were asked then); breaks with [`Acquired::Busy`] once the patience has
    /// run out, else goes on with how to wait.
    fn found_busy(
        &self,
        wait: &mut Wait,
        asks: Asks,
        holders: Option<String>,
        free: Option<(i32, i32)>,
    ) -> ControlFlow<Acquired, Waiting> {
        self.state.waiting();
        if asks.holders {
            wait.held_by = holders;
            self.report_busy(
                wait.held_by.as_deref(),
                wait.patience.plan(wait.started.elapsed()),
            );
            wait.reports.done();
        }
        if wait.patience.expired() {
            if !matches!(wait.patience, Patience::NoWait) {
                self.gave_up(wait.started);
            }
            return ControlFlow::Break(Acquired::Busy);
        }
        ControlFlow::Continue(self.choose(wait, free))
    }

    /// How to wait: chosen when the lock is first found busy, and again at each poll (a
    /// polling waiter goes back to the queue once the server has room); a waiter in the queue
    /// stays there.
    fn choose(&self, wait: &mut Wait, free: Option<(i32, i32)>) -> Waiting {
        let choice = match wait.waiting {
            Some(Waiting::Queue) => Waiting::Queue,
            before => slots::decide(self.mode, free, before, self.label, self.out),
        };
        *wait.waiting.insert(choice)
    }

    /// Waits for `lock` in the server's queue on `connection`, within the patience, reporting
    /// on stderr meanwhile. A signal abandons the wait, and pglock makes sure the server has
    /// ended it before it goes on to exit.
    ///
    /// # Errors
    ///
    /// Server errors, and connection errors other than a lost connection.
    async fn in_queue(
        &self,
        lock: &AdvisoryLock,
        connection: &Connection,
        wait: &mut Wait,
        signals: &mut Signals,
    ) -> Result<Queued, Error> {
        let (mode, patience) = (wait.mode, wait.patience);
        let queued = async {
            match (mode, patience.deadline()) {
                (LockMode::Exclusive, Some(at)) => lock.try_lock_until(at).await,
                (LockMode::Shared, Some(at)) => lock.try_lock_shared_until(at).await,
                (LockMode::Exclusive, None) => lock.lock().await.map(Some),
                (LockMode::Shared, None) => lock.lock_shared().await.map(Some),
            }
        };
        let held_by = wait.held_by.as_deref();
        let waited = (wait.started, wait.patience);
        let queued = self.with_reports(queued, waited, held_by, &mut wait.reports, signals);
        let result = match queued.await {
            Ok(result) => result,
            Err(signal) => {
                // The wait was dropped on return, which abandons it; this makes sure the
                // server has ended it before pglock exits.
                connection.abandon_wait().await;
                return Ok(Queued::Over(self.interrupted(signal)));
            }
        };
        match result {
            Ok(Some(guard)) => {
                self.acquired(wait.started);
                Ok(Queued::Held(guard))
            }
            Ok(None) => {
                self.gave_up(wait.started);
                Ok(Queued::Over(Acquired::Busy))
            }
            // Nothing is held on a connection that died while it waited: wait on a new one.
            Err(error) if error.is_connection_lost() => {
                self.lost_while_waiting(&error);
                Ok(Queued::Lost)
            }
            Err(error) => Err(error),
        }
    }

    /// Awaits `queued`, a wait in the server's queue that began at `started`, with a report on
    /// stderr each time one is due (naming `held_by`, the holders last seen); a signal ends it
    /// first (`Err`). `queued` is dropped before this returns, so a wait cut short by a signal
    /// is abandoned by then.
    pub(crate) async fn with_reports<T>(
        &self,
        queued: impl Future<Output = T>,
        (started, patience): (Instant, Patience),
        held_by: Option<&str>,
        reports: &mut Reports,
        signals: &mut Signals,
    ) -> Result<T, i32> {
        let mut queued = std::pin::pin!(queued);
        loop {
            tokio::select! {
                result = &mut queued => break Ok(result),
                signal = signals.recv() => break Err(signal),
                () = reports.due(), if !self.out.quiet => {
                    self.report_still_waiting(started, held_by, patience);
                    reports.done();
                }
            }
        }
    }

    /// Sleeps until a polling waiter's next attempt, which comes no later than the deadline;
    /// gives the signal that came first, if one did.
    async fn until_next_poll(
        &self,
        wait: &mut Wait,
        queued: Option<i64>,
        signals: &mut Signals,
    ) -> Option<i32> {
        // Waiters in the server's queue get the lock before any poller: while some are queued,
        // polling sooner only takes connection slots from the holder's command.
        let queued = queued.unwrap_or(0);
        if self.mode == WaitMode::Auto && wait.pause < FIRST_POLL_WHEN_FULL {
            // Polling because the server is short of slots: come back less often.
            wait.pause = FIRST_POLL_WHEN_FULL;
        }
        let pause = poll_pause(wait.pause, queued);
        let wake = match wait.patience.deadline() {
            Some(at) => at.min(Instant::now() + jitter(pause)),
            None => Instant::now() + jitter(pause),
        };
        wait.pause = next_poll(wait.pause);
        tokio::select! {
            () = tokio::time::sleep_until(wake) => None,
            signal = signals.recv() => Some(signal),
        }
    }

    pub(crate) fn interrupted<G>(&self, signal: i32) -> Acquired<G> {
        self.out.info(format_args!(
            "{} while waiting for lock {}: giving up",
            signal_name(signal),
            self.label
        ));
        Acquired::Interrupted(signal)
    }

    pub(crate) fn report_busy(&self, held_by: Option<&str>, plan: String) {
        match held_by {
            Some(held_by) => self.out.info(format_args!(
                "lock {} is busy: {held_by}; {plan}",
                self.label
            )),
            None => self
                .out
                .info(format_args!("lock {} is busy; {plan}", self.label)),
        }
    }

    /// A report while waiting in the queue, where the connection is busy with the wait: the
    /// holders are those seen when the wait began.
    pub(crate) fn report_still_waiting(
        &self,
        started: Instant,
        held_by: Option<&str>,
        patience: Patience,
    ) {
        let plan = patience.plan(started.elapsed());
        match held_by {
            Some(held_by) => self.out.info(format_args!(
                "lock {} is busy; {plan} (held by {held_by} when the wait began)",
                self.label
            )),
            None => self
                .out
                .info(format_args!("lock {} is busy; {plan}", self.label)),
        }
    }

    pub(crate) fn acquired(&self, started: Instant) {
        self.out.verbose(format_args!(
            "acquired lock {} after {}",
            self.label,
            human_duration(started.elapsed())
        ));
    }

    pub(crate) fn gave_up(&self, started: Instant) {
        self.out.info(format_args!(
            "gave up on lock {} after {}: still busy",
            self.label,
            human_duration(started.elapsed())
        ));
    }

    pub(crate) fn lost_while_waiting(&self, error: &Error) {
        let error = with_causes(error);
        self.state.lost(&error);
        self.out.info(format_args!(
            "lost the connection while waiting for lock {}: {error}; connecting again",
            self.label
        ));
    }
}

/// One attempt at `lock`, with what a busy lock calls for (who holds it, the server's free
/// slots, the waiters queued: as `asks` says) in the same round trip on `client`, the lock's
/// own connection: a waiter that goes on to poll gives its connection slot back sooner, and a
/// fleet arriving at once holds the server's slots for as short a time as it can.
async fn attempt(
    lock: &AdvisoryLock,
    client: &Client,
    wait: &Wait,
    asks: Asks,
) -> (Result<Option<AdvisoryLockGuard>, Error>, Answers) {
    let (key, mode) = (wait.key, wait.mode);
    let attempt = async {
        match mode {
            LockMode::Exclusive => lock.try_lock().await,
            LockMode::Shared => lock.try_lock_shared().await,
        }
    };
    let lookups = futures_util::future::join3(
        async {
            if asks.holders {
                who_holds(client, key).await
            } else {
                None
            }
        },
        async {
            if asks.room {
                slots::free_slots(client).await
            } else {
                None
            }
        },
        async {
            if asks.room {
                slots::queued(client, key).await
            } else {
                None
            }
        },
    );
    let (first, (holders, free, queued)) = futures_util::future::join(attempt, lookups).await;
    (
        first,
        Answers {
            holders,
            free,
            queued,
        },
    )
}
