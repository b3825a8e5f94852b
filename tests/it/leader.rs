//! Leader election: one leader at a time, fast graceful handover, strictly increasing terms,
//! takeover after the leader's backend is terminated, and no write accepted from a stale term.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use pglock::{
    AdvisoryLock, Error, HealthCheck, LeaderElection, LeaderState, TermTable, WaitStrategy,
};
use rand::{Rng, SeedableRng};

use crate::harness::TestDb;
use crate::support::TcpProxy;

/// A health check quick enough for tests: loss is reported within 500 ms (`max(interval, probe_timeout) + probe_timeout`).
fn fast_health() -> HealthCheck {
    HealthCheck {
        interval: Duration::from_millis(100),
        probe_timeout: Duration::from_millis(250),
    }
}

/// A leadership name no other test uses.
fn unique_name(test: &str) -> String {
    format!("{test}-{:016x}", rand::thread_rng().gen::<u64>())
}

fn election(pool: &Pool, name: &str, instance: usize) -> LeaderElection {
    LeaderElection::new(pool, name)
        .health_check(fast_health())
        .retry_backoff(Duration::from_millis(20), Duration::from_millis(200))
        .identity(format!("instance {instance}"))
}

/// The term the table records for `name` now.
async fn recorded_term(db: &TestDb, name: &str) -> Option<i64> {
    db.admin()
        .query_opt(
            "SELECT term FROM pglock_leader_terms WHERE name = $1",
            &[&name],
        )
        .await
        .unwrap()
        .map(|row| row.get(0))
}

#[tokio::test]
async fn exactly_one_leader_among_contenders() {
    let db = TestDb::new("leader_one").await;
    let name = unique_name("one");
    let contenders = 6;
    let active = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let terms = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..contenders {
        let pool = db.pool(2);
        let (name, active, most, terms) =
            (name.clone(), active.clone(), most.clone(), terms.clone());
        tasks.push(tokio::spawn(async move {
            let election = election(&pool, &name, i);
            // Each contender leads twice, so leaderships alternate between instances.
            for _ in 0..2 {
                election
                    .run(|leader| {
                        let (active, most, terms) = (active.clone(), most.clone(), terms.clone());
                        async move {
                            let now = active.fetch_add(1, Ordering::SeqCst) + 1;
                            most.fetch_max(now, Ordering::SeqCst);
                            terms.lock().unwrap().push(leader.term());
                            tokio::time::sleep(Duration::from_millis(30)).await;
                            active.fetch_sub(1, Ordering::SeqCst);
                        }
                    })
                    .await
                    .unwrap();
                assert_eq!(election.state(), LeaderState::Follower);
            }
        }));
    }
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .expect("every contender leads in time")
            .unwrap();
    }
    assert_eq!(most.load(Ordering::SeqCst), 1, "two leaders at once");
    let terms = terms.lock().unwrap().clone();
    assert_eq!(terms.len(), 2 * contenders);
    assert!(
        terms.windows(2).all(|w| w[0] < w[1]),
        "terms not strictly increasing in leadership order: {terms:?}"
    );
    assert_eq!(recorded_term(&db, &name).await, terms.last().copied());
    db.assert_no_locks().await;
}

