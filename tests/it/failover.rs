//! Primary fail-over on throwaway clusters: a primary and a streaming standby (`pg_basebackup
//! -R`), the primary stopped with `-m immediate`, the standby promoted. Advisory locks are
//! never replicated; what must hold is that fencing terms keep increasing, and that locks and
//! leaderships move to the new primary.

use std::time::{Duration, Instant};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use pglock::LeaderElection;
use tokio_postgres::{Client, NoTls};

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
