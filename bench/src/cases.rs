//! The measured cases, grouped by the scenarios of issue 5.

use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use futures_util::stream::{FuturesUnordered, StreamExt};
use pglock::{
    AdvisoryLock, AdvisoryLockGuard, CohortLock, ConnectionSource, LockSet, Semaphore, Session,
};
use tokio_postgres::{Client, NoTls, Statement};

use crate::alloc::live_bytes;

/// One measurement: `ops` operations in `elapsed`, the client CPU they took, and named extra
/// figures.
pub struct Sample {
    pub ops: u64,
    pub elapsed: Duration,
    /// This process's CPU time (all threads) over the same span as `elapsed`: the measured
    /// loop only, without the case's setup and teardown.
    pub cpu: Duration,
    pub extra: Vec<(&'static str, f64)>,
}

/// Wall-clock and process CPU time since a case's measured loop started.
pub struct Stopwatch {
    wall: Instant,
    cpu: Duration,
}

/// What a [`Stopwatch`] read when stopped.
#[derive(Clone, Copy)]
pub struct Measured {
    wall: Duration,
    cpu: Duration,
}

impl Stopwatch {
    fn start() -> Self {
        Stopwatch {
            wall: Instant::now(),
            cpu: cpu_time(),
        }
    }

    fn started_at(&self) -> Instant {
        self.wall
    }

    fn elapsed(&self) -> Duration {
        self.wall.elapsed()
    }

    fn stop(&self) -> Measured {
        Measured {
            wall: self.wall.elapsed(),
            cpu: cpu_time() - self.cpu,
        }
    }
}

/// CPU time used by this process so far.
fn cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

impl Sample {
    pub fn rate(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }

    fn new(ops: u64, measured: Measured) -> Self {
        Sample {
            ops,
            elapsed: measured.wall,
            cpu: measured.cpu,
            extra: Vec::new(),
        }
    }

    fn with(mut self, name: &'static str, value: f64) -> Self {
        self.extra.push((name, value));
        self
    }
}

type Run = for<'a> fn(&'a Env, Duration) -> Pin<Box<dyn Future<Output = Sample> + Send + 'a>>;

pub struct Case {
    pub id: &'static str,
    pub scenario: &'static str,
    /// The case this one is divided by, in the same round.
    pub baseline: Option<&'static str>,
    /// The target for that ratio.
    pub target: Option<f64>,
    pub run: Run,
    /// Measured in the first round only (a slow, absolute measurement, not a ratio).
    pub once: bool,
}

macro_rules! case {
    ($id:literal, $scenario:literal, $baseline:expr, $target:expr, $f:path) => {
        Case {
            id: $id,
            scenario: $scenario,
            baseline: $baseline,
            target: $target,
            run: |env, d| Box::pin($f(env, d)),
            once: false,
        }
    };
    (once $id:literal, $scenario:literal, $f:path) => {
        Case {
            id: $id,
            scenario: $scenario,
            baseline: None,
            target: None,
            run: |env, d| Box::pin($f(env, d)),
            once: true,
        }
    };
}

/// Scenario 5's sizes.
const HELD_KEYS: usize = 10_000;
const SINGLE_FLIGHT_KEYS: usize = 2_000;
const SHARED_SESSIONS: usize = 8;
const PIPELINE_DEPTH: usize = 64;

pub static CASES: &[Case] = &[
    case!("select_1", "0 round trip", None, None, select_1),
    case!(
        "raw_lock_unlock",
        "1 uncontended",
        Some("select_1"),
        None,
        raw_lock_unlock
    ),
    case!(
        "raw_with_checking_sql",
        "1 uncontended",
        Some("raw_lock_unlock"),
        None,
        raw_with_checking_sql
    ),
    case!(
        "pglock_session_checking_lock_unlock",
        "1 uncontended",
        Some("raw_lock_unlock"),
        None,
        session_checking_lock_unlock
    ),
    case!(
        "sqlx_lock_release",
        "1 uncontended",
        Some("raw_lock_unlock"),
        None,
        sqlx_lock_release
    ),
    case!(
        "pglock_session_lock_unlock",
        "1 uncontended",
        Some("raw_lock_unlock"),
        Some(0.95),
        session_lock_unlock
    ),
    case!(
        "pglock_pool_lock_unlock",
        "1 uncontended",
        Some("raw_lock_unlock"),
        Some(0.95),
        pool_lock_unlock
    ),
    case!(
        "raw_lock_pipelined_unlock",
        "2 lock+drop",
        Some("raw_lock_unlock"),
        None,
        raw_lock_pipelined_unlock
    ),
    case!(
        "raw_pipelined_with_checking_sql",
        "2 lock+drop",
        Some("raw_lock_unlock"),
        None,
        raw_pipelined_with_checking_sql
    ),
    case!(
        "raw_lock_combined_unlock",
        "2 lock+drop",
        Some("raw_lock_unlock"),
        None,
        raw_lock_combined_unlock
    ),
    case!(
        "pglock_session_lock_drop",
        "2 lock+drop",
        Some("raw_lock_unlock"),
        Some(1.8),
        session_lock_drop
    ),
    case!(
        "pglock_pool_lock_drop",
        "2 lock+drop",
        Some("raw_lock_unlock"),
        Some(1.8),
        pool_lock_drop
    ),
    case!(
        "raw_contended_8",
        "3 contended 8x8",
        None,
        None,
        raw_contended_8
    ),
    case!(
        "raw_contended_8_with_checking_sql",
        "3 contended 8x8",
        Some("raw_contended_8"),
        None,
        raw_contended_8_with_checking_sql
    ),
    case!(
        "pglock_pool_contended_8",
        "3 contended 8x8",
        Some("raw_contended_8"),
        Some(0.95),
        pool_contended_8
    ),
    case!(
        "pglock_session_contended_8",
        "3 contended 8x8",
        Some("raw_contended_8"),
        Some(0.95),
        session_contended_8
    ),
    case!(
        "pglock_shared_session_contended_8",
        "3 contended 8x8",
        Some("raw_contended_8"),
        None,
        shared_session_contended_8
    ),
    case!(
        "pglock_pool4_1000_tasks",
        "4 1000 tasks",
        Some("raw_contended_8"),
        None,
        pool4_1000_tasks
    ),
    case!(
        "pglock_cohort_pool4_1000_tasks",
        "4 1000 tasks",
        Some("raw_contended_8"),
        Some(10.0),
        cohort_1000_tasks
    ),
    case!(
        "raw_try_lock_single_flight",
        "5 held keys",
        None,
        None,
        raw_try_lock_single_flight
    ),
    case!(
        "pglock_session_try_lock_single_flight",
        "5 held keys",
        Some("raw_try_lock_single_flight"),
        None,
        session_try_lock_single_flight
    ),
    case!(
        "pglock_lockset8_try_lock_pipelined",
        "5 held keys",
        Some("pglock_session_try_lock_single_flight"),
        Some(3.0),
        lockset_try_lock_pipelined
    ),
    case!(
        "pglock_pool_semaphore_8_on_3",
        "8 semaphore",
        Some("pglock_pool_contended_8"),
        None,
        pool_semaphore_8_on_3
    ),
    case!(once "pglock_semaphore_waiter_statements", "8 semaphore", semaphore_waiter_statements),
    case!(once "pglock_semaphore_handover_latency", "8 semaphore", semaphore_handover_latency),
    case!(once "pglock_loss_probes_10k_held", "6 loss probes", loss_probes),
    case!(once "pglock_probe_cost_10k_elsewhere", "7 probe cost", probe_cost),
];