#[tokio::test]
async fn graceful_step_down_hands_over_at_once() {
    let db = TestDb::new("leader_step_down").await;
    let name = unique_name("step-down");
    // A health check so slow that a takeover by timeout would take 10 s.
    let slow = HealthCheck {
        interval: Duration::from_secs(10),
        probe_timeout: Duration::from_secs(5),
    };
    let (pool_a, pool_b) = (db.pool(2), db.pool(2));
    let a = LeaderElection::new(&pool_a, &name).health_check(slow);
    let b = Arc::new(LeaderElection::new(&pool_b, &name).health_check(slow));
    let mut b_state = b.subscribe();

    let leadership = a.campaign().await.unwrap();
    let first = leadership.term();
    assert_eq!(a.state(), LeaderState::Leader { term: first });
    let standby = tokio::spawn({
        let b = b.clone();
        async move { b.campaign().await }
    });
    db.wait_for_waiters(a.lock_key(), 1, Duration::from_secs(5))
        .await;

    let started = Instant::now();
    leadership.step_down().await.unwrap();
    assert_eq!(a.state(), LeaderState::Follower);
    let taken = standby.await.unwrap().unwrap();
    let handover = started.elapsed();
    assert!(
        handover < slow.interval,
        "the standby waited {handover:?}, as for a timeout"
    );
    assert_eq!(taken.term(), first + 1);
    b_state
        .wait_for(|state| *state == LeaderState::Leader { term: first + 1 })
        .await
        .unwrap();

    // Dropping the leadership steps down as well, just as fast.
    let again = tokio::spawn(async move {
        let leadership = a.campaign().await.unwrap();
        let term = leadership.term();
        leadership.step_down().await.unwrap();
        term
    });
    db.wait_for_waiters(b.lock_key(), 1, Duration::from_secs(5))
        .await;
    let started = Instant::now();
    drop(taken);
    assert_eq!(b.state(), LeaderState::Follower);
    let term = tokio::time::timeout(Duration::from_secs(5), again)
        .await
        .expect("the drop handed over")
        .unwrap();
    assert!(started.elapsed() < slow.interval);
    assert_eq!(term, first + 2);
    db.assert_no_locks().await;
}

#[tokio::test]
async fn terms_increase_across_restarts() {
    let db = TestDb::new("leader_restart").await;
    let name = unique_name("restart");
    let mut last = 0;
    for instance in 0..4 {
        // A new pool and election object each time, as after a process restart.
        let pool = db.pool(1);
        let election = election(&pool, &name, instance);
        let leadership = election.campaign().await.unwrap();
        assert!(
            leadership.term() > last,
            "{} after {last}",
            leadership.term()
        );
        last = leadership.term();
        let row = db
            .admin()
            .query_one(
                "SELECT term, leader FROM pglock_leader_terms WHERE name = $1",
                &[&name],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, i64>(0), last);
        assert_eq!(row.get::<_, String>(1), format!("instance {instance}"));
        if instance % 2 == 0 {
            leadership.step_down().await.unwrap();
        } else {
            drop(leadership);
        }
        drop(election);
        pool.close();
    }
    db.assert_no_locks().await;
}

#[tokio::test]
async fn terminated_leader_stops_and_standby_takes_over() {
    let db = TestDb::new("leader_terminated").await;
    let name = unique_name("terminated");
    let (pool_a, pool_b) = (db.pool(2), db.pool(2));
    let a = Arc::new(election(&pool_a, &name, 0));
    let b = Arc::new(election(&pool_b, &name, 1));
    let key = a.lock_key();

    // Which instance runs its task now, and in which term.
    let running: Arc<std::sync::Mutex<Vec<(usize, i64, bool)>>> = Default::default();
    let spawn = |instance: usize, election: Arc<LeaderElection>| {
        let running = running.clone();
        tokio::spawn(async move {
            election
                .run(|leader| {
                    let running = running.clone();
                    async move {
                        running
                            .lock()
                            .unwrap()
                            .push((instance, leader.term(), true));
                        // Marks the task stopped when the run loop drops it.
                        struct Stopped(Arc<std::sync::Mutex<Vec<(usize, i64, bool)>>>, usize, i64);
                        impl Drop for Stopped {
                            fn drop(&mut self) {
                                self.0.lock().unwrap().push((self.1, self.2, false));
                            }
                        }
                        let _stopped = Stopped(running, instance, leader.term());
                        std::future::pending::<()>().await
                    }
                })
                .await
        })
    };
    let run_a = spawn(0, a.clone());
    let mut a_state = a.subscribe();
    let first = a_state
        .wait_for(LeaderState::is_leader)
        .await
        .unwrap()
        .term()
        .unwrap();
    let run_b = spawn(1, b.clone());
    db.wait_for_waiters(key, 1, Duration::from_secs(5)).await;

    let leader_pid = db.holders(key).await[0];
    let fault = Instant::now();
    db.terminate(leader_pid).await;
    a_state.wait_for(|state| !state.is_leader()).await.unwrap();
    let detected = fault.elapsed();
    let mut b_state = b.subscribe();
    let second = tokio::time::timeout(
        Duration::from_secs(5),
        b_state.wait_for(LeaderState::is_leader),
    )
    .await
    .expect("the standby takes over")
    .unwrap()
    .term()
    .unwrap();
    assert!(second > first);
    assert!(
        detected < Duration::from_secs(2),
        "loss detected after {detected:?}"
    );
    // A's task was stopped; A campaigns again and now waits behind B.
    db.wait_for_waiters(key, 1, Duration::from_secs(5)).await;
    {
        let running = running.lock().unwrap();
        assert!(running.contains(&(0, first, false)), "{running:?}");
        assert!(running.contains(&(1, second, true)), "{running:?}");
    }
    run_a.abort();
    run_b.abort();
    let _ = run_a.await;
    let _ = run_b.await;
    db.assert_no_locks().await;
}

