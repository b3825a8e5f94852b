//! The connection handoff on a pool: a dropped guard's connection, with its unlock in flight,
//! or an unlocked guard's, taken by the next acquisition of the same lock (see
//! `src/handoff.rs`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pglock::{AdvisoryLock, AdvisoryLockGuard};

use crate::harness::{drop_after_polls, wait_for_alive_tasks, TestDb};

#[tokio::test]
async fn lock_after_drop_reuses_the_connection_without_stacking_the_lock() {
    let db = TestDb::new("handoff_reuse").await;
    let pool = db.pool(2);
    let key = db.key();
    let lock = AdvisoryLock::new(&pool, key);
    let first = lock.lock().await.unwrap();
    let pid = AdvisoryLockGuard::backend_pid(&first);
    drop(first);
    for _ in 0..100 {
        // Sent right behind the unlock of the guard just dropped, on the same backend.
        let guard = lock.lock().await.unwrap();
        assert_eq!(AdvisoryLockGuard::backend_pid(&guard), pid);
        assert_eq!(db.holders(key).await, vec![pid]);
        drop(guard);
    }
    // Had a grant stacked on a pending one, the session would still hold the key now.
    db.assert_no_locks().await;
    // And the connection went back to the pool once nothing claimed it.
    tokio::time::timeout(Duration::from_secs(5), async {
        while pool.status().available == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the parked connection returns to the pool");
    assert!(pool.status().size <= 2);
}

#[tokio::test]
async fn clones_share_the_handoff_and_explicit_unlock_returns_to_the_pool() {
    let db = TestDb::new("handoff_clones").await;
    let pool = db.pool(1);
    let key = db.key();
    let lock = AdvisoryLock::new(&pool, key);
    let other = lock.clone();
    drop(lock.lock().await.unwrap());
    // With a pool of one, this can only succeed on the handed-off connection, at once.
    let guard = tokio::time::timeout(Duration::from_secs(5), other.lock())
        .await
        .expect("the clone claims the parked connection")
        .unwrap();
    AdvisoryLockGuard::unlock(guard).await.unwrap();
    // Kept for the next acquisition of the lock until this task yields, then back in the pool.
    tokio::task::yield_now().await;
    assert_eq!(pool.status().available, 1);
    db.assert_no_locks().await;
}

#[tokio::test]
async fn a_lock_unlock_loop_on_a_pool_stays_on_one_backend() {
    let db = TestDb::new("handoff_unlock_loop").await;
    // Two connections, handed out first in, first out: without the handoff, every other
    // acquisition would land on the other backend.
    let pool = db.open_pool(2).await;
    let key = db.key();
    let lock = AdvisoryLock::new(&pool, key);
    let first = lock.lock().await.unwrap();
    let pid = AdvisoryLockGuard::backend_pid(&first);
    AdvisoryLockGuard::unlock(first).await.unwrap();
    // Nothing else awaited between an unlock and the next lock: the connection stays.
    let mut pids = Vec::new();
    for _ in 0..20 {
        let guard = lock.lock().await.unwrap();
        pids.push(AdvisoryLockGuard::backend_pid(&guard));
        AdvisoryLockGuard::unlock(guard).await.unwrap();
    }
    assert_eq!(pids, vec![pid; 20]);
    // Unlock returns once released, even with the connection kept for a moment.
    assert!(db.holders(key).await.is_empty());
    assert_eq!(pool.status().available, 2);
    db.assert_no_locks().await;
}

#[tokio::test]
async fn an_unlocked_connection_goes_to_a_task_waiting_for_the_pool_first() {
    // A loop that never yields between an unlock and the next lock: the released connection
    // must still reach the waiting task instead of staying with the loop.
    loop_beside_a_pool_waiter("handoff_unlock_fair", Release::Unlock).await;
}

#[tokio::test]
async fn a_dropped_guards_connection_goes_to_a_task_waiting_for_the_pool_first() {
    // A lock + drop loop, each lock claiming the connection the drop before it parked: the
    // connection must still reach the waiting task once a release is confirmed.
    loop_beside_a_pool_waiter("handoff_drop_fair", Release::Drop).await;
}

enum Release {
    Unlock,
    Drop,
}

/// Runs 20 `lock` + release cycles of one lock on a pool of one while another task waits for
/// the pool, and checks that the other task got the connection during the loop.
async fn loop_beside_a_pool_waiter(name: &str, release: Release) {
    let db = TestDb::new(name).await;
    let pool = db.pool(1);
    let lock = AdvisoryLock::new(&pool, db.key());
    let guard = lock.lock().await.unwrap();
    let cycles = Arc::new(AtomicUsize::new(0));
    let waiter = tokio::spawn({
        let pool = pool.clone();
        let cycles = cycles.clone();
        async move {
            let conn = pool.get().await.unwrap();
            conn.simple_query("SELECT 1").await.unwrap();
            cycles.load(Ordering::SeqCst)
        }
    });
    tokio::time::timeout(Duration::from_secs(5), async {
        while pool.status().waiting == 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the other task waits for the pool");
    let mut guard = Some(guard);
    for cycle in 1..=20 {
        let held = guard.take().expect("one guard per cycle");
        match release {
            Release::Unlock => AdvisoryLockGuard::unlock(held).await.unwrap(),
            Release::Drop => drop(held),
        }
        cycles.store(cycle, Ordering::SeqCst);
        guard = Some(lock.lock().await.unwrap());
    }
    drop(guard);
    let seen = waiter.await.unwrap();
    assert!(
        seen < 20,
        "the waiting task got the connection only after the loop ({seen})"
    );
    db.assert_no_locks().await;
}

#[tokio::test]
async fn a_lock_on_a_pool_leaves_its_releases_to_one_task_that_ends_with_it() {
    let db = TestDb::new("handoff_flusher").await;
    let pool = db.open_pool(2).await;
    let tasks = tokio::runtime::Handle::current().metrics();
    let before = tasks.num_alive_tasks();
    let lock = AdvisoryLock::new(&pool, db.key());
    for _ in 0..20 {
        drop(lock.lock().await.unwrap());
        let guard = lock.lock().await.unwrap();
        AdvisoryLockGuard::unlock(guard).await.unwrap();
        // Yield between cycles, so that the task returns the idle connection each time.
        db.assert_no_locks().await;
    }
    assert_eq!(pool.status().available, 2);
    // However many guards were released: one task for what they left to the next acquisition.
    wait_for_alive_tasks(&tasks, before + 1).await;
    drop(lock);
    wait_for_alive_tasks(&tasks, before).await;
}

#[tokio::test]
async fn a_waiter_in_the_server_queue_gets_the_lock_before_the_handoff() {
    let db = TestDb::new("handoff_fair").await;
    let pool = db.pool(2);
    let key = db.key();
    let lock = AdvisoryLock::new(&pool, key);
    let guard = lock.lock().await.unwrap();
    let other_session = db.dedicated_session().await;
    let waiter = tokio::spawn({
        let lock = AdvisoryLock::new(other_session, key);
        async move { lock.lock().await }
    });
    db.wait_for_waiters(key, 1, Duration::from_secs(5)).await;
    drop(guard);
    // The unlock hands the lock to the queued waiter before the pipelined attempt runs.
    assert!(lock.try_lock().await.unwrap().is_none());
    let held = waiter.await.unwrap().unwrap();
    drop(held);
    db.assert_no_locks().await;
}

#[tokio::test]
async fn a_failed_unlock_closes_the_handed_off_connection_and_the_lock_is_taken_afresh() {
    let db = TestDb::new("handoff_failed_unlock").await;
    let pool = db.pool(2);
    let key = db.key();
    let lock = AdvisoryLock::new(&pool, key);
    let guard = lock.lock().await.unwrap();
    let old_pid = AdvisoryLockGuard::backend_pid(&guard);
    // The protected work leaves its transaction aborted: the unlock queued on drop fails
    // (25P02), and so does the lock sent right behind it on the same connection.
    let failed = guard.batch_execute("BEGIN; SELECT 1/0").await;
    assert!(failed.is_err());
    drop(guard);
    let guard = tokio::time::timeout(Duration::from_secs(10), lock.lock())
        .await
        .expect("the acquisition starts again on a fresh connection")
        .unwrap();
    let new_pid = AdvisoryLockGuard::backend_pid(&guard);
    assert_ne!(new_pid, old_pid);
    assert_eq!(db.holders(key).await, vec![new_pid]);
    // The connection that could not unlock was closed, which freed its lock.
    db.wait_backend_gone(old_pid).await;
    AdvisoryLockGuard::unlock(guard).await.unwrap();
    db.assert_no_locks().await;
}

#[tokio::test]
async fn a_failed_unlock_is_seen_by_try_lock_too() {
    let db = TestDb::new("handoff_failed_try").await;
    let pool = db.pool(2);
    let key = db.key();
    let lock = AdvisoryLock::new(&pool, key);
    let guard = lock.lock().await.unwrap();
    let old_pid = AdvisoryLockGuard::backend_pid(&guard);
    assert!(guard.batch_execute("BEGIN; SELECT 1/0").await.is_err());
    drop(guard);
    // Not the aborted transaction's error: a fresh connection answers. The old session's lock
    // lives until the server has ended that session, as after any failed release on drop.
    let guard = lock
        .try_lock_for(Duration::from_secs(5))
        .await
        .unwrap()
        .expect("free once the old session is closed");
    assert_ne!(AdvisoryLockGuard::backend_pid(&guard), old_pid);
    drop(guard);
    db.assert_no_locks().await;
}

#[tokio::test]
async fn abandoned_acquisitions_on_a_handed_off_connection_leave_nothing() {
    let db = TestDb::new("handoff_cancel").await;
    let pool = db.pool(3);
    let key = db.key();
    let lock = AdvisoryLock::new(&pool, key);
    // Free key: the claimed acquisition is dropped after 1..6 polls, granted or not.
    for polls in 1..=6 {
        for _ in 0..20 {
            drop(lock.lock().await.unwrap());
            let _ = drop_after_polls(lock.lock(), polls).await;
        }
    }
    db.assert_no_locks().await;
    // Busy key: the claimed acquisition waits in the server's queue behind another session
    // (which took the lock from our unlock) and is abandoned there.
    let other = AdvisoryLock::new(db.dedicated_session().await, key);
    for polls in 1..=4u64 {
        let guard = lock.lock().await.unwrap();
        let waiter = tokio::spawn({
            let other = other.clone();
            async move { other.lock().await }
        });
        db.wait_for_waiters(key, 1, Duration::from_secs(5)).await;
        drop(guard);
        // Abandoned while it waits (a blocked wait is not polled again until it answers).
        let wait = Duration::from_millis(20 * polls);
        let abandoned = tokio::time::timeout(wait, lock.lock()).await;
        assert!(abandoned.is_err(), "the other session holds the key");
        let held = waiter.await.unwrap().unwrap();
        drop(held);
    }
    db.assert_no_locks().await;
    let guard = other.try_lock().await.unwrap().expect("nothing leaked");
    drop(guard);
    db.assert_no_locks().await;
}

/// Clones of one lock on several worker threads, each dropping its guard and locking again at
/// once: parks and claims race across threads, and mutual exclusion must hold throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_drops_and_claims_keep_mutual_exclusion() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    let db = TestDb::new("handoff_threads").await;
    let pool = db.pool(4);
    let key = db.key();
    let lock = AdvisoryLock::new(&pool, key);
    let inside = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..6)
        .map(|_| {
            let lock = lock.clone();
            let inside = inside.clone();
            tokio::spawn(async move {
                for _ in 0..150 {
                    let guard = lock.lock().await.unwrap();
                    assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0, "two holders");
                    tokio::task::yield_now().await;
                    inside.fetch_sub(1, Ordering::SeqCst);
                    drop(guard);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    db.assert_no_locks().await;
    assert!(pool.status().size <= 4);
}

/// Everything at once on two worker threads: guards dropped with a healthy or an aborted
/// transaction (so the unlock before a claim succeeds or fails), claims abandoned after a few
/// polls, and try_lock, lock and try_lock_for claiming. Mutual exclusion holds throughout and
/// nothing is left in pg_locks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_failures_and_abandoned_claims_leave_nothing() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    let db = TestDb::new("handoff_mixed").await;
    let pool = db.pool(6);
    let key = db.key();
    let lock = AdvisoryLock::new(&pool, key);
    let inside = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..4)
        .map(|task| {
            let lock = lock.clone();
            let inside = inside.clone();
            tokio::spawn(async move {
                for turn in 0..60usize {
                    let guard = match (task + turn) % 3 {
                        0 => lock.lock().await.unwrap(),
                        1 => match lock.try_lock_for(Duration::from_secs(10)).await.unwrap() {
                            Some(guard) => guard,
                            None => continue,
                        },
                        _ => match lock.try_lock().await.unwrap() {
                            Some(guard) => guard,
                            None => continue,
                        },
                    };
                    assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0, "two holders");
                    if turn % 4 == 0 {
                        // Leaves the transaction aborted: the unlock on drop fails.
                        let _ = guard.batch_execute("BEGIN; SELECT 1/0").await;
                    }
                    inside.fetch_sub(1, Ordering::SeqCst);
                    drop(guard);
                    if turn % 5 == 0 {
                        // A claim abandoned mid-way.
                        let polls = 1 + turn % 3;
                        if let Some(Ok(guard)) = drop_after_polls(lock.lock(), polls).await {
                            drop(guard);
                        }
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    db.assert_no_locks().await;
    let guard = lock.try_lock().await.unwrap().expect("free at the end");
    AdvisoryLockGuard::unlock(guard).await.unwrap();
    db.assert_no_locks().await;
}
