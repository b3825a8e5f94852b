//! A seeded randomized soak of every acquisition path (issue 21, item 5).
//!
//! Worker tasks take locks on a small range of keys of their own, at random, through every
//! path: a deadpool pool, dedicated `Session`s, `Session`s shared by several tasks, a
//! `CohortLock`, a `LockSet`; session and transaction scope, exclusive and shared mode;
//! `lock`, `try_lock`, `try_lock_for`, `try_lock_until`, blocking and polling waits. At random
//! they drop an acquisition after N polls, give it a tiny `tokio::time::timeout`, abort its
//! task, or panic inside the critical section; an administrator connection terminates
//! backends at random (`pg_terminate_backend`), mostly those of holders that watch their
//! loss signal. A second process (this test binary run again, `soak_peer`) takes the same
//! keys at the same time.
//!
//! Checks:
//! - inside each critical section, on the guard's own connection: this backend holds the key
//!   (granted, in the guard's mode) and no other backend holds it in a conflicting mode, at the
//!   start and at the end;
//! - the intervals each holder records on its own connection (`clock_timestamp()` at the start
//!   and at the end of its critical section, both processes, into one table) never overlap for
//!   a key, except shared with shared;
//! - a holder watching its loss signal when its backend is terminated sees the loss within
//!   `detection_bound()` (plus the same again for scheduling: some 30 tasks share 2 cores);
//!   no lock is reported lost (missing, other backend) without a fault;
//! - at the end nothing is left in `pg_locks` for the soak's keys and every pooled connection
//!   is idle, outside a transaction and holds no advisory lock;
//! - every error is classified by its `pglock::Error` variant (and user statements' errors by
//!   SQLSTATE); an unexpected one fails the run; no panic but the injected ones.
//!
//! Seed: `PGLOCK_SOAK_SEED` (else random; printed at the start). Duration: `PGLOCK_SOAK_SECS`
//! (default 45). The counts are printed at the end (`SOAK |` lines).
//!
//! Shared sessions (several tasks, and a bystander task running its own statements) are
//! `Session`s as connected; the dedicated ones are declared `Session::dedicated()`. A shared
//! session refuses transaction scope (`Error::TransactionOnSharedSession`, counted), and its
//! waits poll. On a dedicated session, the last cancel request of the task's own abandoned wait
//! may arrive late and end the task's next statement there (`Error::Cancelled`, 57014): counted
//! as `dedicated-late-cancel`, not failed, as the session's docs describe.
//!
//! The defects issue 21 found each have a named check, on by default: `shared-txn` (a
//! transaction-scoped lock on a shared `Session` lost while its guard lives on, other tasks'
//! statements run in its failed transaction), `stray-cancel` (a cancel request ending a
//! statement on a shared session: a user's, a bystander's, another acquisition),
//! `background-panic` (a panic in a pglock background task, e.g. "`async fn` resumed after
//! completion"). `PGLOCK_SOAK_ALLOW=shared-txn,stray-cancel,background-panic` (any of them)
//! counts their findings instead of failing (for a build without the fixes); with `shared-txn`
//! allowed, no transaction-scoped lock is asked of a shared session.
//! Waits are bounded (`STUCK`): a queued wait that long fails the run (a key held by nobody);
//! a polling wait that long is counted (polling is unfair).
//!
//! Each worker's choices come from its own generator seeded from the run's seed, so a seed
//! replays the same sequence of choices; the interleaving, and so the outcome, is the
//! scheduler's and the server's.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::Pool;
use pglock::{
    AdvisoryKey, AdvisoryLock, AdvisoryLockGuard, CohortGuard, CohortLock, HealthCheck, LockScope,
    LockSet, LossReason, LossSignal, Session, WaitStrategy,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;
use tokio_postgres::error::SqlState;

use crate::harness::{drop_after_polls, TestDb};

/// The health check of every lock of the soak: loss seen within 600 ms.
const HEALTH: HealthCheck =
    HealthCheck::new(Duration::from_millis(300), Duration::from_millis(300));

/// The high 32 bits of every soak key (`pg_locks.classid`): ASCII "PLSK". The low 32 bits are
/// a run nonce (24 bits) and the key's index, so that runs side by side never share a key.
const KEY_CLASS: i64 = 0x504C_534B;

/// Keys per run: few, so that the tasks contend.
const KEYS: u32 = 6;

/// An acquisition that waits this long waits for a lock that nobody holds any more.
const STUCK: Duration = Duration::from_secs(15);

/// The environment variable that makes this binary the soak's second process.
const PEER_ENV: &str = "PGLOCK_SOAK_PEER";

/// The marker of injected panics.
const INJECTED: &str = "soak: injected panic";

/// The known defects of issue 21 and the names of their checks.
const SHARED_TXN: &str = "shared-txn";
const STRAY_CANCEL: &str = "stray-cancel";
const BACKGROUND_PANIC: &str = "background-panic";

const TABLE_SQL: &str = "CREATE TABLE IF NOT EXISTS pglock_soak_intervals (
    id bigserial PRIMARY KEY, run text NOT NULL, key bigint NOT NULL, shared boolean NOT NULL,
    path text NOT NULL, holder text NOT NULL, t0 timestamptz NOT NULL, t1 timestamptz NOT NULL)";

/// This backend's hold on the key (in the guard's mode) and conflicting holds of other
/// backends, with the time: `$1..$3` the key as in `pg_locks`, `$4` shared.
const CHECK_SQL: &str = "SELECT clock_timestamp(),
    count(*) FILTER (WHERE l.pid = pg_backend_pid()
                     AND l.mode = CASE WHEN $4 THEN 'ShareLock' ELSE 'ExclusiveLock' END),
    count(*) FILTER (WHERE l.pid <> pg_backend_pid() AND (l.mode = 'ExclusiveLock' OR NOT $4))
    FROM pg_lock_status() l
    WHERE l.locktype = 'advisory' AND l.granted
      AND l.classid = $1::int8::oid AND l.objid = $2::int8::oid AND l.objsubid = $3::int2";

const RECORD_SQL: &str =
    "INSERT INTO pglock_soak_intervals (run, key, shared, path, holder, t0, t1)
    VALUES ($1, $2, $3, $4, $5, $6, $7)";

/// What the run is: from the environment of the first process, handed to the second.
#[derive(Clone, Debug)]
struct Plan {
    seed: u64,
    secs: u64,
    nonce: u32,
    allowed: HashSet<String>,
}

impl Plan {
    fn from_env() -> Self {
        let seed = std::env::var("PGLOCK_SOAK_SEED")
            .ok()
            .map(|s| s.trim().parse().expect("PGLOCK_SOAK_SEED is a u64"))
            .unwrap_or_else(|| rand::thread_rng().gen());
        let secs = std::env::var("PGLOCK_SOAK_SECS")
            .ok()
            .map(|s| {
                s.trim()
                    .parse()
                    .expect("PGLOCK_SOAK_SECS is a number of seconds")
            })
            .unwrap_or(45);
        Plan {
            seed,
            secs,
            nonce: rand::thread_rng().gen_range(0..1 << 24),
            allowed: allowed_from_env(),
        }
    }