#[tokio::test]
async fn term_table_is_created_once_under_concurrent_first_use() {
    let db = TestDb::new("leader_ddl_race").await;
    let table = format!("pglock_terms_race_{:08x}", rand::thread_rng().gen::<u32>());
    let pool = db.pool(12);
    let barrier = Arc::new(tokio::sync::Barrier::new(12));
    let mut tasks = Vec::new();
    for i in 0..12 {
        let (pool, table, barrier) = (pool.clone(), table.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            // Different names: every contender leads, so all of them create the table at once.
            let election = LeaderElection::new(&pool, format!("ddl-{i}"))
                .term_table(TermTable::new(table).in_schema("public"));
            barrier.wait().await;
            let leadership = election.campaign().await?;
            let term = leadership.term();
            leadership.step_down().await?;
            Ok::<_, Error>(term)
        }));
    }
    // Each name's first term: the first of the server's timeline (`(timeline << 32) + 1`).
    let timeline: i64 = db
        .admin()
        .query_one(
            "SELECT ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int8",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap(), (timeline << 32) + 1);
    }
    db.admin()
        .batch_execute(&format!("DROP TABLE public.\"{table}\""))
        .await
        .unwrap();
    db.assert_no_locks().await;
}

#[tokio::test]
async fn term_table_problems_are_typed_errors() {
    let db = TestDb::new("leader_table_errors").await;
    let name = unique_name("errors");
    // A read-only connection cannot create the table: a typed error, and no lock is left.
    let read_only = {
        let url = format!(
            "{}&options=-c%20default_transaction_read_only%3Don",
            db.url()
        );
        let config: tokio_postgres::Config = url.parse().unwrap();
        let manager = deadpool_postgres::Manager::new(config, tokio_postgres::NoTls);
        Pool::builder(manager).max_size(1).build().unwrap()
    };
    let missing = TermTable::new(format!(
        "pglock_missing_{:08x}",
        rand::thread_rng().gen::<u32>()
    ));
    let error = LeaderElection::new(&read_only, &name)
        .term_table(missing.clone())
        .campaign()
        .await
        .unwrap_err();
    assert!(matches!(error, Error::TermTable { .. }), "{error:?}");
    assert_eq!(
        error.code(),
        Some(&tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION)
    );
    // `run` does not retry what retrying cannot fix.
    let error = tokio::time::timeout(
        Duration::from_secs(5),
        LeaderElection::new(&read_only, &name)
            .term_table(missing)
            .run(|_| async {}),
    )
    .await
    .expect("run gives up")
    .unwrap_err();
    assert!(matches!(error, Error::TermTable { .. }), "{error:?}");

    let pool = db.pool(1);
    let error = LeaderElection::new(&pool, &name)
        .term_table(TermTable::new("x".repeat(64)))
        .campaign()
        .await
        .unwrap_err();
    assert!(matches!(error, Error::Config(_)), "{error:?}");
    db.assert_no_locks().await;
}

