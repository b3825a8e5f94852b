//! Primary fail-over on throwaway clusters: a primary and a streaming standby (`pg_basebackup
//! -R`), the primary stopped with `-m immediate`, the standby promoted. Advisory locks are
//! never replicated; what must hold is that fencing terms keep increasing, and that locks and
//! leaderships move to the new primary.

use std::time::{Duration, Instant};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use pglock::LeaderElection;
use tokio_postgres::{Client, NoTls};

use crate::cli::{kill, unique, Scratch, SIGTERM_EXIT};
use crate::cli_standby::Instance;
use crate::support::{StopMode, TcpProxy, ThrowawayCluster};

fn pool(config: tokio_postgres::Config) -> Pool {
    let manager = Manager::from_config(
        config,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(2)
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .unwrap()
}

async fn client(config: &tokio_postgres::Config) -> Client {
    let (client, connection) = config.connect(NoTls).await.unwrap();
    tokio::spawn(connection);
    client
}

/// The term the server stores for `name`; `None` before the table has reached it.
async fn stored_term(client: &Client, name: &str) -> Option<i64> {
    client
        .query_opt(
            "SELECT term FROM pglock_leader_terms WHERE name = $1",
            &[&name],
        )
        .await
        .ok()
        .flatten()
        .map(|row| row.get(0))
}

/// Elects `name` once on `pool` and steps down: the term it got.
async fn elect(pool: &Pool, name: &str) -> i64 {
    let leadership = LeaderElection::new(pool, name).campaign().await.unwrap();
    let term = leadership.term();
    leadership.step_down().await.unwrap();
    term
}

#[tokio::test]
async fn terms_keep_increasing_across_a_failover_that_lost_the_last_term() {
    let primary = ThrowawayCluster::builder().replication().start().await;
    // The standby streams through a proxy, so that the test can cut it off: asynchronous
    // replication that falls behind, as it does when a primary dies under load.
    let link = TcpProxy::start(primary.addr()).await;
    let standby = primary.start_standby(link.port()).await;
    let on_primary = pool(primary.pg_config());
    let standby_client = client(&standby.pg_config()).await;
    let name = "failover-terms";

    let first = elect(&on_primary, name).await;
    let second = elect(&on_primary, name).await;
    assert!(second > first);
    // The standby has the second term...
    let deadline = Instant::now() + Duration::from_secs(10);
    while stored_term(&standby_client, name).await != Some(second) {
        assert!(Instant::now() < deadline, "the standby never caught up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ... but not the third: it is cut off before the third election, which commits on the
    // primary alone.
    link.blackhole();
    let lost = elect(&on_primary, name).await;
    assert!(lost > second);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(stored_term(&standby_client, name).await, Some(second));

    // The primary dies; the standby is promoted and elects the next leader.
    primary.stop(StopMode::Immediate).await;
    drop(on_primary);
    standby.promote().await;
    let on_new_primary = pool(standby.pg_config());
    let next = elect(&on_new_primary, name).await;
    assert!(
        next > lost,
        "a term after the fail-over ({next:#x}) must exceed every term before it, the lost \
         {lost:#x} included"
    );
    assert!(
        next >> 32 > lost >> 32,
        "a new timeline: {next:#x} after {lost:#x}"
    );
    assert_eq!(next & 0xffff_ffff, 1, "the first term of the new timeline");
    // And they go on increasing on the new primary.
    assert!(elect(&on_new_primary, name).await > next);
}

/// The longest pause between two connection attempts of `pglock` (2 s, jittered up to 1.5
/// times), plus 2 s for a loaded machine: after the promotion, leaders and waiters reach the new
/// primary within it and a connection, a campaign and a shell's start.
const RECONNECT_BOUND: Duration = Duration::from_millis(3000 + 2000);

#[tokio::test]
async fn leaders_and_waiters_move_to_the_promoted_standby() {
    let primary = ThrowawayCluster::builder().replication().start().await;
    let standby = primary.start_standby(primary.port()).await;
    // Both servers in one URL, the primary first: what fail-over setups give their clients.
    let url = format!(
        "postgresql://postgres@127.0.0.1:{},127.0.0.1:{}/postgres?target_session_attrs=read-write",
        primary.port(),
        standby.port()
    );
    let scratch = Scratch::new();
    let leadership = unique("failover-leader");
    let lock = unique("failover-lock");
    let lead_script = "echo \"leading in $PGLOCK_TERM\" >&2; while :; do sleep 0.2; done";
    let leader_args = [
        "leader",
        "--progress-every",
        "1s",
        &leadership,
        "--",
        "sh",
        "-c",
        lead_script,
    ];
    let first = Instance::start_on(&url, &leader_args, scratch.path("a"));
    first
        .wait_for_line("leading in", Duration::from_secs(10))
        .await;
    let second = Instance::start_on(&url, &leader_args, scratch.path("b"));
    second
        .wait_for_line("standing by", Duration::from_secs(10))
        .await;
    let holder = Instance::start_on(
        &url,
        &[
            "run",
            &lock,
            "--",
            "sh",
            "-c",
            "echo 'holding' >&2; sleep 1000",
        ],
        scratch.path("holder"),
    );
    holder
        .wait_for_line("holding", Duration::from_secs(10))
        .await;
    let waiter = Instance::start_on(
        &url,
        &["run", &lock, "--", "sh", "-c", "echo 'ran' >&2"],
        scratch.path("waiter"),
    );
    waiter
        .wait_for_line("is busy", Duration::from_secs(10))
        .await;

    // The primary dies at once. The leader and the holder lose what they held (their sessions
    // end with the server: reported within the detection bound, 2 s by default, at once here)
    // and stop their commands; the standby instance and the waiter lose their connections.
    primary.stop(StopMode::Immediate).await;
    first
        .wait_for_line(
            "lost the leadership",
            Duration::from_secs(2) + Duration::from_secs(2),
        )
        .await;
    assert_eq!(holder.exit_code().await, 76, "the holder's lock is gone");
    // A fail-over tool takes a moment to promote the standby; meanwhile every instance waits
    // (the standby refuses writes, the old primary is gone) and none exits.
    tokio::time::sleep(Duration::from_secs(2)).await;
    standby.promote().await;
    let promoted = Instant::now();

    // One instance leads on the new primary, in a term of the new timeline.
    let leads = |instance: &Instance| instance.lines_with("leading in");
    loop {
        let new_leaders = leads(&first) + leads(&second) - 1;
        if new_leaders >= 1 {
            assert_eq!(new_leaders, 1, "one leader on the new primary");
            break;
        }
        assert!(
            promoted.elapsed() < RECONNECT_BOUND,
            "no leader {RECONNECT_BOUND:?} after the promotion:\n{}\n{}",
            first.stderr(),
            second.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "a leader on the new primary {:?} after the promotion",
        promoted.elapsed()
    );
    let terms: Vec<i64> = [&first, &second]
        .iter()
        .flat_map(|i| {
            i.stderr()
                .lines()
                .filter_map(|l| l.strip_prefix("leading in ")?.trim().parse().ok())
                .collect::<Vec<i64>>()
        })
        .collect();
    assert_eq!(terms.len(), 2, "{terms:?}");
    assert!(terms.iter().max().unwrap() >> 32 > terms.iter().min().unwrap() >> 32);
    // The waiter gets the lock there, runs its command and ends with its status.
    waiter.wait_for_line("ran", RECONNECT_BOUND).await;
    assert_eq!(
        waiter.exit_code().await,
        0,
        "the waiter ran on the new primary"
    );

    for instance in [first, second] {
        kill(instance.pid(), "TERM");
        let code = instance.exit_code().await;
        assert!(code == SIGTERM_EXIT || code == 0, "{code}");
    }
}

/// Ten fail-overs in a row behind one endpoint (a proxy whose target moves to the promoted
/// standby, as a managed service's DNS name does): each time, a held lock and the leadership are
/// reported lost, and a leader is elected on the new primary in a term of its new timeline.
#[tokio::test]
async fn ten_failovers_behind_one_endpoint() {
    use std::sync::{Arc, Mutex};

    use pglock::{AdvisoryLock, AdvisoryLockGuard, HealthCheck};

    let fast = HealthCheck::new(Duration::from_millis(100), Duration::from_millis(250));
    let mut primary = ThrowawayCluster::builder().replication().start().await;
    let mut standby = primary.start_standby(primary.port()).await;
    let endpoint = TcpProxy::start(primary.addr()).await;
    let mut config = primary.pg_config_with_port(endpoint.port());
    config.connect_timeout(Duration::from_secs(2));
    // Every start and end of a leader task: (term, started, ended).
    type Terms = Arc<Mutex<Vec<(i64, Instant, Option<Instant>)>>>;
    let terms: Terms = Arc::default();
    let mut contenders = Vec::new();
    for instance in 0..2 {
        let (pool, terms) = (pool(config.clone()), terms.clone());
        contenders.push(tokio::spawn(async move {
            let election = LeaderElection::new(&pool, "ten-failovers")
                .health_check(fast)
                .retry_backoff(Duration::from_millis(50), Duration::from_millis(500))
                .identity(format!("instance {instance}"));
            election
                .run(|leader| {
                    let terms = terms.clone();
                    async move {
                        let index = {
                            let mut terms = terms.lock().unwrap();
                            terms.push((leader.term(), Instant::now(), None));
                            terms.len() - 1
                        };
                        // Records when the task is dropped: when the loss was detected.
                        struct Ended(Terms, usize);
                        impl Drop for Ended {
                            fn drop(&mut self) {
                                self.0.lock().unwrap()[self.1].2 = Some(Instant::now());
                            }
                        }
                        let _ended = Ended(terms, index);
                        std::future::pending::<()>().await
                    }
                })
                .await
        }));
    }
    let holder = pool(config.clone());
    let bound = fast.detection_bound();
    let (mut lock_detected, mut leader_detected, mut took_over) = (vec![], vec![], vec![]);
    for cycle in 0..10 {
        // A leader runs, and a lock is held.
        let deadline = Instant::now() + Duration::from_secs(20);
        let current = loop {
            let running = terms
                .lock()
                .unwrap()
                .iter()
                .rev()
                .find(|t| t.2.is_none())
                .map(|t| t.0);
            if let Some(term) = running {
                break term;
            }
            assert!(Instant::now() < deadline, "cycle {cycle}: no leader");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let guard = AdvisoryLock::new(&holder, "ten-failovers-lock")
            .health_check(fast)
            .lock()
            .await
            .unwrap();
        let mut lost = AdvisoryLockGuard::loss_signal(&guard);
        tokio::time::sleep(fast.interval * 2).await;

        // Timed from the moment the stop is asked for: pg_ctl returns only once the server is
        // gone, by when the clients may have noticed already.
        let died = Instant::now();
        primary.stop(StopMode::Immediate).await;
        tokio::time::timeout(bound + Duration::from_secs(2), lost.lost())
            .await
            .expect("the lock's loss is reported");
        lock_detected.push(died.elapsed());
        drop(guard);
        let deadline = Instant::now() + bound + Duration::from_secs(2);
        let ended = loop {
            let ended = terms
                .lock()
                .unwrap()
                .iter()
                .find(|t| t.0 == current)
                .and_then(|t| t.2);
            if let Some(ended) = ended {
                break ended;
            }
            assert!(
                Instant::now() < deadline,
                "cycle {cycle}: the leader ran on"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        leader_detected.push(ended.saturating_duration_since(died));

        // The fail-over tool: the endpoint moves to the standby, which is promoted.
        endpoint.set_target(standby.addr());
        let promoted = Instant::now();
        standby.promote().await;
        let deadline = promoted + Duration::from_secs(20);
        let next = loop {
            let next = terms
                .lock()
                .unwrap()
                .iter()
                // A term of the new timeline: on a loaded machine a leader may also step down
                // on a false alarm (a probe answered late) and another be elected on the old
                // primary, in a later term of the same timeline, before the fail-over.
                .find(|t| t.0 >> 32 > current >> 32)
                .copied();
            if let Some(next) = next {
                break next;
            }
            assert!(Instant::now() < deadline, "cycle {cycle}: no new leader");
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        took_over.push(next.1.saturating_duration_since(promoted));

        // The next fail-over's standby streams from the new primary.
        let next_standby = standby.start_standby(standby.port()).await;
        primary = std::mem::replace(&mut standby, next_standby);
    }
    for contender in contenders {
        contender.abort();
    }
    let summary = |label: &str, mut times: Vec<Duration>| {
        times.sort();
        eprintln!(
            "{label}: min {:?}, median {:?}, max {:?}",
            times[0],
            times[times.len() / 2],
            times[times.len() - 1]
        );
    };
    summary(
        "10 fail-overs: a held lock reported lost after",
        lock_detected,
    );
    summary("the leadership reported lost after", leader_detected);
    summary("a new leader after the promotion was asked for", took_over);
    drop(primary);
}

/// The port of the server a guard's connection reaches, and whether it is in recovery.
async fn server_of(client: &tokio_postgres::Client) -> (u16, bool) {
    let row = client
        .query_one("SELECT inet_server_port(), pg_is_in_recovery()", &[])
        .await
        .unwrap();
    (row.get::<_, i32>(0) as u16, row.get::<_, bool>(1))
}

/// After a fail-over, the old primary comes back as a standby of the new one (as fail-over tools
/// rebuild it), first in a two-host connection string: a pool keeps handing out connections to
/// the new primary only, and pglock takes no lock on the standby.
#[tokio::test]
async fn a_pool_never_locks_on_the_old_primary_rejoined_as_a_standby() {
    use pglock::{AdvisoryLock, AdvisoryLockGuard, Error};

    let primary = ThrowawayCluster::builder().replication().start().await;
    let standby = primary.start_standby(primary.port()).await;
    let url = format!(
        "postgresql://postgres@127.0.0.1:{},127.0.0.1:{}/postgres?target_session_attrs=read-write",
        primary.port(),
        standby.port()
    );
    let config: tokio_postgres::Config =
        pglock::DatabaseUrl::parse(&url).unwrap().config().unwrap();
    let both = pool(config);
    let lock = AdvisoryLock::new(&both, "rejoin");
    let guard = lock.lock().await.unwrap();
    assert_eq!(server_of(&guard).await, (primary.port(), false));
    AdvisoryLockGuard::unlock(guard).await.unwrap();

    primary.stop(StopMode::Immediate).await;
    standby.promote().await;
    primary.rejoin_as_standby(standby.port()).await;
    // The pool's connection to the old primary died with it: whichever acquisition first meets
    // it fails with a lost connection; every lock taken after that is on the new primary.
    let mut taken = 0;
    for _ in 0..20 {
        match lock.lock().await {
            Ok(guard) => {
                assert_eq!(server_of(&guard).await, (standby.port(), false));
                AdvisoryLockGuard::unlock(guard).await.unwrap();
                taken += 1;
            }
            Err(error) => assert!(error.is_connection_lost(), "{error:?}"),
        }
    }
    assert!(taken >= 19, "{taken} of 20");
    // Directly on the rejoined standby (no read-write requirement), pglock refuses.
    let on_standby = pool(primary.pg_config());
    let refused = AdvisoryLock::new(&on_standby, "rejoin").try_lock().await;
    assert!(
        matches!(refused, Err(Error::ReadOnlyStandby)),
        "{refused:?}"
    );
}