    /// For the second process: `seed secs nonce`.
    fn encode(&self) -> String {
        format!("{} {} {}", self.seed, self.secs, self.nonce)
    }

    fn decode(text: &str) -> Self {
        let mut parts = text.split(' ').map(|p| p.parse::<u64>().unwrap());
        Plan {
            seed: parts.next().unwrap(),
            secs: parts.next().unwrap(),
            nonce: parts.next().unwrap() as u32,
            allowed: allowed_from_env(),
        }
    }

    fn key(&self, index: u32) -> AdvisoryKey {
        AdvisoryKey::Single(KEY_CLASS << 32 | i64::from(self.nonce) << 8 | i64::from(index))
    }

    fn app(&self, process: &str) -> String {
        format!("pglock-soak-{:06x}-{process}", self.nonce)
    }
}

fn allowed_from_env() -> HashSet<String> {
    std::env::var("PGLOCK_SOAK_ALLOW")
        .unwrap_or_default()
        .split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

/// Counts and findings of one process.
struct Tally {
    counts: Mutex<BTreeMap<String, u64>>,
    violations: Mutex<Vec<String>>,
    allowed: HashSet<String>,
}

impl Tally {
    fn new(allowed: HashSet<String>) -> Self {
        Tally {
            counts: Mutex::default(),
            violations: Mutex::default(),
            allowed,
        }
    }

    fn count(&self, what: impl Into<String>) {
        *self.counts.lock().unwrap().entry(what.into()).or_default() += 1;
    }

    /// A finding: fails the run, unless it belongs to a known defect whose check is allowed.
    fn violation(&self, known: Option<&'static str>, message: String) {
        match known {
            Some(check) => {
                self.count(format!("known-defect/{check}"));
                if !self.allowed.contains(check) {
                    self.violations
                        .lock()
                        .unwrap()
                        .push(format!("[{check}] {message}"));
                }
            }
            None => self.violations.lock().unwrap().push(message),
        }
    }

    fn get(&self, what: &str) -> u64 {
        self.counts.lock().unwrap().get(what).copied().unwrap_or(0)
    }
}

/// The acquisition paths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Pool,
    Dedicated,
    Shared,
    Cohort,
    Set,
}

impl Path {
    fn name(self) -> &'static str {
        match self {
            Path::Pool => "pool",
            Path::Dedicated => "dedicated-session",
            Path::Shared => "shared-session",
            Path::Cohort => "cohort",
            Path::Set => "lock-set",
        }
    }

    /// Whether the guard's connection is a `Session` (where an abandoned wait's cancel request
    /// can reach a later statement).
    fn on_session(self) -> bool {
        matches!(self, Path::Dedicated | Path::Shared | Path::Set)
    }

    /// Whether other tasks use the same connection at the same time.
    fn shared_connection(self) -> bool {
        matches!(self, Path::Shared | Path::Set)
    }
}

/// A connection that can be replaced once the server ended it.
struct Slot<T> {
    current: Mutex<Arc<T>>,
}

impl<T> Slot<T> {
    fn new(value: T) -> Self {
        Slot {
            current: Mutex::new(Arc::new(value)),
        }
    }
    fn get(&self) -> Arc<T> {
        self.current.lock().unwrap().clone()
    }
    /// Replaces `old` (if it is still the current one) with `new`.
    fn replace(&self, old: &Arc<T>, new: T) {
        let mut current = self.current.lock().unwrap();
        if Arc::ptr_eq(&current, old) {
            *current = Arc::new(new);
        }
    }
}

/// Holders watching their loss signal, by backend pid, and the backends terminated.
#[derive(Default)]
struct Faults {
    watched: Mutex<HashMap<i32, Vec<(u64, LossSignal)>>>,
    terminated: Mutex<HashMap<i32, Instant>>,
}

/// Everything the tasks of one process share.
struct Ctx {
    plan: Plan,
    process: &'static str,
    db: TestDb,
    url: String,
    tally: Tally,
    faults: Faults,
    deadline: Instant,
    pool: Pool,
    cohort_pool: Pool,
    cohorts: Vec<CohortLock>,
    shared: Vec<Slot<Session>>,
    set: Slot<LockSet>,
    next_id: std::sync::atomic::AtomicU64,
    /// What each worker is doing, for the report of a run that hangs.
    doing: Mutex<BTreeMap<String, (String, Instant)>>,
}

