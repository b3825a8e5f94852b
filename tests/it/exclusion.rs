//! Mutual exclusion: many tasks, and many OS processes, under one key.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pglock::{AdvisoryLock, AdvisoryLockGuard, LockScope};

use crate::harness::{database_url, TestDb};

/// 32 tasks on 32 connections increment a counter with a read-modify-write that yields in the
/// middle; an in-process check proves nobody else is ever inside.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_tasks_one_key() {
    let db = TestDb::new("exclusion_tasks").await;
    let pool = db.pool(32);
    let key = db.key();
    let inside = Arc::new(AtomicUsize::new(0));
    let counter = Arc::new(AtomicUsize::new(0));
    let per_task = 10;
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let lock = AdvisoryLock::new(&pool, key).scope(if i % 4 == 3 {
                LockScope::Transaction
            } else {
                LockScope::Session
            });
            let (inside, counter) = (inside.clone(), counter.clone());
            tokio::spawn(async move {
                for n in 0..per_task {
                    let guard = lock.lock().await.unwrap();
                    assert_eq!(
                        inside.fetch_add(1, Ordering::SeqCst),
                        0,
                        "two holders at once"
                    );
                    let seen = counter.load(Ordering::SeqCst);
                    tokio::task::yield_now().await;
                    guard.query_one("SELECT 1", &[]).await.unwrap();
                    counter.store(seen + 1, Ordering::SeqCst);
                    assert_eq!(inside.fetch_sub(1, Ordering::SeqCst), 1);
                    if n % 2 == 0 {
                        AdvisoryLockGuard::unlock(guard).await.unwrap();
                    } else {
                        drop(guard);
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(counter.load(Ordering::SeqCst), 32 * per_task);
    db.assert_no_locks().await;
}

const CHILD_ENV: &str = "PGLOCK_EXCLUSION_CHILD";

/// Several OS processes (this test binary, re-run as children) increment a counter in a table
/// under one lock; the table itself records how many are inside at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_processes_one_key() {
    let db = TestDb::new("exclusion_processes").await;
    let table = format!("pglock_exclusion_{:08x}", rand::random::<u32>());
    db.admin()
        .batch_execute(&format!(
            "CREATE TABLE {table} (id int PRIMARY KEY, counter int NOT NULL, inside int NOT NULL, max_inside int NOT NULL);
             INSERT INTO {table} VALUES (1, 0, 0, 0)"
        ))
        .await
        .unwrap();
    let key = match db.key() {
        pglock::AdvisoryKey::Single(k) => k,
        pglock::AdvisoryKey::Pair(..) => unreachable!(),
    };
    let processes = 6;
    let iterations = 25;
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..processes)
        .map(|_| {
            tokio::process::Command::new(&exe)
                .args([
                    "--exact",
                    "exclusion::child_process_worker",
                    "--ignored",
                    "--nocapture",
                ])
                .env(CHILD_ENV, format!("{table} {key} {iterations}"))
                .env("DATABASE_URL", db.url())
                .kill_on_drop(true)
                .output()
        })
        .collect();
    for child in children {
        let output = tokio::time::timeout(Duration::from_secs(60), child)
            .await
            .expect("child finished")
            .unwrap();
        assert!(
            output.status.success(),
            "child failed: {}",
            String::from_utf8_lossy(&output.stdout)
        );
    }
    let row = db
        .admin()
        .query_one(&format!("SELECT counter, max_inside FROM {table}"), &[])
        .await
        .unwrap();
    let (counter, max_inside): (i32, i32) = (row.get(0), row.get(1));
    db.admin()
        .batch_execute(&format!("DROP TABLE {table}"))
        .await
        .unwrap();
    assert_eq!(max_inside, 1, "two processes were inside at once");
    assert_eq!(counter, processes * iterations);
    db.assert_no_locks().await;
}

/// The body of one child process of `several_processes_one_key`; does nothing when run alone.
#[tokio::test]
#[ignore = "run as a child process by several_processes_one_key"]
async fn child_process_worker() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let mut parts = spec.split(' ');
    let table = parts.next().unwrap().to_owned();
    let key: i64 = parts.next().unwrap().parse().unwrap();
    let iterations: usize = parts.next().unwrap().parse().unwrap();
    let url = database_url();
    let config: tokio_postgres::Config = url.parse().unwrap();
    let manager = deadpool_postgres::Manager::new(config, tokio_postgres::NoTls);
    let pool = deadpool_postgres::Pool::builder(manager)
        .max_size(2)
        .build()
        .unwrap();
    let lock = AdvisoryLock::new(&pool, key);
    for _ in 0..iterations {
        let guard = lock.lock().await.unwrap();
        let inside: i32 = guard
            .query_one(&format!("UPDATE {table} SET inside = inside + 1, max_inside = greatest(max_inside, inside + 1) RETURNING inside"), &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(inside, 1, "another process is inside");
        let counter: i32 = guard
            .query_one(&format!("SELECT counter FROM {table}"), &[])
            .await
            .unwrap()
            .get(0);
        tokio::time::sleep(Duration::from_micros(200)).await;
        guard
            .execute(
                &format!("UPDATE {table} SET counter = $1, inside = inside - 1"),
                &[&(counter + 1)],
            )
            .await
            .unwrap();
        drop(guard);
    }
}
