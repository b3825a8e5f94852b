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