impl Ctx {
    async fn session(&self) -> Session {
        let mut failures = 0;
        loop {
            match Session::connect(&self.url).await {
                Ok(session) => return session.with_health_check(HEALTH),
                Err(error) => {
                    failures += 1;
                    assert!(failures < 100, "reconnecting a session: {error}");
                    self.tally
                        .count(format!("reconnect-error/{}", variant(&error)));
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    async fn lock_set(&self) -> LockSet {
        let sessions = vec![
            Arc::new(self.session().await),
            Arc::new(self.session().await),
        ];
        LockSet::from_sessions(sessions).unwrap()
    }

    /// Notes what the worker of `holder` is doing now.
    fn stage(&self, holder: &str, what: String) {
        let worker = holder.split(':').nth(1).unwrap_or(holder).to_owned();
        if let Some(entry) = self.doing.lock().unwrap().get_mut(&worker) {
            entry.0 = format!("{holder} {what}");
            entry.1 = Instant::now();
        }
    }

    fn id(&self) -> u64 {
        self.next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    fn terminated(&self, pid: i32) -> Option<Instant> {
        self.faults.terminated.lock().unwrap().get(&pid).copied()
    }
}

/// The name of an error's variant.
fn variant(error: &pglock::Error) -> &'static str {
    use pglock::Error as E;
    match error {
        E::Config(_) => "Config",
        E::Connect { .. } => "Connect",
        E::Tls { .. } => "Tls",
        E::PoolExhausted => "PoolExhausted",
        E::Pool(_) => "Pool",
        E::ConnectionLost { .. } => "ConnectionLost",
        E::Timeout { .. } => "Timeout",
        E::Deadlock { .. } => "Deadlock",
        E::Cancelled { .. } => "Cancelled",
        E::NotHeld { .. } => "NotHeld",
        E::UnexpectedAnswer { .. } => "UnexpectedAnswer",
        E::AlreadyHeld { .. } => "AlreadyHeld",
        E::BackendChanged { .. } => "BackendChanged",
        E::SessionLockBehindPooler { .. } => "SessionLockBehindPooler",
        E::TransactionInProgress => "TransactionInProgress",
        E::TransactionOnSharedSession { .. } => "TransactionOnSharedSession",
        E::ReadOnlyStandby => "ReadOnlyStandby",
        E::OutOfLockMemory { .. } => "OutOfLockMemory",
        E::TermTable { .. } => "TermTable",
        E::RolledBack { .. } => "RolledBack",
        E::Postgres(_) => "Postgres",
        _ => "unknown",
    }
}

/// What one operation does.
#[derive(Clone, Copy, Debug)]
enum Method {
    Lock,
    TryLock,
    TryFor(Duration),
    TryUntil(Duration),
}

#[derive(Clone, Copy, Debug)]
enum Cancel {
    None,
    AfterPolls(usize),
    Timeout(Duration),
    Abort(Duration),
    Panic,
}

#[derive(Clone, Copy, Debug)]
enum Release {
    Drop,
    Unlock,
    Commit,
    Rollback,
}

#[derive(Clone, Copy, Debug)]
struct Op {
    path: Path,
    key: u32,
    shared: bool,
    scope: LockScope,
    method: Method,
    polling: bool,
    cancel: Cancel,
    /// A long hold that watches the loss signal (the terminator's preferred victims).
    watch: Option<Duration>,
    pause: Duration,
    release: Release,
}

impl Op {
    fn label(&self) -> String {
        let scope = match self.scope {
            LockScope::Session => "session",
            LockScope::Transaction => "txn",
        };
        let mode = if self.shared { "shared" } else { "exclusive" };
        format!("{}/{scope}/{mode}", self.path.name())
    }

    /// The transaction-scoped lock on a shared session (issue 21 item 1).
    fn shared_txn(&self) -> bool {
        self.path.shared_connection() && self.scope == LockScope::Transaction
    }
}

fn random_op(rng: &mut StdRng, path: Path) -> Op {
    let (shared, scope) = match path {
        // A cohort hands a session lock between tasks, exclusive only.
        Path::Cohort => (false, LockScope::Session),
        // A set's own methods are exclusive and session-scoped; its `advisory_lock` gives the
        // others.
        Path::Set => (rng.gen_bool(0.2), LockScope::Session),
        // A shared session refuses transaction scope: tried now and then.
        Path::Shared => (
            rng.gen_bool(0.3),
            if rng.gen_bool(0.1) {
                LockScope::Transaction
            } else {
                LockScope::Session
            },
        ),
        _ => (
            rng.gen_bool(0.3),
            if rng.gen_bool(0.4) {
                LockScope::Transaction
            } else {
                LockScope::Session
            },
        ),
    };
    let method = match rng.gen_range(0..10) {
        0..=3 => Method::Lock,
        4..=6 => Method::TryLock,
        7..=8 => Method::TryFor(Duration::from_micros(rng.gen_range(0..30_000))),
        _ => Method::TryUntil(Duration::from_micros(rng.gen_range(0..30_000))),
    };
    // A set's `lock` polls, and a poller mostly loses to the queued waiters of the other
    // paths: bound most of its waits, so that its worker gets on.
    let method = match method {
        Method::Lock if path == Path::Set && rng.gen_bool(0.8) => {
            Method::TryFor(Duration::from_micros(rng.gen_range(0..50_000)))
        }
        other => other,
    };
    let cancel = match rng.gen_range(0..100) {
        0..=54 => Cancel::None,
        55..=69 => Cancel::AfterPolls(rng.gen_range(1..=6)),
        // A zero timeout drops the acquisition after its first poll, with its statement sent.
        70..=74 => Cancel::Timeout(Duration::ZERO),
        75..=86 => Cancel::Timeout(Duration::from_micros(rng.gen_range(0..2_000))),
        87..=94 => Cancel::Abort(Duration::from_micros(rng.gen_range(0..3_000))),
        _ => Cancel::Panic,
    };
    let watch = rng
        .gen_bool(0.04)
        .then(|| Duration::from_millis(rng.gen_range(100..1_200)));
    let release = match (scope, rng.gen_range(0..10)) {
        (LockScope::Transaction, 0..=5) => Release::Commit,
        (LockScope::Transaction, 6) => Release::Rollback,
        (_, 0..=4) => Release::Unlock,
        _ => Release::Drop,
    };
    Op {
        path,
        key: rng.gen_range(0..KEYS),
        shared,
        scope,
        method,
        polling: rng.gen_bool(0.3),
        cancel,
        watch,
        pause: Duration::from_micros(rng.gen_range(0..2_000)),
        release,
    }
}

/// A held lock of any path.
enum Held {
    Guard(AdvisoryLockGuard),
    Cohort(CohortGuard),
}

impl Held {
    fn guard(&self) -> &AdvisoryLockGuard {
        match self {
            Held::Guard(guard) => guard,
            Held::Cohort(guard) => guard,
        }
    }
}

/// The target of one acquisition: everything it needs, owned, so that it can run in a task.
enum Target {
    Lock(AdvisoryLock),
    Cohort(CohortLock),
    Set(Arc<LockSet>, AdvisoryKey),
}

async fn acquire(target: Target, op: Op) -> pglock::Result<Option<Held>> {
    let lock = match target {
        Target::Cohort(cohort) => {
            return match op.method {
                Method::Lock => cohort.lock().await.map(Some),
                Method::TryLock => cohort.try_lock().await,
                Method::TryFor(d) | Method::TryUntil(d) => cohort.try_lock_for(d).await,
            }
            .map(|guard| guard.map(Held::Cohort));
        }
        Target::Set(set, key) if !op.shared && !matches!(op.method, Method::TryUntil(_)) => {
            return match op.method {
                Method::Lock => set.lock(key).await.map(Some),
                Method::TryLock => set.try_lock(key).await,
                Method::TryFor(d) | Method::TryUntil(d) => set.try_lock_for(key, d).await,
            }
            .map(|guard| guard.map(Held::Guard));
        }
        Target::Set(set, key) => set.advisory_lock(key),
        Target::Lock(lock) => lock,
    };
    let lock = lock.scope(op.scope);
    let lock = if op.polling {
        lock.wait_strategy(WaitStrategy::Poll {
            initial: Duration::from_millis(1),
            max: Duration::from_millis(8),
        })
    } else {
        lock
    };
    let guard = match (op.method, op.shared) {
        (Method::Lock, false) => lock.lock().await.map(Some),
        (Method::Lock, true) => lock.lock_shared().await.map(Some),
        (Method::TryLock, false) => lock.try_lock().await,
        (Method::TryLock, true) => lock.try_lock_shared().await,
        (Method::TryFor(d), false) => lock.try_lock_for(d).await,
        (Method::TryFor(d), true) => lock.try_lock_shared_for(d).await,
        (Method::TryUntil(d), false) => lock.try_lock_until(Instant::now() + d).await,
        (Method::TryUntil(d), true) => lock.try_lock_shared_until(Instant::now() + d).await,
    };
    guard.map(|guard| guard.map(Held::Guard))
}

/// Judges an error of an acquisition or a release.
fn judge_error(ctx: &Ctx, op: &Op, stage: &str, error: &pglock::Error) {
    let name = variant(error);
    ctx.tally.count(format!("error/{stage}/{name}"));
    let path = op.path;
    let expected = match name {
        // Terminated backends.
        "ConnectionLost" => true,
        // A lock lost (its backend terminated) before an explicit release.
        "NotHeld" => stage == "release",
        // Another task of the same session holds the key.
        "AlreadyHeld" => path.shared_connection(),
        // Another task's transaction is open on the shared session.
        "TransactionInProgress" => op.shared_txn(),
        // Transaction scope on a shared session is refused.
        "TransactionOnSharedSession" => op.shared_txn() && stage == "acquire",
        // Shared sessions hold a key while one of their tasks waits for another: with the
        // other blocking waits queued on those keys that makes cycles, which the server's
        // detector breaks by failing one wait of the cycle, on any path but the polling set.
        "Deadlock" => path != Path::Set,
        _ => false,
    };
    if expected {
        return;
    }
    let message = format!("{stage} of {} failed: {name}: {error}", op.label());
    match name {
        // A dedicated session's abandoned wait is cancelled by requests repeated until it has
        // ended: the last one can arrive late and reach the task's next statement there (its
        // next acquisition, or the commit of a transaction that statement failed).
        "Cancelled" | "RolledBack" if path == Path::Dedicated => {
            ctx.tally
                .count(format!("dedicated-late-cancel/{stage}/{name}"));
        }
        // A cancel request of an abandoned wait on the same session ended this statement.
        "Cancelled" if path.on_session() => ctx.tally.violation(Some(STRAY_CANCEL), message),
        // The transaction had failed: a stray cancel (or a lost transaction) on a session.
        "RolledBack" if path.on_session() => ctx.tally.violation(
            Some(if op.shared_txn() {
                SHARED_TXN
            } else {
                STRAY_CANCEL
            }),
            message,
        ),
        // Another task's transaction-scoped lock on the same session has its transaction
        // failed, and this statement ran in it (issue 21, item 4).
        "Postgres"
            if path.shared_connection()
                && error.code() == Some(&SqlState::IN_FAILED_SQL_TRANSACTION) =>
        {
            ctx.tally.violation(Some(SHARED_TXN), message)
        }
        // A transaction-scoped lock on a shared session refused by the API.
        "Config" | "unknown" if op.shared_txn() && stage == "acquire" => {
            ctx.tally.count(format!("refused/{}", op.label()));
        }
        _ => ctx.tally.violation(None, message),
    }
}

/// A driver error with the server's message, if any.
fn describe(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => error.to_string(),
    }
}

/// Judges an error of a statement of the critical section.
fn judge_statement(ctx: &Ctx, op: &Op, pid: i32, error: &tokio_postgres::Error) {
    let code = error.code();
    let lost = error.is_closed()
        || code == Some(&SqlState::ADMIN_SHUTDOWN)
        || std::error::Error::source(error).is_some_and(|s| s.is::<std::io::Error>());
    if lost {
        ctx.tally.count("statement-error/connection-lost");
        if ctx.terminated(pid).is_none() {
            ctx.tally.violation(
                None,
                format!("{}: a statement found backend {pid}'s connection closed, which nobody terminated: {}", op.label(), describe(error)),
            );
        }
        return;
    }
    let name = code.map_or("no-code", |c| c.code());
    ctx.tally.count(format!("statement-error/{name}"));
    let message = format!(
        "{}: a statement in the critical section on backend {pid} failed: {}",
        op.label(),
        describe(error)
    );
    if op.path == Path::Dedicated
        && (code == Some(&SqlState::QUERY_CANCELED)
            || (code == Some(&SqlState::IN_FAILED_SQL_TRANSACTION)
                && op.scope == LockScope::Transaction))
    {
        // A late cancel request of the task's own abandoned wait on its dedicated session
        // (and the failed transaction it leaves): see `judge_error`.
        ctx.tally
            .count(format!("dedicated-late-cancel/statement/{name}"));
    } else if op.path.on_session() && code == Some(&SqlState::QUERY_CANCELED) {
        ctx.tally.violation(Some(STRAY_CANCEL), message);
    } else if op.path.on_session() && code == Some(&SqlState::IN_FAILED_SQL_TRANSACTION) {
        // A failed transaction on a session: another task's (issue 21, item 4) on a shared
        // one, or this guard's own, failed by a stray cancel.
        ctx.tally.violation(
            Some(if op.path.shared_connection() {
                SHARED_TXN
            } else {
                STRAY_CANCEL
            }),
            message,
        );
    } else {
        ctx.tally.violation(None, message);
    }
}

/// Where the key stands on the guard's connection: `(time, own holds, conflicting holds)`.
async fn check(
    guard: &AdvisoryLockGuard,
    shared: bool,
) -> Result<(std::time::SystemTime, i64, i64), tokio_postgres::Error> {
    let (classid, objid, subid) = AdvisoryLockGuard::key(guard).pg_locks_ids();
    let row = guard
        .query_one(
            CHECK_SQL,
            &[&i64::from(classid), &i64::from(objid), &subid, &shared],
        )
        .await?;
    Ok((row.get(0), row.get(1), row.get(2)))
}

/// The critical section: checks on the guard's own connection, a pause or a watched hold, an
/// injected panic, the interval recorded. Returns whether the section ran to its end.
async fn critical(ctx: &Ctx, op: &Op, held: &Held, holder: &str) -> bool {
    let guard = held.guard();
    let pid = AdvisoryLockGuard::backend_pid(guard);
    let key = AdvisoryLockGuard::key(guard);
    let known = op.shared_txn().then_some(SHARED_TXN);
    let verify = |stage: &str, own: i64, others: i64| {
        if own != 1 || others != 0 {
            ctx.tally.violation(
                known,
                format!(
                    "{} {holder}: at the {stage} of its critical section backend {pid} holds {key} {own} time(s) and {others} other backend(s) hold it in a conflicting mode (loss reported: {})",
                    op.label(),
                    AdvisoryLockGuard::is_lost(guard),
                ),
            );
        }
    };
    let (t0, own, others) = match check(guard, op.shared).await {
        Ok(found) => found,
        Err(error) => {
            judge_statement(ctx, op, pid, &error);
            return false;
        }
    };
    verify("start", own, others);
    ctx.tally.count("checks");
    if let Some(hold) = op.watch {
        let mut signal = AdvisoryLockGuard::loss_signal(guard);
        let id = ctx.id();
        ctx.faults
            .watched
            .lock()
            .unwrap()
            .entry(pid)
            .or_default()
            .push((id, signal.clone()));
        let lost = tokio::select! {
            reason = signal.lost() => Some(reason),
            () = tokio::time::sleep(hold) => None,
        };
        if let Some(entries) = ctx.faults.watched.lock().unwrap().get_mut(&pid) {
            entries.retain(|(other, _)| *other != id);
        }
        ctx.tally.count("watched-holds");
        if let Some(reason) = lost {
            judge_loss(ctx, op, pid, &reason);
            return false;
        }
    } else if !op.pause.is_zero() {
        tokio::time::sleep(op.pause).await;
    }
    if matches!(op.cancel, Cancel::Panic) {
        panic!("{INJECTED} in the critical section of {holder}");
    }
    let (t1, own, others) = match check(guard, op.shared).await {
        Ok(found) => found,
        Err(error) => {
            judge_statement(ctx, op, pid, &error);
            return false;
        }
    };
    verify("end", own, others);
    let label = op.label();
    let recorded = guard
        .execute(
            RECORD_SQL,
            &[
                &format!("{:06x}", ctx.plan.nonce),
                &key_value(key),
                &op.shared,
                &label,
                &holder,
                &t0,
                &t1,
            ],
        )
        .await;
    if let Err(error) = recorded {
        judge_statement(ctx, op, pid, &error);
        return false;
    }
    true
}

fn key_value(key: AdvisoryKey) -> i64 {
    match key {
        AdvisoryKey::Single(k) => k,
        other => panic!("soak keys are single: {other:?}"),
    }
}

/// Judges a loss seen by a watching holder.
fn judge_loss(ctx: &Ctx, op: &Op, pid: i32, reason: &LossReason) {
    ctx.tally.count(format!("loss/{}", loss_name(reason)));
    match ctx.terminated(pid) {
        Some(at) => {
            let latency = at.elapsed();
            let limit = HEALTH.detection_bound() * 2;
            ctx.tally.count("loss/after-termination");
            if latency > limit {
                ctx.tally.violation(
                    None,
                    format!("{}: backend {pid} terminated, loss ({reason}) seen after {latency:?}, beyond {limit:?}", op.label()),
                );
            }
            if !matches!(
                reason,
                LossReason::ConnectionClosed { .. } | LossReason::ProbeTimedOut { .. }
            ) {
                ctx.tally.violation(
                    None,
                    format!(
                        "{}: backend {pid} terminated, but the loss reason is {reason:?}",
                        op.label()
                    ),
                );
            }
        }
        None => match reason {
            // A probe queued behind a blocking wait or a statement of another task on the
            // same connection times out: documented (HealthCheck), not a lost lock.
            LossReason::ProbeTimedOut { .. } => ctx.tally.count("loss/unprovoked-probe-timeout"),
            // A late cancel of the task's own abandoned wait failed the transaction.
            LossReason::TransactionAborted if op.path == Path::Dedicated => {
                ctx.tally.count("dedicated-late-cancel/loss/TransactionAborted")
            }
            LossReason::TransactionAborted if op.path.on_session() => ctx.tally.violation(
                Some(if op.shared_txn() {
                    SHARED_TXN
                } else {
                    STRAY_CANCEL
                }),
                format!(
                    "{}: backend {pid}: the guard's transaction failed without a fault",
                    op.label()
                ),
            ),
            _ => ctx.tally.violation(
                op.shared_txn().then_some(SHARED_TXN),
                format!(
                    "{}: backend {pid} was not terminated, yet its lock was reported lost: {reason:?}",
                    op.label()
                ),
            ),
        },
    }
}

fn loss_name(reason: &LossReason) -> &'static str {
    match reason {
        LossReason::ConnectionClosed { .. } => "ConnectionClosed",
        LossReason::ProbeTimedOut { .. } => "ProbeTimedOut",
        LossReason::LockMissing => "LockMissing",
        LossReason::BackendChanged { .. } => "BackendChanged",
        LossReason::TransactionAborted => "TransactionAborted",
        LossReason::Released => "Released",
        _ => "other",
    }
}

/// Releases `held` as `op` says, judging the outcome.
async fn release(ctx: &Ctx, op: &Op, held: Held) {
    let result = match (held, op.release) {
        (Held::Cohort(guard), Release::Drop) => {
            drop(guard);
            Ok(())
        }
        (Held::Cohort(guard), _) => CohortGuard::unlock(guard).await,
        (Held::Guard(guard), Release::Drop) => {
            drop(guard);
            Ok(())
        }
        (Held::Guard(guard), Release::Unlock) => AdvisoryLockGuard::unlock(guard).await,
        (Held::Guard(guard), Release::Commit) => AdvisoryLockGuard::commit(guard).await,
        (Held::Guard(guard), Release::Rollback) => AdvisoryLockGuard::rollback(guard).await,
    };
    ctx.tally.count(format!("release/{:?}", op.release));
    if let Err(error) = result {
        judge_error(ctx, op, "release", &error);
    }
}

/// One operation, in a task of its own (so that it can be aborted or panic).
async fn operation(ctx: Arc<Ctx>, op: Op, target: Target, holder: String) {
    let acquisition = acquire(target, op);
    let outcome = tokio::time::timeout(STUCK, async {
        match op.cancel {
            Cancel::AfterPolls(n) => drop_after_polls(acquisition, n).await,
            Cancel::Timeout(d) => tokio::time::timeout(d, acquisition).await.ok(),
            _ => Some(acquisition.await),
        }
    })
    .await;
    let label = op.label();
    let Ok(outcome) = outcome else {
        // Every wait on a shared session polls, the set's included.
        let polls = op.polling || op.path.shared_connection();
        if polls {
            // A polling wait is unfair: the server grants each release to its queued waiters
            // first, so under contention a poller may wait this long.
            ctx.tally
                .count(format!("polling-gave-up-after-{}s", STUCK.as_secs()));
        } else {
            // Every hold ends within 1.2 s, and a deadlock is broken within a second, so a
            // queued wait this long waits for a key held by nobody: a leak, which the final
            // check reports.
            ctx.tally.violation(
                None,
                format!("{holder}: an acquisition of {label} waited {STUCK:?}: {op:?}"),
            );
        }
        return;
    };
    match outcome {
        None => ctx.tally.count("cancelled-acquisitions"),
        Some(Err(error)) => judge_error(&ctx, &op, "acquire", &error),
        Some(Ok(None)) => ctx.tally.count(format!("busy/{label}")),
        Some(Ok(Some(held))) => {
            ctx.tally.count(format!("granted/{label}"));
            let pid = AdvisoryLockGuard::backend_pid(held.guard());
            ctx.stage(&holder, format!("in its critical section on {pid}: {op:?}"));
            if critical(&ctx, &op, &held, &holder).await {
                ctx.stage(&holder, format!("releasing on {pid}: {op:?}"));
                release(&ctx, &op, held).await;
            }
        }
    }
    ctx.stage(&holder, format!("done: {op:?}"));
}

/// One worker: operations on `path` until the deadline.
async fn worker(ctx: Arc<Ctx>, path: Path, index: usize, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut session: Option<Arc<Session>> = None;
    let mut n = 0u64;
    let name = format!("{}{index}", path.name());
    while Instant::now() < ctx.deadline {
        let mut op = random_op(&mut rng, path);
        if op.shared_txn() && ctx.plan.allowed.contains(SHARED_TXN) {
            // With that defect tolerated, its fallout (other tasks' statements, unlocks
            // included, failing in the lock's failed transaction) is kept out of the run.
            op.scope = LockScope::Session;
            if matches!(op.release, Release::Commit | Release::Rollback) {
                op.release = Release::Unlock;
            }
        }
        let key = ctx.plan.key(op.key);
        let target = match path {
            Path::Pool => Target::Lock(AdvisoryLock::new(&ctx.pool, key).health_check(HEALTH)),
            Path::Dedicated => {
                let current = match session.take() {
                    Some(s) if !s.is_closed() => s,
                    // One task uses it: its waits queue on the server, transactions allowed.
                    _ => Arc::new(ctx.session().await.dedicated()),
                };
                session = Some(current.clone());
                Target::Lock(AdvisoryLock::new(current, key))
            }
            Path::Shared => {
                let slot = &ctx.shared[index % ctx.shared.len()];
                let current = slot.get();
                if current.is_closed() {
                    slot.replace(&current, ctx.session().await);
                    continue;
                }
                Target::Lock(AdvisoryLock::new(current, key))
            }
            Path::Cohort => Target::Cohort(ctx.cohorts[op.key as usize].clone()),
            Path::Set => {
                let current = ctx.set.get();
                if current.sessions().iter().any(|s| s.is_closed()) {
                    ctx.set.replace(&current, ctx.lock_set().await);
                    continue;
                }
                Target::Set(current, key)
            }
        };
        n += 1;
        let holder = format!("{}:{}{index}:{n}", ctx.process, path.name());
        ctx.tally.count(format!("ops/{}", path.name()));
        ctx.doing.lock().unwrap().insert(
            format!("{}{index}", path.name()),
            (format!("{holder} acquiring: {op:?}"), Instant::now()),
        );
        let task = tokio::spawn(operation(ctx.clone(), op, target, holder));
        match op.cancel {
            Cancel::Abort(after) => {
                tokio::time::sleep(after).await;
                task.abort();
                match task.await {
                    Err(e) if e.is_cancelled() => ctx.tally.count("aborted-tasks"),
                    Err(e) => ctx
                        .tally
                        .violation(None, format!("{}: task failed: {e}", op.label())),
                    Ok(()) => ctx.tally.count("abort-too-late"),
                }
            }
            _ => match task.await {
                Ok(()) => {}
                Err(e) if e.is_panic() => {
                    let payload = e.into_panic();
                    let text = payload
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                        .unwrap_or_default();
                    if text.contains(INJECTED) {
                        ctx.tally.count("injected-panics");
                    } else {
                        ctx.tally
                            .violation(None, format!("{}: task panicked: {text}", op.label()));
                    }
                }
                Err(e) => ctx
                    .tally
                    .violation(None, format!("{}: task failed: {e}", op.label())),
            },
        }
    }
    ctx.doing.lock().unwrap().remove(&name);
}

/// A task that runs its own statements on a shared session beside the lock tasks: none of them
/// may fail but through a terminated backend.
async fn bystander(ctx: Arc<Ctx>, index: usize) {
    while Instant::now() < ctx.deadline {
        let session = ctx.shared[index].get();
        if session.is_closed() {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        }
        ctx.tally.count("bystander-statements");
        if let Err(error) = session.query_one("SELECT pg_backend_pid()", &[]).await {
            if error.code() == Some(&SqlState::QUERY_CANCELED) {
                ctx.tally.violation(
                    Some(STRAY_CANCEL),
                    format!(
                        "a bystander's statement on a shared session was cancelled: {}",
                        describe(&error)
                    ),
                );
            } else if error.code() == Some(&SqlState::IN_FAILED_SQL_TRANSACTION) {
                // Pulled into a lock's failed transaction (issue 21, item 4).
                ctx.tally.violation(
                    Some(SHARED_TXN),
                    format!(
                        "a bystander's statement ran in another task's failed transaction: {}",
                        describe(&error)
                    ),
                );
            } else {
                ctx.tally.count("bystander-connection-lost");
            }
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
}

/// Terminates backends at random: mostly those of watching holders, sometimes any backend of
/// the run holding or awaiting a soak key.
async fn terminator(ctx: Arc<Ctx>, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    // Each process terminates its own backends, so that it knows which it ended.
    let app = ctx.db.app.clone();
    let (classid, _, _) = ctx.plan.key(0).pg_locks_ids();
    // Not in the last second, so that the final checks see settled losses.
    while Instant::now() + Duration::from_secs(1) < ctx.deadline {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(150..700))).await;
        let watched: Vec<(i32, Vec<LossSignal>)> = ctx
            .faults
            .watched
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(pid, v)| (*pid, v.iter().map(|(_, s)| s.clone()).collect()))
            .collect();
        let (pid, signals) = if !watched.is_empty() && rng.gen_bool(0.7) {
            watched[rng.gen_range(0..watched.len())].clone()
        } else {
            let rows = ctx
                .db
                .admin()
                .query(
                    "SELECT DISTINCT l.pid FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
                     WHERE l.locktype = 'advisory' AND l.classid = $1::int8::oid
                       AND a.application_name = $2",
                    &[&i64::from(classid), &app],
                )
                .await
                .unwrap();
            if rows.is_empty() {
                continue;
            }
            let pid: i32 = rows[rng.gen_range(0..rows.len())].get(0);
            (pid, Vec::new())
        };
        let at = Instant::now();
        ctx.faults.terminated.lock().unwrap().insert(pid, at);
        let done: bool = ctx
            .db
            .admin()
            .query_one("SELECT pg_terminate_backend($1)", &[&pid])
            .await
            .unwrap()
            .get(0);
        if !done {
            continue;
        }
        ctx.tally.count("terminations");
        // Every holder watching that backend sees the loss within the bound, unless it
        // released the lock first.
        for mut signal in signals {
            let ctx = ctx.clone();
            tokio::spawn(async move {
                let limit = HEALTH.detection_bound() * 2;
                match tokio::time::timeout(limit.saturating_sub(at.elapsed()), signal.lost()).await
                {
                    Ok(LossReason::Released) => ctx.tally.count("watched/released-first"),
                    Ok(reason) => ctx.tally.count(format!("watched/{}", loss_name(&reason))),
                    Err(_) => ctx.tally.violation(
                        None,
                        format!("backend {pid} terminated: its holder's loss signal silent after {limit:?}"),
                    ),
                }
            });
        }
    }
}

/// Non-injected panics seen by the panic hook (background tasks included).
static PANICS: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn install_panic_hook() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let text = info.to_string();
        if !text.contains(INJECTED) {
            PANICS.lock().unwrap().push(text);
            previous(info);
        }
    }));
}