#[tokio::test]
async fn one_leadership_per_election_and_no_stacking_on_a_session() {
    let db = TestDb::new("leader_no_stack").await;
    let name = unique_name("no-stack");
    let pool = db.pool(3);
    let election = election(&pool, &name, 0);
    let leadership = election.campaign().await.unwrap();
    // A second campaign of the same instance does not take the lock a second time.
    assert!(election.try_campaign().await.unwrap().is_none());
    assert!(
        tokio::time::timeout(Duration::from_millis(200), election.campaign())
            .await
            .is_err(),
        "a second leadership of one instance"
    );
    assert_eq!(db.holders(election.lock_key()).await.len(), 1);
    leadership.step_down().await.unwrap();

    // On a shared session that already holds the key, the campaign never stacks it: it waits
    // in-process for the guard to go.
    let session = db.session().await;
    let held = AdvisoryLock::new(session.clone(), election.lock_key())
        .lock()
        .await
        .unwrap();
    let on_session =
        LeaderElection::new(session.clone(), &name).wait_strategy(WaitStrategy::poll());
    assert!(
        tokio::time::timeout(Duration::from_millis(200), on_session.run(|_| async {}))
            .await
            .is_err(),
        "the campaign waits while the session holds the key"
    );
    assert_eq!(db.holders(election.lock_key()).await.len(), 1);
    pglock::AdvisoryLockGuard::unlock(held).await.unwrap();
    let leadership = tokio::time::timeout(Duration::from_secs(5), on_session.campaign())
        .await
        .unwrap()
        .unwrap();
    assert!(session.holds(election.lock_key()));
    leadership.step_down().await.unwrap();
    assert!(!session.holds(election.lock_key()));
    db.assert_no_locks().await;
}

/// A resource that accepts a write only with the current term of its leadership, as
/// `docs/leader-election.md` describes, and records every accepted write in order.
#[derive(Clone)]
struct FencedTable {
    table: String,
    name: String,
}

impl FencedTable {
    async fn create(db: &TestDb, name: &str) -> Self {
        let table = format!("pglock_test_fenced_{:08x}", rand::thread_rng().gen::<u32>());
        db.admin()
            .batch_execute(&format!(
                "CREATE TABLE {table} (id bigserial PRIMARY KEY, term bigint NOT NULL, \
                 instance int NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp())"
            ))
            .await
            .unwrap();
        FencedTable {
            table,
            name: name.to_owned(),
        }
    }

    /// The term-guarded write: `FOR SHARE` on the term row makes the check and the insert one
    /// step with respect to a new leader's term update, which waits for it (or is waited for
    /// and then seen). `Ok(false)` when the term is stale.
    async fn write(
        &self,
        client: &tokio_postgres::Client,
        term: i64,
        instance: i32,
    ) -> Result<bool, tokio_postgres::Error> {
        let sql = format!(
            "WITH fence AS (SELECT term FROM pglock_leader_terms WHERE name = $1 FOR SHARE) \
             INSERT INTO {} (term, instance) SELECT $2, $3 FROM fence WHERE fence.term = $2 \
             RETURNING id",
            self.table
        );
        Ok(client
            .query_opt(&sql, &[&self.name, &term, &instance])
            .await?
            .is_some())
    }

    /// Accepted writes whose term is older than that of a write accepted before them.
    async fn stale_accepted(&self, db: &TestDb) -> i64 {
        db.admin()
            .query_one(
                &format!(
                    "SELECT count(*) FROM {t} f WHERE EXISTS \
                     (SELECT 1 FROM {t} g WHERE g.id < f.id AND g.term > f.term)",
                    t = self.table
                ),
                &[],
            )
            .await
            .unwrap()
            .get(0)
    }

