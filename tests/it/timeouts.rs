//! Timed waits: enforced by the server, so no lock is granted after the caller gave up.

use std::time::Duration;

use pglock::{AdvisoryLock, LockScope};
use rand::Rng;

use crate::harness::TestDb;

/// 200 timed-out waits while the holder releases right around the deadline: each wait either
/// gets the lock (and gives it back) or gives up, and afterwards nothing is held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_that_time_out_as_the_holder_releases() {
    let db = TestDb::new("timeouts").await;
    let pool = db.pool(8);
    let (mut granted, mut timed_out) = (0, 0);
    let mut rng = rand::thread_rng();
    for i in 0..200 {
        let key = db.key();
        let scope = if i % 2 == 0 {
            LockScope::Session
        } else {
            LockScope::Transaction
        };
        let holder = AdvisoryLock::new(&pool, key).lock().await.unwrap();
        let holder_pid = pglock::AdvisoryLockGuard::backend_pid(&holder);
        let timeout = Duration::from_millis(10);
        let release_after = Duration::from_micros(rng.gen_range(7_000..13_000));
        let releaser = tokio::spawn(async move {
            tokio::time::sleep(release_after).await;
            drop(holder);
        });
        let waiter = AdvisoryLock::new(&pool, key).scope(scope);
        match waiter.try_lock_for(timeout).await.unwrap() {
            Some(guard) => {
                granted += 1;
                drop(guard);
            }
            None => {
                timed_out += 1;
                // Gave up: nothing may be queued or granted behind our back. The holder's own
                // release on drop completes in the background; once it has, nobody may hold the
                // key: a grant after the timeout would show here.
                releaser.await.unwrap();
                assert!(
                    db.waiters(key).await.is_empty(),
                    "a timed-out wait is still queued"
                );
                let mut polls = 0;
                loop {
                    let holders = db.holders(key).await;
                    assert!(
                        holders.iter().all(|pid| *pid == holder_pid),
                        "iteration {i} ({scope:?}): the lock was granted after the timeout to {holders:?} (holder {holder_pid})"
                    );
                    if holders.is_empty() {
                        break;
                    }
                    polls += 1;
                    assert!(polls < 1000, "the holder never released");
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                continue;
            }
        }
        releaser.await.unwrap();
    }
    eprintln!("granted {granted}, timed out {timed_out}");
    assert!(
        granted > 0 && timed_out > 0,
        "the deadline and the release should cross both ways"
    );
    db.assert_no_locks().await;
}

#[tokio::test]
async fn zero_timeout_is_a_single_try_and_deadline_in_the_past_too() {
    let db = TestDb::new("zero_timeout").await;
    let pool = db.pool(2);
    let key = db.key();
    let holder = AdvisoryLock::new(&pool, key).lock().await.unwrap();
    let lock = AdvisoryLock::new(&pool, key);
    assert!(lock.try_lock_for(Duration::ZERO).await.unwrap().is_none());
    let past = tokio::time::Instant::now() - Duration::from_secs(1);
    assert!(lock.try_lock_until(past).await.unwrap().is_none());
    drop(holder);
    db.assert_no_locks().await;
    let free = lock.try_lock_for(Duration::ZERO).await.unwrap();
    assert!(free.is_some());
    drop(free);
    db.assert_no_locks().await;
}