/// Runs the workers of one process until the deadline; returns the context for the checks.
async fn run_process(plan: Plan, process: &'static str, first: bool) -> Arc<Ctx> {
    let db = TestDb::reopen(plan.app(process)).await;
    let url = format!("{}&connect_timeout=10", db.url());
    let pool = db.pool(if first { 6 } else { 3 });
    let cohort_pool = db.pool(if first { 3 } else { 2 });
    let cohorts = (0..KEYS)
        .map(|i| {
            CohortLock::new(AdvisoryLock::new(&cohort_pool, plan.key(i)).health_check(HEALTH))
                .max_handoffs(4)
        })
        .collect();
    let connect = || async {
        Session::connect(&url)
            .await
            .expect("connect a session")
            .with_health_check(HEALTH)
    };
    let shared = if first {
        vec![Slot::new(connect().await), Slot::new(connect().await)]
    } else {
        vec![Slot::new(connect().await)]
    };
    let set =
        LockSet::from_sessions(vec![Arc::new(connect().await), Arc::new(connect().await)]).unwrap();
    let ctx = Arc::new(Ctx {
        tally: Tally::new(plan.allowed.clone()),
        deadline: Instant::now() + Duration::from_secs(plan.secs),
        plan,
        process,
        db,
        url,
        faults: Faults::default(),
        pool,
        cohort_pool,
        cohorts,
        shared,
        set: Slot::new(set),
        next_id: Default::default(),
        doing: Mutex::default(),
    });
    let workers: &[(Path, usize)] = if first {
        &[
            (Path::Pool, 4),
            (Path::Dedicated, 2),
            (Path::Shared, 6),
            (Path::Cohort, 3),
            (Path::Set, 3),
        ]
    } else {
        &[
            (Path::Pool, 3),
            (Path::Dedicated, 1),
            (Path::Shared, 2),
            (Path::Cohort, 2),
            (Path::Set, 2),
        ]
    };
    let mut seeds = StdRng::seed_from_u64(ctx.plan.seed ^ u64::from(!first));
    let mut tasks = Vec::new();
    for &(path, n) in workers {
        for index in 0..n {
            tasks.push(tokio::spawn(worker(ctx.clone(), path, index, seeds.gen())));
        }
    }
    for index in 0..ctx.shared.len() {
        tasks.push(tokio::spawn(bystander(ctx.clone(), index)));
    }
    tasks.push(tokio::spawn(terminator(ctx.clone(), seeds.gen())));
    // Workers finish their last operation after the deadline: a blocking wait may last until a
    // deadlock is detected (1 s) or a holder's watched hold ends (1.2 s).
    let limit = Duration::from_secs(ctx.plan.secs + 30);
    for task in tasks {
        match tokio::time::timeout(limit, task).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => ctx.tally.violation(None, format!("a worker failed: {e}")),
            Err(_) => {
                dump(&ctx).await;
                panic!("a worker did not finish within {limit:?}")
            }
        }
    }
    ctx
}