/// A plain tokio-postgres client with the statements a fair baseline prepares once.
pub(crate) struct Raw {
    pub(crate) client: Client,
    pub(crate) select_1: Statement,
    pub(crate) lock: Statement,
    pub(crate) unlock: Statement,
    try_lock: Statement,
}

impl Raw {
    pub(crate) async fn connect(url: &str) -> Raw {
        let client = connect(url).await;
        let select_1 = client.prepare("SELECT 1").await.unwrap();
        let lock = client
            .prepare("SELECT pg_advisory_lock($1::int8)")
            .await
            .unwrap();
        let unlock = client
            .prepare("SELECT pg_advisory_unlock($1::int8)")
            .await
            .unwrap();
        let try_lock = client
            .prepare("SELECT pg_try_advisory_lock($1::int8)")
            .await
            .unwrap();
        Raw {
            client,
            select_1,
            lock,
            unlock,
            try_lock,
        }
    }
}

/// What every case shares: the URL, a key allocator, and an administrative connection (for
/// waiting until releases are done). Each sample opens its own connections: PostgreSQL's
/// backends land on whichever core the kernel picks, and a connection whose backend shares the
/// client's core answers at a different speed than one that does not, so connections kept for
/// the whole run would bias each case by where its backends happened to land. Fresh
/// connections per sample turn that into noise, which the medians absorb.
pub struct Env {
    pub url: String,
    admin: Client,
    key_base: i64,
    next_key: AtomicU64,
}

async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.expect("connect");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