    /// Accepted writes, and the number of distinct terms they carry.
    async fn accepted(&self, db: &TestDb) -> (i64, i64) {
        let row = db
            .admin()
            .query_one(
                &format!("SELECT count(*), count(DISTINCT term) FROM {}", self.table),
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    }

    async fn drop_table(&self, db: &TestDb) {
        db.admin()
            .batch_execute(&format!("DROP TABLE {}", self.table))
            .await
            .unwrap();
    }
}

/// One leader task's run: who, which term, when it started and stopped.
#[derive(Clone, Debug)]
struct Tenure {
    instance: usize,
    term: i64,
    start: Instant,
    end: Option<Instant>,
}

#[derive(Default)]
struct Tally {
    tenures: std::sync::Mutex<Vec<Tenure>>,
    accepted: AtomicUsize,
    rejected: AtomicUsize,
}

/// Starts `instances` contenders whose leader task writes to `fenced` with its term as fast as
/// it can, until the run loop stops it.
fn start_fenced_contenders(
    pools: &[(Pool, Pool)],
    name: &str,
    fenced: &FencedTable,
    tally: &Arc<Tally>,
) -> Vec<(Arc<LeaderElection>, tokio::task::JoinHandle<()>)> {
    pools
        .iter()
        .enumerate()
        .map(|(instance, (leader_pool, writer_pool))| {
            let election = Arc::new(election(leader_pool, name, instance));
            let (writer_pool, fenced, tally) = (writer_pool.clone(), fenced.clone(), tally.clone());
            let task = tokio::spawn({
                let election = election.clone();
                async move {
                    let _ = election
                        .run(|leader| {
                            let (writer_pool, fenced, tally) =
                                (writer_pool.clone(), fenced.clone(), tally.clone());
                            async move {
                                let index = {
                                    let mut tenures = tally.tenures.lock().unwrap();
                                    tenures.push(Tenure {
                                        instance,
                                        term: leader.term(),
                                        start: Instant::now(),
                                        end: None,
                                    });
                                    tenures.len() - 1
                                };
                                struct End(Arc<Tally>, usize);
                                impl Drop for End {
                                    fn drop(&mut self) {
                                        self.0.tenures.lock().unwrap()[self.1].end =
                                            Some(Instant::now());
                                    }
                                }
                                let _end = End(tally.clone(), index);
                                loop {
                                    let Ok(client) = writer_pool.get().await else {
                                        continue;
                                    };
                                    match fenced
                                        .write(&client, leader.term(), instance as i32)
                                        .await
                                    {
                                        Ok(true) => tally.accepted.fetch_add(1, Ordering::SeqCst),
                                        Ok(false) => tally.rejected.fetch_add(1, Ordering::SeqCst),
                                        Err(_) => 0,
                                    };
                                    drop(client);
                                    tokio::time::sleep(Duration::from_millis(2)).await;
                                }
                            }
                        })
                        .await;
                }
            });
            (election, task)
        })
        .collect()
}

/// Pairs of leader tasks of different instances that ran at the same time.
fn overlaps(tenures: &[Tenure], until: Instant) -> Vec<(Tenure, Tenure)> {
    let mut found = Vec::new();
    for (i, a) in tenures.iter().enumerate() {
        for b in &tenures[i + 1..] {
            let (a_end, b_end) = (a.end.unwrap_or(until), b.end.unwrap_or(until));
            if a.instance != b.instance && a.start < b_end && b.start < a_end {
                found.push((a.clone(), b.clone()));
            }
        }
    }
    found
}

/// Waits until some contender leads in a term above `above`; returns that term.
async fn next_leader_term(
    elections: &[(Arc<LeaderElection>, tokio::task::JoinHandle<()>)],
    above: i64,
) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(term) = elections
            .iter()
            .filter_map(|(election, _)| election.state().term())
            .find(|term| *term > above)
        {
            return term;
        }
        assert!(
            Instant::now() < deadline,
            "no leader above term {above} within 5 s"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test]
async fn no_write_accepted_from_a_stale_term_under_repeated_terminations() {
    let db = TestDb::new("leader_fenced_terminate").await;
    let name = unique_name("fenced-terminate");
    let fenced = FencedTable::create(&db, &name).await;
    let tally = Arc::new(Tally::default());
    let pools: Vec<_> = (0..3).map(|_| (db.pool(2), db.pool(2))).collect();
    let contenders = start_fenced_contenders(&pools, &name, &fenced, &tally);

    let faults = 25;
    let mut term = next_leader_term(&contenders, 0).await;
    let first = term;
    let mut rng = rand::rngs::StdRng::from_entropy();
    for _ in 0..faults {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(10..60))).await;
        let holders = db.holders(contenders[0].0.lock_key()).await;
        assert_eq!(holders.len(), 1, "one holder of the leadership lock");
        db.terminate(holders[0]).await;
        term = next_leader_term(&contenders, term).await;
    }
    let takeovers = term - first;
    for (_, task) in &contenders {
        task.abort();
    }
    for (_, task) in contenders {
        let _ = task.await;
    }
    let end = Instant::now();

    let tenures = tally.tenures.lock().unwrap().clone();
    let overlapping = overlaps(&tenures, end);
    let (accepted, terms_written) = fenced.accepted(&db).await;
    let rejected = tally.rejected.load(Ordering::SeqCst);
    eprintln!(
        "terminations: {faults}, takeovers: {takeovers}, leader tasks: {}, overlapping tasks: {}, \
         accepted writes: {accepted} in {terms_written} terms, stale writes rejected: {rejected}",
        tenures.len(),
        overlapping.len()
    );
    assert!(takeovers >= faults, "every termination led to a new term");
    for (a, b) in &overlapping {
        assert_ne!(a.term, b.term, "two tasks at once in one term: {a:?} {b:?}");
    }
    assert_eq!(
        fenced.stale_accepted(&db).await,
        0,
        "a write from a stale term was accepted"
    );
    // A task stopped while its write was in flight may not have counted an accepted write.
    assert!(tally.accepted.load(Ordering::SeqCst) <= accepted as usize);
    fenced.drop_table(&db).await;
    db.assert_no_locks().await;
}