/// What a run that hangs is doing: its workers, its backends, its locks.
async fn dump(ctx: &Ctx) {
    for (worker, (what, since)) in ctx.doing.lock().unwrap().iter() {
        eprintln!("SOAK-HUNG | {worker} for {:?}: {what}", since.elapsed());
    }
    let like = format!("pglock-soak-{:06x}-%", ctx.plan.nonce);
    let rows = ctx
        .db
        .admin()
        .query(
            "SELECT a.pid::text || ' ' || a.application_name || ' ' || coalesce(a.state, '') || ' '
                    || coalesce(a.wait_event_type, '') || ' ' || coalesce(a.wait_event, '') || ' ['
                    || a.query || '] locks: ' || coalesce((SELECT string_agg(l.objid::text || ' '
                    || l.mode || ' ' || l.granted::text, ', ') FROM pg_locks l
                    WHERE l.pid = a.pid AND l.locktype = 'advisory'), '')
             FROM pg_stat_activity a WHERE a.application_name LIKE $1",
            &[&like],
        )
        .await
        .unwrap();
    for row in rows {
        eprintln!("SOAK-HUNG | backend {}", row.get::<_, String>(0));
    }
    for (what, n) in ctx.tally.counts.lock().unwrap().iter() {
        eprintln!("SOAK-HUNG | {what} {n}");
    }
    for v in ctx.tally.violations.lock().unwrap().iter().take(40) {
        eprintln!("SOAK-HUNG | violation: {v}");
    }
}

