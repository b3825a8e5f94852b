//! Kernel-level partitions: the server runs in a network namespace of the test's own, the lock
//! holder reaches it over a veth link, and the link is cut while the lock is held. Neither
//! kernel is told: no FIN, no RST, packets just stop. The holder must report the loss within
//! its detection bound, and the server must free the lock only later (when its keepalives, set
//! by pglock, give up on the holder's session), so that nobody else gets the lock while the
//! holder still believes it holds it.
//!
//! 20 injections (`PGLOCK_PARTITION_INJECTIONS` to change), in 4 lanes that run at once, each
//! lane a namespace and a server of its own. Skipped where the machine does not allow network
//! namespaces.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pglock::{AdvisoryKey, AdvisoryLock, AdvisoryLockGuard, HealthCheck, Session};
use tokio_postgres::{Client, NoTls};

use crate::support::{NetworkNamespace, ThrowawayCluster};

const LANES: usize = 4;

/// Probes every 250 ms, each allowed 250 ms: loss is reported within 500 ms.
const HEALTH: HealthCheck =
    HealthCheck::new(Duration::from_millis(250), Duration::from_millis(250));

/// What one injection measured, from the moment the link was cut.
#[derive(Debug, Clone, Copy)]
struct Injection {
    /// When the holder's loss signal fired.
    detected: Duration,
    /// When another session could take the lock.
    freed: Duration,
}

async fn try_take(admin: &Client, key: i64) -> bool {
    admin
        .query_one("SELECT pg_try_advisory_lock($1)", &[&key])
        .await
        .unwrap()
        .get(0)
}

/// One lane: a namespace, a server in it, and `injections` cuts, one after the other. `None`
/// when namespaces cannot be made here.
async fn lane(injections: usize) -> Option<Vec<Injection>> {
    let namespace = NetworkNamespace::create()?;
    let cluster = ThrowawayCluster::builder()
        .in_namespace(&namespace)
        .start()
        .await;
    // The other session goes through the server's Unix socket, which the cut does not touch.
    let (admin, connection) = cluster.socket_config().connect(NoTls).await.unwrap();
    tokio::spawn(connection);
    let bound = HEALTH.detection_bound();
    let mut measured = Vec::new();
    for _ in 0..injections {
        let session = Arc::new(
            Session::connect(&cluster.url())
                .await
                .unwrap()
                .with_health_check(HEALTH),
        );
        let key: i64 = rand::random();
        let guard = AdvisoryLock::new(session.clone(), AdvisoryKey::Single(key))
            .lock()
            .await
            .unwrap();
        let mut lost = AdvisoryLockGuard::loss_signal(&guard);
        // The first probe also sets the server's keepalives for the session: let it answer.
        tokio::time::sleep(HEALTH.interval * 2).await;
        assert!(!try_take(&admin, key).await, "held before the cut");

        namespace.cut();
        let cut = Instant::now();
        let reason = tokio::time::timeout(Duration::from_secs(30), lost.lost())
            .await
            .expect("the holder reports the loss");
        let detected = cut.elapsed();
        // The bound counts from the cut (the signal was asked for before it), plus the time the
        // runtime takes to run the monitor: 1 s more for a loaded 2-core machine.
        assert!(
            detected <= bound + Duration::from_secs(1),
            "loss reported {detected:?} after the cut ({reason}), bound {bound:?}"
        );
        // Meanwhile nobody else may get the lock; then the server gives the session up.
        let freed = loop {
            if try_take(&admin, key).await {
                break cut.elapsed();
            }
            assert!(
                cut.elapsed() < Duration::from_secs(60),
                "the server never freed the lock"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        admin
            .execute("SELECT pg_advisory_unlock($1)", &[&key])
            .await
            .unwrap();
        assert!(
            freed > detected,
            "the server freed the lock ({freed:?}) before the holder knew ({detected:?})"
        );
        measured.push(Injection { detected, freed });
        namespace.heal();
        drop(guard);
        drop(session);
    }
    Some(measured)
}

#[tokio::test]
async fn a_partitioned_holder_stops_before_the_server_frees_its_lock() {
    let total: usize = std::env::var("PGLOCK_PARTITION_INJECTIONS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(20);
    let per_lane = total.div_ceil(LANES);
    let lanes: Vec<_> = (0..LANES).map(|_| tokio::spawn(lane(per_lane))).collect();
    let mut all = Vec::new();
    for lane in lanes {
        match lane.await.unwrap() {
            Some(measured) => all.extend(measured),
            None => return,
        }
    }
    let mut detected: Vec<Duration> = all.iter().map(|i| i.detected).collect();
    let mut freed: Vec<Duration> = all.iter().map(|i| i.freed).collect();
    detected.sort();
    freed.sort();
    let margin = all.iter().map(|i| i.freed - i.detected).min().unwrap();
    eprintln!(
        "{} partitions: holder reported the loss after {:?} (min) / {:?} (median) / {:?} (max); \
         the server freed the lock after {:?} / {:?} / {:?}; the holder knew at least {margin:?} \
         before anyone else could take the lock (keepalive timeout {:?})",
        all.len(),
        detected[0],
        detected[detected.len() / 2],
        detected[detected.len() - 1],
        freed[0],
        freed[freed.len() / 2],
        freed[freed.len() - 1],
        HEALTH.keepalive_timeout(),
    );
}