/// A pool of this test's connections that go through `proxy`.
fn pool_via(db: &TestDb, proxy: &TcpProxy, size: usize) -> Pool {
    let mut config: tokio_postgres::Config = db.url().parse().unwrap();
    let direct = config.clone();
    config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(proxy.port())
        .user(direct.get_user().unwrap_or("postgres"))
        .dbname(direct.get_dbname().unwrap_or("test"))
        .application_name(direct.get_application_name().unwrap())
        .connect_timeout(Duration::from_secs(5));
    if let Some(password) = direct.get_password() {
        config.password(password);
    }
    let manager = deadpool_postgres::Manager::new(config, tokio_postgres::NoTls);
    Pool::builder(manager).max_size(size).build().unwrap()
}

/// The address of the test server, for a proxy to forward to.
async fn server_addr() -> std::net::SocketAddr {
    let config: tokio_postgres::Config = crate::harness::database_url().parse().unwrap();
    let host = match &config.get_hosts()[0] {
        tokio_postgres::config::Host::Tcp(host) => host.clone(),
        other => panic!("the fault tests need a TCP server address, not {other:?}"),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let mut addrs = tokio::net::lookup_host((host.as_str(), port))
        .await
        .unwrap();
    addrs.next().unwrap()
}

#[tokio::test]
async fn no_write_accepted_from_a_stale_term_under_network_faults() {
    let db = TestDb::new("leader_fenced_network").await;
    let name = unique_name("fenced-network");
    let fenced = FencedTable::create(&db, &name).await;
    let tally = Arc::new(Tally::default());
    let target = server_addr().await;
    let mut proxies = Vec::new();
    let mut pools = Vec::new();
    for _ in 0..3 {
        // The leader's connection goes through a proxy; the writes go straight to the server.
        let proxy = TcpProxy::start(target).await;
        pools.push((pool_via(&db, &proxy, 3), db.pool(2)));
        proxies.push(proxy);
    }
    let contenders = start_fenced_contenders(&pools, &name, &fenced, &tally);
    let leader_now = |term: i64| {
        contenders
            .iter()
            .position(|(election, _)| election.state() == LeaderState::Leader { term })
    };

    let rounds = 24;
    let mut term = next_leader_term(&contenders, 0).await;
    let first = term;
    let (mut partitions, mut resets, mut healed, mut blips, mut blips_survived) = (0, 0, 0, 0, 0);
    let mut detection = Vec::new();
    let mut rng = rand::rngs::StdRng::from_entropy();
    for round in 0..rounds {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(10..40))).await;
        let Some(leader) = leader_now(term) else {
            // The leadership moved by itself (a spurious probe timeout under load): go on
            // from the new term.
            term = next_leader_term(&contenders, term).await;
            continue;
        };
        let (election, proxy) = (&contenders[leader].0, &proxies[leader]);
        let pid = db.holders(election.lock_key()).await[0];
        let started = Instant::now();
        match round % 4 {
            0 => {
                // Partition, and the server ends the session meanwhile (as its keepalive or
                // an administrator would): another instance leads while this one, cut off,
                // still believes it leads until its probe times out.
                partitions += 1;
                proxy.blackhole();
                tokio::time::sleep(Duration::from_millis(rng.gen_range(0..150))).await;
                db.terminate(pid).await;
                term = next_leader_term(&contenders, term).await;
                let mut state = election.subscribe();
                state.wait_for(|s| !s.is_leader()).await.unwrap();
                detection.push(started.elapsed());
                proxy.heal();
            }
            1 => {
                // Connection reset: the client and the server both see it at once.
                resets += 1;
                proxy.reset_all().await;
                term = next_leader_term(&contenders, term).await;
            }
            2 => {
                // Partition that outlasts the health check, then heals: the leader steps
                // down on detection; the server frees the lock once the release gets through.
                healed += 1;
                proxy.blackhole();
                let mut state = election.subscribe();
                state.wait_for(|s| !s.is_leader()).await.unwrap();
                detection.push(started.elapsed());
                proxy.heal();
                term = next_leader_term(&contenders, term).await;
            }
            _ => {
                // A blip shorter than the probe timeout: the leadership should survive it.
                blips += 1;
                proxy.blackhole();
                tokio::time::sleep(Duration::from_millis(50)).await;
                proxy.heal();
                tokio::time::sleep(Duration::from_millis(400)).await;
                if election.state() == (LeaderState::Leader { term }) {
                    blips_survived += 1;
                } else {
                    term = next_leader_term(&contenders, term).await;
                }
            }
        }
    }
    let takeovers = term - first;
    for (_, task) in &contenders {
        task.abort();
    }
    for (_, task) in contenders {
        let _ = task.await;
    }
    let end = Instant::now();

    let tenures = tally.tenures.lock().unwrap().clone();
    let overlapping = overlaps(&tenures, end);
    let (accepted, terms_written) = fenced.accepted(&db).await;
    let rejected = tally.rejected.load(Ordering::SeqCst);
    detection.sort();
    eprintln!(
        "faults: {partitions} partitions with the session ended server-side, {resets} resets, \
         {healed} partitions healed after detection, {blips} short blips ({blips_survived} \
         survived); takeovers: {takeovers}; leader tasks: {}, overlapping tasks: {}; accepted \
         writes: {accepted} in {terms_written} terms; stale writes rejected: {rejected}; loss \
         detection after a partition: min {:?} max {:?}",
        tenures.len(),
        overlapping.len(),
        detection.first(),
        detection.last(),
    );
    for (a, b) in &overlapping {
        assert_ne!(a.term, b.term, "two tasks at once in one term: {a:?} {b:?}");
    }
    assert!(
        rejected > 0,
        "a partitioned leader kept writing with its stale term: some writes must be rejected"
    );
    assert_eq!(
        fenced.stale_accepted(&db).await,
        0,
        "a write from a stale term was accepted"
    );
    assert!(
        detection.iter().all(|d| *d < Duration::from_secs(2)),
        "loss detection took too long: {detection:?}"
    );
    fenced.drop_table(&db).await;
    drop(proxies);
    db.assert_no_locks().await;
}