/// Checks that no backend of this process holds or awaits a soak key once its workers ended
/// (the guards' releases finish in the background within a round trip or so).
async fn check_left(ctx: &Ctx) {
    let (classid, _, _) = ctx.plan.key(0).pg_locks_ids();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left: Vec<String> = ctx
            .db
            .admin()
            .query(
                "SELECT a.pid::text || ' ' || coalesce(a.state, '') || ' [' || a.query || '] '
                        || l.objid::text || ' ' || l.mode || ' ' || l.granted::text
                 FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
                 WHERE l.locktype = 'advisory' AND l.classid = $1::int8::oid
                   AND a.application_name = $2",
                &[&i64::from(classid), &ctx.db.app],
            )
            .await
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect();
        if left.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            ctx.tally.violation(
                None,
                format!(
                    "locks left by the {} process's backends: {left:?}",
                    ctx.process
                ),
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Checks what a process left: every pooled connection clean.
async fn check_pools(ctx: &Ctx) {
    for (name, pool) in [("pool", &ctx.pool), ("cohort pool", &ctx.cohort_pool)] {
        // Connections whose release is in flight come back to the pool within a round trip.
        let deadline = Instant::now() + Duration::from_secs(5);
        while pool.status().available < pool.status().size && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let size = pool.status().size;
        let mut objects = Vec::new();
        for _ in 0..size {
            match tokio::time::timeout(Duration::from_secs(5), pool.get()).await {
                Ok(Ok(object)) => objects.push(object),
                Ok(Err(error)) => ctx.tally.violation(
                    None,
                    format!("{name}: no connection from the pool at the end: {error}"),
                ),
                Err(_) => ctx.tally.violation(
                    None,
                    format!("{name}: a pooled connection never came back to the pool"),
                ),
            }
        }
        for object in &objects {
            if object.is_closed() {
                continue;
            }
            let pid: i32 = match object.query_one("SELECT pg_backend_pid()", &[]).await {
                Ok(row) => row.get(0),
                Err(error) => {
                    ctx.tally.violation(
                        None,
                        format!("{name}: a pooled connection failed a plain statement: {error}"),
                    );
                    continue;
                }
            };
            let row = ctx
                .db
                .admin()
                .query_one(
                    "SELECT state, (SELECT count(*) FROM pg_locks l WHERE l.pid = a.pid
                       AND l.locktype = 'advisory') FROM pg_stat_activity a WHERE a.pid = $1",
                    &[&pid],
                )
                .await
                .unwrap();
            let (state, locks): (String, i64) = (row.get(0), row.get(1));
            ctx.tally.count("pooled-connections-checked");
            if state != "idle" || locks != 0 {
                ctx.tally.violation(
                    None,
                    format!(
                        "{name}: pooled backend {pid} is {state:?} with {locks} advisory lock(s)"
                    ),
                );
            }
        }
    }
}

fn report(ctx: &Ctx) -> Vec<String> {
    for (what, n) in ctx.tally.counts.lock().unwrap().iter() {
        eprintln!("SOAK | {} | {what:<60} | {n:>8}", ctx.process);
    }
    ctx.tally.violations.lock().unwrap().clone()
}

/// The soak: this process, a second one (the binary again), the checks of both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak() {
    let plan = Plan::from_env();
    eprintln!(
        "SOAK | seed {} (PGLOCK_SOAK_SEED={}) | {} s (PGLOCK_SOAK_SECS) | keys {} + 0..{KEYS} | allowed known defects: {:?}",
        plan.seed, plan.seed, plan.secs, plan.key(0), plan.allowed
    );
    install_panic_hook();
    let admin = TestDb::reopen(plan.app("admin")).await;
    admin.admin().batch_execute(TABLE_SQL).await.unwrap();
    let peer = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args(["soak::soak_peer", "--exact", "--ignored", "--nocapture"])
        .env(PEER_ENV, plan.encode())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the second process");
    let ctx = run_process(plan.clone(), "first", true).await;
    check_left(&ctx).await;
    let peer = tokio::time::timeout(Duration::from_secs(plan.secs + 60), peer.wait_with_output())
        .await
        .expect("the second process finished")
        .unwrap();
    let peer_output =
        String::from_utf8_lossy(&peer.stderr).into_owned() + &String::from_utf8_lossy(&peer.stdout);
    for line in peer_output.lines().filter(|l| l.starts_with("SOAK |")) {
        eprintln!("{line}");
    }
    let mut violations = Vec::new();
    if !peer.status.success() {
        violations.push(format!(
            "the second process failed ({}):\n{peer_output}",
            peer.status
        ));
    }

    // Nothing left in pg_locks for the run's keys, from any backend.
    let (classid, _, _) = plan.key(0).pg_locks_ids();
    let keys: Vec<i64> = (0..KEYS)
        .map(|i| i64::from(plan.key(i).pg_locks_ids().1))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left: i64 = admin
            .admin()
            .query_one(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'
                 AND classid = $1::int8::oid AND objid::int8 = ANY($2)",
                &[&i64::from(classid), &keys],
            )
            .await
            .unwrap()
            .get(0);
        if left == 0 {
            break;
        }
        if Instant::now() > deadline {
            let holders: Vec<String> = admin
                .admin()
                .query(
                    "SELECT a.pid::text || ' ' || a.application_name || ' ' || coalesce(a.state, '')
                            || ' [' || a.query || '] ' || l.objid::text || ' ' || l.mode || ' '
                            || l.granted::text
                     FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
                     WHERE l.locktype = 'advisory' AND l.classid = $1::int8::oid
                       AND l.objid::int8 = ANY($2)",
                    &[&i64::from(classid), &keys],
                )
                .await
                .unwrap()
                .iter()
                .map(|row| row.get(0))
                .collect();
            violations.push(format!(
                "{left} advisory lock(s) left on the soak's keys: {holders:?}"
            ));
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    check_pools(&ctx).await;

    // No two intervals of a key overlap, unless both shared.
    let run = format!("{:06x}", plan.nonce);
    let overlaps = admin
        .admin()
        .query(
            "SELECT s.key, s.holder, s.path, s.t0::text,
                    (SELECT string_agg(o.holder || ' ' || o.path, ', ') FROM pglock_soak_intervals o
                     WHERE o.run = s.run AND o.key = s.key AND o.id <> s.id
                       AND o.t0 < s.t1 AND s.t0 < o.t1 AND NOT (o.shared AND s.shared))
             FROM (SELECT *, max(t1) OVER w AS before_any,
                          max(t1) FILTER (WHERE NOT shared) OVER w AS before_exclusive
                   FROM pglock_soak_intervals WHERE run = $1
                   WINDOW w AS (PARTITION BY key ORDER BY t0, id
                                ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)) s
             WHERE (NOT s.shared AND s.t0 < s.before_any) OR (s.shared AND s.t0 < s.before_exclusive)
             LIMIT 50",
            &[&run],
        )
        .await
        .unwrap();
    for row in &overlaps {
        let (path, with): (String, Option<String>) = (row.get(2), row.get(4));
        let with = with.unwrap_or_default();
        let known = (path.starts_with("shared-session/txn") || with.contains("shared-session/txn"))
            .then_some(SHARED_TXN);
        ctx.tally.violation(
            known,
            format!(
                "overlap on key {}: {} ({path}) from {} overlaps {with}",
                row.get::<_, i64>(0),
                row.get::<_, String>(1),
                row.get::<_, String>(3),
            ),
        );
    }
    let intervals: i64 = admin
        .admin()
        .query_one(
            "SELECT count(*) FROM pglock_soak_intervals WHERE run = $1",
            &[&run],
        )
        .await
        .unwrap()
        .get(0);
    admin
        .admin()
        .execute("DELETE FROM pglock_soak_intervals WHERE run = $1", &[&run])
        .await
        .unwrap();
    for panic in PANICS.lock().unwrap().iter() {
        let known = panic
            .contains("resumed after completion")
            .then_some(BACKGROUND_PANIC);
        ctx.tally
            .violation(known, format!("a panic that was not injected: {panic}"));
    }
    violations.extend(report(&ctx));
    eprintln!(
        "SOAK | total | operations of the first process {} | intervals recorded (both processes) {intervals} | seed {}",
        ctx.tally.get("ops/pool")
            + ctx.tally.get("ops/dedicated-session")
            + ctx.tally.get("ops/shared-session")
            + ctx.tally.get("ops/cohort")
            + ctx.tally.get("ops/lock-set"),
        plan.seed
    );
    assert!(intervals > 0, "no critical section recorded its interval");
    assert!(
        violations.is_empty(),
        "the soak (PGLOCK_SOAK_SEED={}) found {} problem(s):\n{}",
        plan.seed,
        violations.len(),
        violations.join("\n")
    );
}

/// The soak's second process: run by `soak` (this binary again, with `PGLOCK_SOAK_PEER`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the second process of `soak`, which runs it"]
async fn soak_peer() {
    let Ok(encoded) = std::env::var(PEER_ENV) else {
        eprintln!("soak_peer runs only as the second process of soak");
        return;
    };
    let plan = Plan::decode(&encoded);
    install_panic_hook();
    let ctx = run_process(plan, "second", false).await;
    check_left(&ctx).await;
    check_pools(&ctx).await;
    for panic in PANICS.lock().unwrap().iter() {
        let known = panic
            .contains("resumed after completion")
            .then_some(BACKGROUND_PANIC);
        ctx.tally
            .violation(known, format!("a panic that was not injected: {panic}"));
    }
    let violations = report(&ctx);
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}
