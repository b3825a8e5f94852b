//! `pglock-bench cycles LOOP N`: runs N cycles of one loop on one connection, on a
//! current-thread runtime, and exits. Not a benchmark by itself: `bench/instructions.sh` runs it
//! under callgrind at two values of N, and the difference divided by the difference in N is what
//! one cycle costs the client, in instructions and in lines of code run. Unlike time, those
//! counts do not depend on the machine's load, so they can tell a change of a few hundred
//! instructions apart on any day.
//!
//! Every loop is warmed first (statements prepared, the connection verified), so that the
//! counted cycles are all alike.

use pglock::{AdvisoryLock, AdvisoryLockGuard, ConnectionSource, Session};

use crate::cases::{pool, Raw, PLAIN_COMBINED};

/// The loops, by name: what `cycles` accepts.
pub const LOOPS: &[&str] = &[
    "raw-lock-unlock",
    "raw-combined",
    "session-lock-unlock",
    "session-lock-drop",
    "pool-lock-unlock",
    "pool-lock-drop",
];

/// The key every loop uses (none of the bench's random keys can be it: those start at 2^40).
const KEY: i64 = 987_654_321;

pub async fn main(args: &[String]) {
    let (Some(name), Some(cycles)) = (args.first(), args.get(1)) else {
        panic!("usage: pglock-bench cycles LOOP N, with LOOP one of {LOOPS:?}");
    };
    let cycles: usize = cycles.parse().expect("N: a number of cycles");
    // With the `metrics` feature, pglock records into the Prometheus exporter's recorder, as in
    // an application that exports its metrics; or, with BENCH_RECORDER=none, into no recorder,
    // as in an application that builds the feature (the `cli` default turns it on) but exports
    // nothing.
    #[cfg(feature = "metrics")]
    if std::env::var("BENCH_RECORDER").as_deref() != Ok("none") {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .set_buckets(pglock::metrics::SECONDS_BUCKETS)
            .expect("buckets")
            .install_recorder()
            .expect("install the recorder");
    }
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    match name.as_str() {
        "raw-lock-unlock" | "raw-combined" => raw(&url, name, cycles).await,
        "session-lock-unlock" | "session-lock-drop" => {
            let session = Session::connect(&url).await.expect("connect");
            pglock_loop(AdvisoryLock::new(session, KEY), name, cycles).await;
        }
        "pool-lock-unlock" | "pool-lock-drop" => {
            let pool = pool(&url, 2);
            pglock_loop(
                AdvisoryLock::new(ConnectionSource::from(pool), KEY),
                name,
                cycles,
            )
            .await;
        }
        other => panic!("unknown loop {other}; one of {LOOPS:?}"),
    }
}

async fn pglock_loop(lock: AdvisoryLock, name: &str, cycles: usize) {
    let drop_loop = name.ends_with("drop");
    let cycle = || async {
        let guard = lock.lock().await.expect("lock");
        if drop_loop {
            drop(guard);
        } else {
            AdvisoryLockGuard::unlock(guard).await.expect("unlock");
        }
    };
    for _ in 0..3 {
        cycle().await;
    }
    for _ in 0..cycles {
        cycle().await;
    }
    // Let the last drop's unlock go.
    tokio::task::yield_now().await;
    drop(lock.try_lock().await.expect("try_lock"));
}

/// Raw tokio-postgres: `lock` then `unlock`, two statements; or the plain combined statement
/// pglock sends in a `lock` + drop loop, one per cycle.
async fn raw(url: &str, name: &str, cycles: usize) {
    let Raw {
        client,
        lock,
        unlock,
        ..
    } = Raw::connect(url).await;
    if name == "raw-combined" {
        let combined = client.prepare(PLAIN_COMBINED).await.expect("prepare");
        client.query_one(&lock, &[&KEY]).await.expect("lock");
        for _ in 0..cycles {
            let row = client.query_one(&combined, &[&KEY]).await.expect("cycle");
            assert_eq!(row.get::<_, Option<bool>>(1), Some(true));
        }
        client.query_one(&unlock, &[&KEY]).await.expect("unlock");
    } else {
        for _ in 0..cycles {
            client.query_one(&lock, &[&KEY]).await.expect("lock");
            client.query_one(&unlock, &[&KEY]).await.expect("unlock");
        }
    }
}