#[tokio::test]
async fn terms_keep_increasing_across_server_restarts() {
    use crate::support::{StopMode, ThrowawayCluster};

    let cluster = ThrowawayCluster::start().await;
    let pool = |size| {
        Pool::builder(deadpool_postgres::Manager::new(
            cluster.pg_config(),
            tokio_postgres::NoTls,
        ))
        .max_size(size)
        .build()
        .unwrap()
    };
    let name = unique_name("restart-server");
    let elections: Vec<_> = (0..2)
        .map(|i| Arc::new(election(&pool(2), &name, i)))
        .collect();
    let tasks: Vec<_> = elections
        .iter()
        .map(|election| {
            let election = election.clone();
            tokio::spawn(async move {
                let _ = election.run(|_| std::future::pending::<()>()).await;
            })
        })
        .collect();
    let contenders: Vec<_> = elections.iter().cloned().zip(tasks).collect();

    let mut term = next_leader_term(&contenders, 0).await;
    for mode in [StopMode::Immediate, StopMode::Fast, StopMode::Immediate] {
        let leader = contenders
            .iter()
            .position(|(e, _)| e.state().is_leader())
            .unwrap();
        let mut state = contenders[leader].0.subscribe();
        cluster.restart(mode).await;
        // The restart may already be over, and the same instance leading again.
        tokio::time::timeout(
            Duration::from_secs(5),
            state.wait_for(|s| *s != LeaderState::Leader { term }),
        )
        .await
        .expect("the leader notices the restart")
        .unwrap();
        let next =
            tokio::time::timeout(Duration::from_secs(10), next_leader_term(&contenders, term))
                .await
                .expect("a leader after the restart");
        assert!(next > term, "term {next} after {term}");
        term = next;
    }
    for (_, task) in &contenders {
        task.abort();
    }
    for (_, task) in contenders {
        let _ = task.await;
    }
    let admin = crate::harness::connect(&cluster.url()).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let locks: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if locks == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{locks} advisory locks left");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn run_on_a_closed_session_gives_up() {
    let db = TestDb::new("leader_closed_session").await;
    let name = unique_name("closed-session");
    let session = db.session().await;
    let election = LeaderElection::new(session.clone(), &name)
        .health_check(fast_health())
        .wait_strategy(WaitStrategy::poll());
    let mut leadership = election.campaign().await.unwrap();
    db.terminate(leadership.backend_pid()).await;
    tokio::time::timeout(Duration::from_secs(2), leadership.lost())
        .await
        .expect("loss reported within the detection bound");
    drop(leadership);
    // Retrying cannot bring a closed session back: `run` says so instead of looping.
    let error = tokio::time::timeout(Duration::from_secs(5), election.run(|_| async {}))
        .await
        .expect("run gives up on a closed session")
        .unwrap_err();
    assert!(error.is_connection_lost(), "{error:?}");
    db.assert_no_locks().await;
}

