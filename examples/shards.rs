//! Several instances of one worker split 256 shards between them, each shard owned by exactly
//! one instance at a time, with a `LockSet`: many held locks on two connections per instance.
//!
//! ```sh
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/test cargo run --example shards -- 4
//! ```
//!
//! The program starts the given number of copies of itself (default 4) as separate OS
//! processes. Each copy asks for every shard at once (the requests of one connection travel in
//! one statement), keeps at most its fair share, gives the rest back, and then asks again for
//! whatever nobody holds, until every shard has an owner. Each prints the shards it owns; the
//! counts add up to 256, and no shard appears twice.

#[path = "support/processes.rs"]
mod processes;

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use pglock::{AdvisoryKey, AdvisoryLockGuard, LockSet};

const SHARDS: i32 = 256;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    match std::env::var(processes::INSTANCE) {
        Ok(name) => {
            let instances: usize = std::env::var(processes::INSTANCES)?.parse()?;
            instance(&url, &name, instances).await
        }
        Err(_) => {
            let count: usize = std::env::args().nth(1).map_or(Ok(4), |n| n.parse())?;
            launch(count.max(1)).await
        }
    }
}

/// Starts `count` copies of this program at once and waits for them.
async fn launch(count: usize) -> Result<(), Box<dyn std::error::Error>> {
    println!("starting {count} instances to share {SHARDS} shards");
    processes::run_copies(count).await?;
    println!("all {count} instances done");
    Ok(())
}

/// The key of a shard: a pair, so that the shards of this example form their own key space
/// (`AdvisoryKey::from_name` gives the namespace half).
fn shard_key(shard: i32) -> AdvisoryKey {
    let namespace = match AdvisoryKey::from_name("examples/shards") {
        AdvisoryKey::Single(k) => k as i32,
        AdvisoryKey::Pair(a, _) => a,
    };
    AdvisoryKey::Pair(namespace, shard)
}

/// One instance: a set of two sessions, a fair share of the shards, held for a while.
async fn instance(
    url: &str,
    name: &str,
    instances: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    let set = LockSet::connect(url, 2).await?;
    let share = (SHARDS as usize).div_ceil(instances);
    let started = Instant::now();
    let mut owned: Vec<(i32, AdvisoryLockGuard)> = Vec::new();
    // Every instance starts at the same moment, so the first round is a race; later rounds only
    // pick up shards that nobody holds (and that an instance over its share gave back).
    for _round in 0..50 {
        let wanted: Vec<i32> = (0..SHARDS)
            .filter(|shard| owned.iter().all(|(mine, _)| mine != shard))
            .collect();
        let answers = join_all(wanted.iter().map(|shard| set.try_lock(shard_key(*shard)))).await;
        for (shard, answer) in wanted.into_iter().zip(answers) {
            if let Some(guard) = answer? {
                owned.push((shard, guard));
            }
        }
        // Over the fair share: give the rest back (dropping a guard releases its shard).
        owned.truncate(share);
        if owned.len() == share || free_shards(&set).await? == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    owned.sort_by_key(|(shard, _)| *shard);
    let shards: Vec<i32> = owned.iter().map(|(shard, _)| *shard).collect();
    println!(
        "{name}: owns {} shards after {} ms: {}",
        owned.len(),
        started.elapsed().as_millis(),
        ranges(&shards)
    );
    // The work on the owned shards would run here, while the guards are held.
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(owned);
    Ok(())
}

/// Sorted shard numbers as ranges: `0-63 70 72-80`.
fn ranges(shards: &[i32]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < shards.len() {
        let start = shards[i];
        while i + 1 < shards.len() && shards[i + 1] == shards[i] + 1 {
            i += 1;
        }
        parts.push(match shards[i] {
            end if end == start => start.to_string(),
            end => format!("{start}-{end}"),
        });
        i += 1;
    }
    parts.join(" ")
}

/// How many shards no session holds, as the server sees it.
async fn free_shards(set: &LockSet) -> Result<i64, Box<dyn std::error::Error>> {
    // pg_locks shows a pair key as (classid, objid, objsubid) = (first, second, 2).
    let (namespace, _, _) = shard_key(0).pg_locks_ids();
    let held: i64 = set.sessions()[0]
        .query_one(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
             AND classid = $1::int8::oid AND objsubid = 2",
            &[&i64::from(namespace)],
        )
        .await?
        .get(0);
    Ok(i64::from(SHARDS) - held)
}