pub(crate) fn pool(url: &str, size: usize) -> Pool {
    let config: tokio_postgres::Config = url.parse().expect("DATABASE_URL");
    let manager = Manager::from_config(
        config,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(size)
        .wait_timeout(Some(Duration::from_secs(60)))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .unwrap()
}

fn random_i64() -> i64 {
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish() as i64
}

impl Env {
    pub async fn connect() -> Env {
        let base = std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
        let sep = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{sep}application_name=pglock-bench");
        // Keys in a random 2^40 window, so that concurrent runs do not collide.
        let key_base = random_i64() & !((1 << 40) - 1);
        Env {
            admin: connect(&url).await,
            url,
            key_base,
            next_key: AtomicU64::new(0),
        }
    }

    async fn raw(&self) -> Raw {
        Raw::connect(&self.url).await
    }

    /// A session whose statements are already prepared.
    async fn session(&self) -> Arc<Session> {
        warmed(Session::connect(&self.url).await.unwrap(), self.key()).await
    }

    /// A session that never drops its per-statement checks (as behind a pooler), its
    /// statements prepared.
    async fn checking_session(&self) -> Arc<Session> {
        let session = Session::connect(&self.url).await.unwrap();
        warmed(session.always_check_backend(), self.key()).await
    }

    /// A pool of `size` connections, all open and with pglock's statements prepared (in
    /// pglock's memory of each connection, the checking and the plain ones) and verified.
    async fn pool(&self, size: usize) -> Pool {
        let pool = pool(&self.url, size);
        let source = ConnectionSource::from(&pool);
        let keys = self.keys(size);
        for _ in 0..2 {
            let guards =
                futures_util::future::join_all(keys.iter().map(|k| async {
                    AdvisoryLock::new(source.clone(), *k).lock().await.unwrap()
                }))
                .await;
            for guard in guards {
                AdvisoryLockGuard::unlock(guard).await.unwrap();
            }
        }
        pool
    }

    /// A key no other case (or sample) of this run uses.
    fn key(&self) -> i64 {
        self.key_base + self.next_key.fetch_add(1, Ordering::Relaxed) as i64
    }

    /// `n` consecutive fresh keys.
    fn keys(&self, n: usize) -> Vec<i64> {
        let first = self.next_key.fetch_add(n as u64, Ordering::Relaxed) as i64;
        (0..n as i64).map(|i| self.key_base + first + i).collect()
    }

    /// Waits until the server has processed every release of the bench (releases on drop are
    /// confirmed in the background), so that the next case starts at rest.
    async fn wait_released(&self) {
        self.wait_no_locks().await;
        settle().await;
    }

    /// Waits until the server shows no advisory lock of the bench's sessions.
    async fn wait_no_locks(&self) {
        loop {
            let left: i64 = self
                .admin
                .query_one(
                    "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)
                     WHERE l.locktype = 'advisory' AND a.application_name = 'pglock-bench'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            if left == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    pub async fn cleanup(&self) {
        let left: i64 = self
            .admin
            .query_one(
                "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)
                 WHERE l.locktype = 'advisory' AND a.application_name = 'pglock-bench'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if left != 0 {
            eprintln!("warning: {left} advisory locks still held by the bench at the end");
        }
    }
}

async fn select_1(env: &Env, d: Duration) -> Sample {
    let raw = env.raw().await;
    let start = Stopwatch::start();
    let mut ops = 0;
    while start.elapsed() < d {
        raw.client.query_one(&raw.select_1, &[]).await.unwrap();
        ops += 1;
    }
    Sample::new(ops, start.stop())
}

async fn raw_lock_unlock(env: &Env, d: Duration) -> Sample {
    let raw = &env.raw().await;
    let key = env.key();
    let start = Stopwatch::start();
    let mut ops = 0;
    while start.elapsed() < d {
        raw.client.query_one(&raw.lock, &[&key]).await.unwrap();
        raw.client.query_one(&raw.unlock, &[&key]).await.unwrap();
        ops += 1;
    }
    Sample::new(ops, start.stop())
}

/// A session after two locks of `key`: the first verifies the connection as direct (and
/// prepares the plain statements), the second runs them.
async fn warmed(session: Session, key: i64) -> Arc<Session> {
    let session = Arc::new(session);
    for _ in 0..2 {
        let guard = AdvisoryLock::new(&session, key).lock().await.unwrap();
        AdvisoryLockGuard::unlock(guard).await.unwrap();
    }
    session
}

/// pglock's checking session-lock statements for an `int8` key (what it sends on a connection
/// it has not verified as direct, such as one through a pooler), prepared by hand.
struct PglockStatements {
    lock: Statement,
    unlock: Statement,
}

impl PglockStatements {
    async fn prepare(client: &Client) -> Self {
        let lock = client
            .prepare(
                "SELECT CASE WHEN pg_is_in_recovery() THEN NULL ELSE \
                 pg_advisory_lock($1::int8) IS NOT NULL END, pg_backend_pid()",
            )
            .await
            .unwrap();
        let unlock = client
            .prepare(
                "SELECT CASE WHEN pg_backend_pid() = $2::int4 THEN pg_advisory_unlock($1::int8) END, \
                 pg_backend_pid()",
            )
            .await
            .unwrap();
        PglockStatements { lock, unlock }
    }
}

/// Diagnostic: the raw loop, sending pglock's checking statements (the standby check and
/// backend pid on the lock, the release guarded by the backend pid that was granted the lock),
/// which pglock sends on a connection it has not verified as direct. Shows what the checks
/// cost the server. (On a verified connection pglock sends the plain statements of
/// `raw_lock_unlock`.)
async fn raw_with_checking_sql(env: &Env, d: Duration) -> Sample {
    let raw = env.raw().await;
    let client = &raw.client;
    let PglockStatements { lock, unlock } = PglockStatements::prepare(client).await;
    let key = env.key();
    let start = Stopwatch::start();
    let mut ops = 0;
    while start.elapsed() < d {
        let row = client.query_one(&lock, &[&key]).await.unwrap();
        let pid: i32 = row.get(1);
        client.query_one(&unlock, &[&key, &pid]).await.unwrap();
        ops += 1;
    }
    Sample::new(ops, start.stop())
}

async fn sqlx_lock_release(env: &Env, d: Duration) -> Sample {
    use sqlx::postgres::{PgAdvisoryLock, PgAdvisoryLockKey};
    let mut conn = <sqlx::postgres::PgConnection as sqlx::Connection>::connect(&env.url)
        .await
        .expect("sqlx connect");
    let lock = PgAdvisoryLock::with_key(PgAdvisoryLockKey::BigInt(env.key()));
    // sqlx prepares on first use: do it before the clock starts.
    lock.acquire(&mut conn)
        .await
        .unwrap()
        .release_now()
        .await
        .unwrap();
    let start = Stopwatch::start();
    let mut ops = 0;
    while start.elapsed() < d {
        let guard = lock.acquire(&mut conn).await.unwrap();
        guard.release_now().await.unwrap();
        ops += 1;
    }
    Sample::new(ops, start.stop())
}

async fn lock_unlock(lock: AdvisoryLock, d: Duration) -> Sample {
    let start = Stopwatch::start();
    let mut ops = 0;
    while start.elapsed() < d {
        let guard = lock.lock().await.unwrap();
        AdvisoryLockGuard::unlock(guard).await.unwrap();
        ops += 1;
    }
    Sample::new(ops, start.stop())
}

async fn session_lock_unlock(env: &Env, d: Duration) -> Sample {
    lock_unlock(AdvisoryLock::new(&env.session().await, env.key()), d).await
}

/// Diagnostic: pglock on a session that keeps the checking statements, as behind a pooler.
async fn session_checking_lock_unlock(env: &Env, d: Duration) -> Sample {
    lock_unlock(
        AdvisoryLock::new(&env.checking_session().await, env.key()),
        d,
    )
    .await
}

async fn pool_lock_unlock(env: &Env, d: Duration) -> Sample {
    lock_unlock(AdvisoryLock::new(&env.pool(2).await, env.key()), d).await
}

/// The wire's limit for scenario 2: the unlock of one cycle travels with the lock of the next.
async fn raw_lock_pipelined_unlock(env: &Env, d: Duration) -> Sample {
    let raw = &env.raw().await;
    let key = env.key();
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&key];
    let start = Stopwatch::start();
    raw.client.query_one(&raw.lock, &params).await.unwrap();
    let mut ops = 1;
    while start.elapsed() < d {
        let unlock = raw.client.query_one(&raw.unlock, &params);
        let lock = raw.client.query_one(&raw.lock, &params);
        let (u, l) = futures_util::future::join(unlock, lock).await;
        u.unwrap();
        l.unwrap();
        ops += 1;
    }
    let elapsed = start.stop();
    raw.client.query_one(&raw.unlock, &params).await.unwrap();
    Sample::new(ops, elapsed)
}

async fn raw_pipelined_with_checking_sql(env: &Env, d: Duration) -> Sample {
    let raw = &env.raw().await;
    let client = &raw.client;
    let PglockStatements { lock, unlock } = PglockStatements::prepare(client).await;
    let key = env.key();
    let start = Stopwatch::start();
    let row = client.query_one(&lock, &[&key]).await.unwrap();
    let mut pid: i32 = row.get(1);
    let mut ops = 1;
    while start.elapsed() < d {
        let unlock_params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&key, &pid];
        let lock_params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&key];
        let u = client.query_one(&unlock, &unlock_params);
        let l = client.query_one(&lock, &lock_params);
        let (u, l) = futures_util::future::join(u, l).await;
        u.unwrap();
        pid = l.unwrap().get(1);
        ops += 1;
    }
    let elapsed = start.stop();
    client.query_one(&unlock, &[&key, &pid]).await.unwrap();
    Sample::new(ops, elapsed)
}

/// The plain combined statement pglock sends in a `lock` + drop loop on a verified connection:
/// the unlock of one cycle, then the lock of the next.
pub(crate) const PLAIN_COMBINED: &str = "SELECT pg_advisory_lock($1::int8) IS NOT NULL, \
     u.released FROM (SELECT pg_advisory_unlock($1::int8) AS released OFFSET 0) AS u";

/// The wire's limit for scenario 2 as pglock reaches it: the unlock of one cycle and the lock
/// of the next in one statement, the plain combined statement pglock sends on a verified
/// connection.
async fn raw_lock_combined_unlock(env: &Env, d: Duration) -> Sample {
    let raw = &env.raw().await;
    let client = &raw.client;
    let combined = client.prepare(PLAIN_COMBINED).await.unwrap();
    let key = env.key();
    let start = Stopwatch::start();
    client.query_one(&raw.lock, &[&key]).await.unwrap();
    let mut ops = 1;
    while start.elapsed() < d {
        let row = client.query_one(&combined, &[&key]).await.unwrap();
        let released: Option<bool> = row.get(1);
        assert_eq!(released, Some(true));
        ops += 1;
    }
    let elapsed = start.stop();
    client.query_one(&raw.unlock, &[&key]).await.unwrap();
    Sample::new(ops, elapsed)
}

async fn lock_drop(lock: AdvisoryLock, d: Duration) -> Sample {
    let start = Stopwatch::start();
    let mut ops = 0;
    while start.elapsed() < d {
        drop(lock.lock().await.unwrap());
        ops += 1;
    }
    let elapsed = start.stop();
    // Let the last release finish before the next case.
    while lock.try_lock().await.unwrap().is_none() {
        tokio::task::yield_now().await;
    }
    Sample::new(ops, elapsed)
}

async fn session_lock_drop(env: &Env, d: Duration) -> Sample {
    lock_drop(AdvisoryLock::new(&env.session().await, env.key()), d).await
}

async fn pool_lock_drop(env: &Env, d: Duration) -> Sample {
    lock_drop(AdvisoryLock::new(&env.pool(2).await, env.key()), d).await
}

/// Spawns `tasks` tasks running `task_loop(task, deadline)`, each of which returns how many
/// times it acquired the lock and its longest wait; sums and maxes them.
async fn contended<F, Fut>(tasks: usize, d: Duration, task_loop: F) -> Sample
where
    F: Fn(usize, Instant) -> Fut,
    Fut: Future<Output = (u64, Duration)> + Send + 'static,
{
    let start = Stopwatch::start();
    let deadline = start.started_at() + d;
    let handles: Vec<_> = (0..tasks)
        .map(|task| tokio::spawn(task_loop(task, deadline)))
        .collect();
    let mut ops = 0;
    let mut max_wait = Duration::ZERO;
    for handle in handles {
        let (n, wait) = handle.await.unwrap();
        ops += n;
        max_wait = max_wait.max(wait);
    }
    Sample::new(ops, start.stop()).with("max_wait_us", max_wait.as_secs_f64() * 1e6)
}

async fn raw_contended_8(env: &Env, d: Duration) -> Sample {
    let key = env.key();
    let mut raw8 = Vec::new();
    for _ in 0..8 {
        raw8.push(Arc::new(env.raw().await));
    }
    contended(8, d, |task, deadline| {
        let raw = raw8[task].clone();
        async move {
            let (mut ops, mut max_wait) = (0, Duration::ZERO);
            while Instant::now() < deadline {
                let asked = Instant::now();
                raw.client.query_one(&raw.lock, &[&key]).await.unwrap();
                max_wait = max_wait.max(asked.elapsed());
                raw.client.query_one(&raw.unlock, &[&key]).await.unwrap();
                ops += 1;
            }
            (ops, max_wait)
        }
    })
    .await
}

/// Diagnostic: the raw contended loop, sending pglock's checking statements (see
/// `raw_with_checking_sql`), to show what the checks cost the server under contention.
async fn raw_contended_8_with_checking_sql(env: &Env, d: Duration) -> Sample {
    let key = env.key();
    let mut raw8 = Vec::new();
    for _ in 0..8 {
        let raw = env.raw().await;
        let statements = PglockStatements::prepare(&raw.client).await;
        raw8.push(Arc::new((raw, statements)));
    }
    contended(8, d, |task, deadline| {
        let raw = raw8[task].clone();
        async move {
            let (client, statements) = (&raw.0.client, &raw.1);
            let (mut ops, mut max_wait) = (0, Duration::ZERO);
            while Instant::now() < deadline {
                let asked = Instant::now();
                let row = client.query_one(&statements.lock, &[&key]).await.unwrap();
                max_wait = max_wait.max(asked.elapsed());
                let pid: i32 = row.get(1);
                client
                    .query_one(&statements.unlock, &[&key, &pid])
                    .await
                    .unwrap();
                ops += 1;
            }
            (ops, max_wait)
        }
    })
    .await
}

async fn lock_loop(lock: AdvisoryLock, deadline: Instant) -> (u64, Duration) {
    let (mut ops, mut max_wait) = (0, Duration::ZERO);
    while Instant::now() < deadline {
        let asked = Instant::now();
        let guard = lock.lock().await.unwrap();
        max_wait = max_wait.max(asked.elapsed());
        AdvisoryLockGuard::unlock(guard).await.unwrap();
        ops += 1;
    }
    (ops, max_wait)
}

async fn pool_contended_8(env: &Env, d: Duration) -> Sample {
    let lock = AdvisoryLock::new(&env.pool(8).await, env.key());
    contended(8, d, |_, deadline| lock_loop(lock.clone(), deadline)).await
}

/// Eight tasks, each on a session of its own, declared dedicated (one task uses it), so that
/// waits queue in the server as on a pool.
async fn session_contended_8(env: &Env, d: Duration) -> Sample {
    sessions_contended_8(env, d, true).await
}

/// The same on shared sessions (the default), whose waits poll: no target, it shows what
/// declaring a session per task dedicated is worth.
async fn shared_session_contended_8(env: &Env, d: Duration) -> Sample {
    sessions_contended_8(env, d, false).await
}

async fn sessions_contended_8(env: &Env, d: Duration, dedicated: bool) -> Sample {
    let key = env.key();
    let mut sessions8 = Vec::new();
    for _ in 0..8 {
        let session = Session::connect(&env.url).await.unwrap();
        let session = if dedicated {
            session.dedicated()
        } else {
            session
        };
        sessions8.push(warmed(session, key).await);
    }
    contended(8, d, |task, deadline| {
        lock_loop(AdvisoryLock::new(&sessions8[task], key), deadline)
    })
    .await
}

/// Eight tasks on a pool of 8, each taking one of a semaphore's 3 slots and releasing it in a
/// loop: the slot hand-over rate, against `pglock_pool_contended_8` (8 tasks, one lock) in the
/// same round. `max_wait_us` is the longest wait for a slot.
async fn pool_semaphore_8_on_3(env: &Env, d: Duration) -> Sample {
    let pool = env.pool(8).await;
    let semaphore = Semaphore::new(&pool, &format!("bench-{}", env.key()), 3);
    contended(8, d, |_, deadline| {
        let semaphore = semaphore.clone();
        async move {
            let (mut ops, mut max_wait) = (0, Duration::ZERO);
            while Instant::now() < deadline {
                let asked = Instant::now();
                let permit = semaphore.acquire().await.unwrap();
                max_wait = max_wait.max(asked.elapsed());
                permit.release().await.unwrap();
                ops += 1;
            }
            (ops, max_wait)
        }
    })
    .await
}

/// What waiters cost the server while every slot stays busy: 3 slots held, 5 tasks waiting
/// (the head searching on the server, 4 queued behind it), the statements their backends
/// start in 5 s, counted from `pg_stat_activity` (each statement changes `query_start`) sampled
/// every 2 ms. The rate is statements per second for all five waiters together.
async fn semaphore_waiter_statements(env: &Env, _: Duration) -> Sample {
    let pool = env.pool(8).await;
    let semaphore = Semaphore::new(&pool, &format!("bench-{}", env.key()), 3);
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(semaphore.acquire().await.unwrap());
    }
    let waiters: Vec<_> = (0..5)
        .map(|_| {
            let semaphore = semaphore.clone();
            tokio::spawn(async move { semaphore.acquire().await.map(drop) })
        })
        .collect();
    let gate = semaphore.gate_key().pg_locks_ids();
    let gate = (i64::from(gate.0), i64::from(gate.1), gate.2);
    // The waiters' backends: the head holds the gate, the others wait for it.
    let pids: Vec<i32> = loop {
        let pids: Vec<i32> = env
            .admin
            .query(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND classid = $1::int8::oid
                 AND objid = $2::int8::oid AND objsubid = $3",
                &[&gate.0, &gate.1, &gate.2],
            )
            .await
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect();
        if pids.len() == 5 {
            break pids;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let window = Duration::from_secs(5);
    let start = Stopwatch::start();
    let mut seen: std::collections::HashSet<(i32, String)> = std::collections::HashSet::new();
    let mut first = 0;
    while start.elapsed() < window {
        let rows = env
            .admin
            .query(
                "SELECT pid, query_start::text FROM pg_stat_activity WHERE pid = ANY($1)",
                &[&pids],
            )
            .await
            .unwrap();
        for row in rows {
            seen.insert((row.get(0), row.get(1)));
        }
        if first == 0 {
            first = seen.len();
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let measured = start.stop();
    drop(held);
    for waiter in waiters {
        waiter.await.unwrap().unwrap();
    }
    // The statements in progress at the first sample started before the window.
    Sample::new((seen.len() - first) as u64, measured).with("waiters", 5.0)
}

/// How soon a freed slot goes to the waiter at the head of the queue: one slot, held; a waiter
/// searching on the server; the holder releases (`release().await` returns at `t0`) and the
/// waiter's `acquire` returns at `t1`. 50 hand-overs; the rate is hand-overs per second of
/// latency (1 / mean), the extras the median, 90th percentile and largest latency.
async fn semaphore_handover_latency(env: &Env, _: Duration) -> Sample {
    let pool = env.pool(4).await;
    let semaphore = Semaphore::new(&pool, &format!("bench-{}", env.key()), 1);
    let gate = semaphore.gate_key().pg_locks_ids();
    let gate = (i64::from(gate.0), i64::from(gate.1), gate.2);
    let mut latencies = Vec::new();
    let start = Stopwatch::start();
    let mut held = semaphore.acquire().await.unwrap();
    for _ in 0..50 {
        let waiter = {
            let semaphore = semaphore.clone();
            tokio::spawn(async move {
                let permit = semaphore.acquire().await.unwrap();
                (Instant::now(), permit)
            })
        };
        // The waiter holds the gate: it is searching on the server.
        loop {
            let n: i64 = env
                .admin
                .query_one(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted
                     AND classid = $1::int8::oid AND objid = $2::int8::oid AND objsubid = $3",
                    &[&gate.0, &gate.1, &gate.2],
                )
                .await
                .unwrap()
                .get(0);
            if n == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // Somewhere in the search's 5 ms pause.
        tokio::time::sleep(Duration::from_millis(
            random_i64().rem_euclid(5) as u64 + 20,
        ))
        .await;
        held.release().await.unwrap();
        let released = Instant::now();
        let (granted, permit) = waiter.await.unwrap();
        latencies.push(granted.saturating_duration_since(released));
        held = permit;
    }
    let measured = start.stop();
    drop(held);
    latencies.sort();
    let total: Duration = latencies.iter().sum();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    Sample {
        ops: latencies.len() as u64,
        elapsed: total,
        cpu: measured.cpu,
        extra: Vec::new(),
    }
    .with("p50_us", us(latencies[latencies.len() / 2]))
    .with("p90_us", us(latencies[latencies.len() * 9 / 10]))
    .with("max_us", us(latencies[latencies.len() - 1]))
}

/// 1,000 tasks of this process on a pool of 4, plain `AdvisoryLock`: each waiting task takes a
/// pooled connection into the server's queue, the rest wait for the pool.
async fn pool4_1000_tasks(env: &Env, d: Duration) -> Sample {
    let lock = AdvisoryLock::new(&env.pool(4).await, env.key());
    contended(1000, d, |_, deadline| {
        let lock = lock.clone();
        async move {
            let (mut ops, mut max_wait) = (0, Duration::ZERO);
            while Instant::now() < deadline {
                let asked = Instant::now();
                let guard = lock.lock().await.unwrap();
                max_wait = max_wait.max(asked.elapsed());
                drop(guard);
                ops += 1;
            }
            (ops, max_wait)
        }
    })
    .await
}

/// 1,000 tasks through a [`CohortLock`] on a pool of 4, while a second process contends for
/// the same key.
async fn cohort_1000_tasks(env: &Env, d: Duration) -> Sample {
    let key = env.key();
    let lock = CohortLock::new(AdvisoryLock::new(&env.pool(4).await, key));
    let contender = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "contender",
            &env.url,
            &key.to_string(),
            &d.as_millis().to_string(),
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn the contender");
    let mut sample = contended(1000, d, |_, deadline| {
        let lock = lock.clone();
        async move {
            let (mut ops, mut max_wait) = (0, Duration::ZERO);
            while Instant::now() < deadline {
                let asked = Instant::now();
                let guard = lock.lock().await.unwrap();
                max_wait = max_wait.max(asked.elapsed());
                drop(guard);
                ops += 1;
            }
            (ops, max_wait)
        }
    })
    .await;
    let out = contender.wait_with_output().await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut fields = text
        .split_whitespace()
        .map(|f| f.parse::<f64>().unwrap_or(f64::NAN));
    let acquired = fields.next().unwrap_or(f64::NAN);
    let wait = fields.next().unwrap_or(f64::NAN);
    sample.extra.push(("other_process_locks", acquired));
    sample.extra.push(("max_other_process_wait_us", wait));
    sample
}

/// The second process of scenario 4: `contender URL KEY MILLIS`. Loops lock + unlock on a
/// plain connection for MILLIS ms and prints `acquisitions max_wait_us`.
pub async fn contender_main(args: &[String]) {
    let url = &args[0];
    let key: i64 = args[1].parse().unwrap();
    let millis: u64 = args[2].parse().unwrap();
    let raw = Raw::connect(url).await;
    let deadline = Instant::now() + Duration::from_millis(millis);
    let (mut ops, mut max_wait) = (0u64, Duration::ZERO);
    while Instant::now() < deadline {
        let asked = Instant::now();
        raw.client.query_one(&raw.lock, &[&key]).await.unwrap();
        max_wait = max_wait.max(asked.elapsed());
        raw.client.query_one(&raw.unlock, &[&key]).await.unwrap();
        ops += 1;
        // Contend steadily, not in a tight loop that would starve the other side by itself.
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    println!("{ops} {}", max_wait.as_secs_f64() * 1e6);
}

async fn raw_try_lock_single_flight(env: &Env, _: Duration) -> Sample {
    let raw = &env.raw().await;
    let keys = env.keys(SINGLE_FLIGHT_KEYS);
    let start = Stopwatch::start();
    for key in &keys {
        let got: bool = raw
            .client
            .query_one(&raw.try_lock, &[key])
            .await
            .unwrap()
            .get(0);
        assert!(got);
    }
    let elapsed = start.stop();
    raw.client
        .batch_execute("SELECT pg_advisory_unlock_all()")
        .await
        .unwrap();
    Sample::new(keys.len() as u64, elapsed)
}

async fn session_try_lock_single_flight(env: &Env, _: Duration) -> Sample {
    let session = env.session().await;
    let keys = env.keys(SINGLE_FLIGHT_KEYS);
    let mut guards = Vec::with_capacity(keys.len());
    let start = Stopwatch::start();
    for key in &keys {
        let guard = AdvisoryLock::new(&session, *key)
            .try_lock()
            .await
            .unwrap()
            .expect("free key");
        guards.push(guard);
    }
    let elapsed = start.stop();
    drop(guards);
    env.wait_released().await;
    Sample::new(keys.len() as u64, elapsed)
}

/// Lets background tasks (releases, connection tasks) finish their current work.
async fn settle() {
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// 10,000 keys taken at once through a fresh [`LockSet`] of 8 sessions, all requests in
/// flight together. Heap bytes per held lock, from live bytes measured at rest: `held` is what
/// holding costs (while holding, minus after every release), `peak` adds what the burst of
/// requests grew in the connections' buffers and kept for reuse (while holding, minus before).
/// `release_all_ms`: from dropping every guard to the server showing none held.
async fn lockset_try_lock_pipelined(env: &Env, _: Duration) -> Sample {
    let keys = env.keys(HELD_KEYS);
    let set = LockSet::connect(&env.url, SHARED_SESSIONS).await.unwrap();
    settle().await;
    let before = live_bytes();
    let start = Stopwatch::start();
    let mut guards = Vec::with_capacity(keys.len());
    // At most PIPELINE_DEPTH requests in flight per session: deeper queues add no speed, only
    // driver buffers.
    let mut pending = FuturesUnordered::new();
    for key in &keys {
        if pending.len() == PIPELINE_DEPTH * SHARED_SESSIONS {
            let result: pglock::Result<Option<AdvisoryLockGuard>> =
                pending.next().await.expect("in flight");
            guards.push(result.unwrap().expect("free key"));
        }
        pending.push(set.try_lock(*key));
    }
    while let Some(result) = pending.next().await {
        guards.push(result.unwrap().expect("free key"));
    }
    drop(pending);
    let elapsed = start.stop();
    assert_eq!(set.held(), keys.len());
    settle().await;
    let holding = live_bytes();
    // Dropping every guard at once: until the server shows none of them (within the few
    // milliseconds a look at pg_locks takes with 10,000 entries).
    let releasing = Instant::now();
    drop(guards);
    env.wait_no_locks().await;
    let release_all_ms = releasing.elapsed().as_secs_f64() * 1e3;
    settle().await;
    let after = live_bytes();
    drop(set);
    let n = keys.len() as f64;
    Sample::new(keys.len() as u64, elapsed)
        .with("heap_bytes_per_held_lock", (holding - after) as f64 / n)
        .with("heap_bytes_per_lock_peak", (holding - before) as f64 / n)
        .with(
            "guard_size_bytes",
            std::mem::size_of::<AdvisoryLockGuard>() as f64,
        )
        .with("release_all_ms", release_all_ms)
}

/// Scenario 6: 10,000 held locks on 8 sessions, every guard watched for loss
/// (`loss_signal`), for a few probe intervals. Counts the statements each backend runs
/// (distinct `pg_stat_activity.query_start` of finished statements, sampled every 2 ms: the
/// sessions are otherwise idle, so every statement is a probe) and their server-side duration, and this process's
/// CPU. `ops` is the number of probes.
async fn loss_probes(env: &Env, _: Duration) -> Sample {
    use std::collections::{HashMap, HashSet};
    let keys = env.keys(HELD_KEYS);
    let set = LockSet::connect(&env.url, SHARED_SESSIONS).await.unwrap();
    let mut guards = Vec::with_capacity(keys.len());
    let mut pending = FuturesUnordered::new();
    for key in &keys {
        if pending.len() == PIPELINE_DEPTH * SHARED_SESSIONS {
            let result: pglock::Result<Option<AdvisoryLockGuard>> =
                pending.next().await.expect("in flight");
            guards.push(result.unwrap().expect("free key"));
        }
        pending.push(set.try_lock(*key));
    }
    while let Some(result) = pending.next().await {
        guards.push(result.unwrap().expect("free key"));
    }
    drop(pending);
    let pids: Vec<i32> = {
        let mut pids: Vec<i32> = guards.iter().map(AdvisoryLockGuard::backend_pid).collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    };
    let signals: Vec<_> = guards.iter().map(AdvisoryLockGuard::loss_signal).collect();
    // Let the first probes (sent at once by the first `loss_signal`) finish.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let window = Duration::from_secs(3);
    let mut seen: HashMap<i32, HashSet<String>> = HashMap::new();
    let mut longest = 0f64;
    let mut total_ms = 0f64;
    let mut finished: HashSet<(i32, String)> = HashSet::new();
    let mut before_window: HashSet<(i32, String)> = HashSet::new();
    let mut first_sample = true;
    // The CPU includes the sampling queries: an upper bound on what watching costs.
    let start = Stopwatch::start();
    while start.elapsed() < window {
        let rows = env
            .admin
            .query(
                "SELECT pid, query_start::text, state, \
                 (extract(epoch FROM state_change - query_start) * 1000)::float8 \
                 FROM pg_stat_activity WHERE pid = ANY($1)",
                &[&pids],
            )
            .await
            .unwrap();
        for row in rows {
            let pid: i32 = row.get(0);
            let started: Option<String> = row.get(1);
            let state: Option<String> = row.get(2);
            let Some(started) = started else { continue };
            seen.entry(pid).or_default().insert(started.clone());
            if first_sample {
                // Statements that finished before the window do not count.
                before_window.insert((pid, started.clone()));
            }
            if state.as_deref() == Some("idle")
                && !before_window.contains(&(pid, started.clone()))
                && finished.insert((pid, started))
            {
                let ms: f64 = row.get::<_, Option<f64>>(3).unwrap_or(0.0);
                longest = longest.max(ms);
                total_ms += ms;
            }
        }
        first_sample = false;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = start.stop();
    assert!(signals.iter().all(|s| !s.is_lost()), "no lock may be lost");
    // Every statement ends idle for most of an interval, so each one is seen idle exactly
    // once with its own `query_start`.
    let probes = finished.len();
    let _ = &seen;
    let intervals =
        elapsed.wall.as_secs_f64() / pglock::HealthCheck::default().interval.as_secs_f64();
    drop(signals);
    drop(guards);
    env.wait_released().await;
    drop(set);
    Sample::new(probes as u64, elapsed)
        .with(
            "probes_per_connection_per_interval",
            probes as f64 / pids.len() as f64 / intervals,
        )
        .with("connections", pids.len() as f64)
        .with("watched_locks", keys.len() as f64)
        .with(
            "probe_server_ms_mean",
            total_ms / finished.len().max(1) as f64,
        )
        .with("max_probe_server_ms", longest)
        .with(
            "client_cpu_ms_per_s_watching",
            elapsed.cpu.as_secs_f64() * 1e3 / elapsed.wall.as_secs_f64(),
        )
}

/// Scenario 7's sizes: the locks another session holds, the probe interval, and the window
/// over which the backends' CPU is read.
const LOCKS_ELSEWHERE: i64 = 10_000;
const PROBE_EVERY: Duration = Duration::from_millis(5);
const PROBE_COST_WINDOW: Duration = Duration::from_secs(10);

/// The CPU time the server process `pid` has used so far, from `/proc/PID/schedstat`
/// (nanoseconds on the CPU); `None` when the server is not on this machine.
fn backend_cpu(pid: i32) -> Option<Duration> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/schedstat")).ok()?;
    let ns: u64 = text.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(ns))
}

/// The full probe as the loss monitor sends it, for one key (its cost is that of
/// `pg_lock_status()`, which copies the whole lock table).
const FULL_PROBE: &str = "SELECT pg_backend_pid(), \
     coalesce(array_agg(h.n) FILTER (WHERE l.pid IS NULL), '{}')::int8[] \
     FROM unnest($1::int8[], $2::int2[], $3::bool[]) WITH ORDINALITY AS h(key, subid, shared, n) \
     LEFT JOIN pg_lock_status() AS l \
     ON l.locktype = 'advisory' AND l.pid = pg_backend_pid() AND l.granted \
     AND l.classid = ((h.key >> 32) & 4294967295)::oid \
     AND l.objid = (h.key & 4294967295)::oid \
     AND l.objsubid = h.subid \
     AND l.mode = CASE WHEN h.shared THEN 'ShareLock' ELSE 'ExclusiveLock' END";

/// Scenario 7: another session holds 10,000 advisory locks; a watched guard's connection
/// (`HealthCheck` interval 5 ms) and a plain session running a prepared `SELECT 1` every 5 ms
/// run side by side for 10 s, and the server CPU of both backends is read from
/// `/proc/PID/schedstat` over the same window (after the watched lock's first probe, which is
/// the full one). `ops` is the number of `SELECT 1`s. Also: the server CPU of one full probe
/// (the loss monitor's lock-table check) with the same table, over 20 of them.
async fn probe_cost(env: &Env, _: Duration) -> Sample {
    let keys = env.keys(LOCKS_ELSEWHERE as usize + 1);
    let holder = connect(&env.url).await;
    let held: i64 = holder
        .query_one(
            "SELECT count(pg_advisory_lock(k)) FROM generate_series($1::int8, $1::int8 + $2::int8 - 1) AS k",
            &[&keys[0], &LOCKS_ELSEWHERE],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(held, LOCKS_ELSEWHERE);
    let health = pglock::HealthCheck::new(PROBE_EVERY, Duration::from_secs(1));
    let session = Arc::new(Session::connect(&env.url).await.unwrap());
    let guard = AdvisoryLock::new(session.clone(), keys[LOCKS_ELSEWHERE as usize])
        .health_check(health)
        .lock()
        .await
        .unwrap();
    let watched_pid = AdvisoryLockGuard::backend_pid(&guard);
    let signal = AdvisoryLockGuard::loss_signal(&guard);
    let plain = Raw::connect(&env.url).await;
    let plain_pid: i32 = plain
        .client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    // The first probe (the full one, with the server's keepalive settings) is not counted.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (Some(watched_0), Some(plain_0)) = (backend_cpu(watched_pid), backend_cpu(plain_pid))
    else {
        eprintln!("7 probe cost: the server's backends are not on this machine; skipped");
        return Sample::new(0, Stopwatch::start().stop());
    };
    let start = Stopwatch::start();
    let mut ticks = tokio::time::interval(PROBE_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ops = 0u64;
    while start.elapsed() < PROBE_COST_WINDOW {
        ticks.tick().await;
        plain.client.query_one(&plain.select_1, &[]).await.unwrap();
        ops += 1;
    }
    let watched_cpu = backend_cpu(watched_pid).unwrap() - watched_0;
    let plain_cpu = backend_cpu(plain_pid).unwrap() - plain_0;
    let elapsed = start.stop();
    assert!(!signal.is_lost(), "{:?}", signal.reason());
    // One full probe's server CPU, against the same table.
    let full = plain.client.prepare(FULL_PROBE).await.unwrap();
    let key = vec![keys[0]];
    let (subid, shared) = (vec![1i16], vec![false]);
    plain
        .client
        .query_one(&full, &[&key, &subid, &shared])
        .await
        .unwrap();
    let before = backend_cpu(plain_pid).unwrap();
    const FULL_PROBES: u32 = 20;
    for _ in 0..FULL_PROBES {
        plain
            .client
            .query_one(&full, &[&key, &subid, &shared])
            .await
            .unwrap();
    }
    let full_cpu = (backend_cpu(plain_pid).unwrap() - before) / FULL_PROBES;
    drop(signal);
    AdvisoryLockGuard::unlock(guard).await.unwrap();
    drop(session);
    drop(holder);
    env.wait_released().await;
    let per_s = |cpu: Duration| cpu.as_secs_f64() * 1e3 / elapsed.wall.as_secs_f64();
    Sample::new(ops, elapsed)
        .with("locks_held_elsewhere", LOCKS_ELSEWHERE as f64)
        .with("interval_ms", PROBE_EVERY.as_secs_f64() * 1e3)
        .with("watched_server_cpu_ms_per_s", per_s(watched_cpu))
        .with("select_1_server_cpu_ms_per_s", per_s(plain_cpu))
        .with(
            "watched_over_select_1",
            watched_cpu.as_secs_f64() / plain_cpu.as_secs_f64(),
        )
        .with("full_probe_server_ms", full_cpu.as_secs_f64() * 1e3)
}