/// The wait start of the one waiter for `key`, if there is one.
async fn wait_start(db: &TestDb, key: pglock::AdvisoryKey) -> Option<String> {
    let (classid, objid, objsubid) = key.pg_locks_ids();
    db.admin()
        .query_opt(
            "SELECT waitstart::text FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
             AND classid = $1::int8::oid AND objid = $2::int8::oid AND objsubid = $3",
            &[&i64::from(classid), &i64::from(objid), &objsubid],
        )
        .await
        .unwrap()
        .map(|row| row.get(0))
}

/// Samples the wait start of the waiter for `key` every 20 ms for `during`: the distinct values
/// seen, in order.
async fn wait_starts(db: &TestDb, key: pglock::AdvisoryKey, during: Duration) -> Vec<String> {
    let mut seen: Vec<String> = Vec::new();
    let end = Instant::now() + during;
    while Instant::now() < end {
        if let Some(start) = wait_start(db, key).await {
            if seen.last() != Some(&start) {
                seen.push(start);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    seen
}

#[tokio::test]
async fn a_campaign_without_queue_rounds_keeps_its_place() {
    let db = TestDb::new("leader_queue_round").await;
    let name = unique_name("round");
    let pool = db.pool(4);
    let leader = election(&pool, &name, 0).campaign().await.unwrap();
    let key = election(&pool, &name, 0).lock_key();

    // With rounds of 200 ms, the standby leaves the queue and joins it again every round.
    let rounds = election(&pool, &name, 1).queue_round(Some(Duration::from_millis(200)));
    let campaign = tokio::spawn(async move { rounds.campaign().await.map(drop) });
    let seen = wait_starts(&db, key, Duration::from_millis(1500)).await;
    assert!(seen.len() >= 3, "a new place every round: {seen:?}");
    campaign.abort();
    let _ = campaign.await;
    db.wait_for_waiters(key, 0, Duration::from_secs(5)).await;

    // Without rounds it keeps one place for as long as it waits, and gets the lock when the
    // leader steps down.
    let keeps = election(&pool, &name, 2).queue_round(None);
    let campaign = tokio::spawn(async move { keeps.campaign().await });
    db.wait_for_waiters(key, 1, Duration::from_secs(5)).await;
    let seen = wait_starts(&db, key, Duration::from_millis(1500)).await;
    assert_eq!(seen.len(), 1, "one place: {seen:?}");
    let term = leader.term();
    leader.step_down().await.unwrap();
    let next = tokio::time::timeout(Duration::from_secs(5), campaign)
        .await
        .expect("the standby takes over")
        .unwrap()
        .unwrap();
    assert!(next.term() > term);
    next.step_down().await.unwrap();
    db.assert_no_locks().await;
}
