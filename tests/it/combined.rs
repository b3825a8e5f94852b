//! A dropped guard's unlock carried by the next acquisition of the same key on the same
//! connection, in one statement that releases and then acquires (see `src/handoff.rs`).

use std::future::{poll_fn, Future};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use pglock::{AdvisoryKey, AdvisoryLock, AdvisoryLockGuard, Error};

use crate::harness::{drop_after_polls, session_cleaned_up, TestDb};

/// The lock's holder drops its guard and asks again at once while another session waits: the
/// waiter is granted the key first (the release comes first in the statement), and the holder
/// waits behind it in the same statement that released.
async fn waiter_goes_first(db: &TestDb, lock: AdvisoryLock, key: AdvisoryKey) {
    let guard = lock.lock().await.unwrap();
    let pid = AdvisoryLockGuard::backend_pid(&guard);
    let other = AdvisoryLock::new(db.dedicated_session().await, key);
    let waiter = tokio::spawn(async move { other.lock().await });
    db.wait_for_waiters(key, 1, Duration::from_secs(5)).await;
    let waiter_pid = db.waiters(key).await[0];
    drop(guard);
    // Polled once here, before this task yields: the acquisition claims the unlock.
    let mut again = Box::pin(lock.lock());
    poll_fn(|cx| {
        assert!(again.as_mut().poll(cx).is_pending(), "the key is busy");
        Poll::Ready(())
    })
    .await;
    let held = waiter.await.unwrap().unwrap();
    assert_eq!(AdvisoryLockGuard::backend_pid(&held), waiter_pid);
    db.wait_for_waiters(key, 1, Duration::from_secs(5)).await;
    assert_eq!(db.waiters(key).await, vec![pid]);
    assert_eq!(db.holders(key).await, vec![waiter_pid]);
    // One statement released the old grant and now waits for the new one.
    let sql = db.statement_of(pid).await;
    assert!(
        sql.contains("pg_advisory_unlock") && sql.contains("pg_advisory_lock("),
        "{sql}"
    );
    AdvisoryLockGuard::unlock(held).await.unwrap();
    let guard = again.await.unwrap();
    assert_eq!(AdvisoryLockGuard::backend_pid(&guard), pid);
    assert_eq!(db.holders(key).await, vec![pid]);
    drop(guard);
    db.assert_no_locks().await;
}

#[tokio::test]
async fn on_a_session_the_waiter_goes_first() {
    let db = TestDb::new("combined_session_fair").await;
    let key = db.key();
    let lock = AdvisoryLock::new(db.dedicated_session().await, key);
    waiter_goes_first(&db, lock, key).await;
}

#[tokio::test]
async fn on_a_pool_the_waiter_goes_first() {
    let db = TestDb::new("combined_pool_fair").await;
    let key = db.key();
    let lock = AdvisoryLock::new(db.pool(2), key);
    waiter_goes_first(&db, lock, key).await;
}

#[tokio::test]
async fn a_loop_holds_the_key_once_and_leaves_nothing() {
    let db = TestDb::new("combined_loop").await;
    let key = db.key();
    let session = db.session().await;
    let pool = db.pool(2);
    for lock in [
        AdvisoryLock::new(&session, key),
        AdvisoryLock::new(&pool, key),
    ] {
        let mut pids = Vec::new();
        for turn in 0..60 {
            let guard = if turn % 2 == 0 {
                lock.lock().await.unwrap()
            } else {
                lock.try_lock().await.unwrap().expect("free")
            };
            let pid = AdvisoryLockGuard::backend_pid(&guard);
            pids.push(pid);
            // Granted once: a stacked grant would show here as a second row.
            let locks = db.locks().await;
            assert_eq!(locks, vec![(pid, key, "ExclusiveLock".to_owned(), true)]);
            drop(guard);
        }
        pids.dedup();
        assert_eq!(pids.len(), 1, "every turn ran on the same connection");
        db.assert_no_locks().await;
    }
    assert!(!session.holds(key));
}

#[tokio::test]
async fn a_dropped_guard_is_released_without_a_next_acquisition() {
    let db = TestDb::new("combined_alone").await;
    let key = db.key();
    let session = db.session().await;
    let lock = AdvisoryLock::new(&session, key);
    drop(lock.lock().await.unwrap());
    // Nothing else runs on the session: the unlock goes alone once this task yields.
    db.assert_no_locks().await;
    assert!(!session.holds(key));
    // Another mode, or another key, is not combined: the unlock goes first, alone.
    drop(lock.lock().await.unwrap());
    let shared = lock.lock_shared().await.unwrap();
    let pid = AdvisoryLockGuard::backend_pid(&shared);
    assert_eq!(
        db.locks().await,
        vec![(pid, key, "ShareLock".to_owned(), true)]
    );
    drop(shared);
    let other_key = db.key();
    drop(lock.lock().await.unwrap());
    let other = AdvisoryLock::new(&session, other_key).lock().await.unwrap();
    assert_eq!(
        db.locks().await,
        vec![(pid, other_key, "ExclusiveLock".to_owned(), true)]
    );
    drop(other);
    db.assert_no_locks().await;
}

/// The combined statement abandoned after every number of polls, on a session and on a pool,
/// on two worker threads (so the task that sends an unclaimed unlock races the claim).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_combined_acquisitions_leave_nothing() {
    let db = TestDb::new("combined_cancel").await;
    let key = db.key();
    let session = db.session().await;
    let pool = db.pool(3);
    let on_session = AdvisoryLock::new(&session, key);
    let on_pool = AdvisoryLock::new(&pool, key);
    for polls in 1..=6 {
        for lock in [&on_session, &on_pool] {
            for try_only in [false, true] {
                let guard = match lock.lock().await {
                    Ok(guard) => guard,
                    // A cancel request of the wait abandoned before, arriving late on the shared
                    // session (docs/design.md, "Shared sessions and stray cancels").
                    Err(Error::Cancelled { .. }) => lock.lock().await.unwrap(),
                    Err(error) => panic!("{error}"),
                };
                drop(guard);
                let outcome = if try_only {
                    drop_after_polls(lock.try_lock(), polls).await
                } else {
                    drop_after_polls(lock.lock(), polls)
                        .await
                        .map(|r| r.map(Some))
                };
                if let Some(result) = outcome {
                    drop(result.unwrap().expect("free"));
                }
                db.assert_no_locks().await;
                session_cleaned_up(&session, key).await;
            }
        }
    }
    // Both still work, and hold nothing afterwards.
    for lock in [&on_session, &on_pool] {
        AdvisoryLockGuard::unlock(lock.lock().await.unwrap())
            .await
            .unwrap();
    }
    db.assert_no_locks().await;
}

/// Tasks on two threads share one session and one key: each drop is claimed by whichever task
/// asks next (or sent alone), and there is never more than one holder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_sharing_a_session_keep_mutual_exclusion() {
    let db = TestDb::new("combined_shared_session").await;
    let key = db.key();
    let session = db.session().await;
    let lock = AdvisoryLock::new(&session, key);
    let inside = Arc::new(AtomicUsize::new(0));
    let granted = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let (lock, inside, granted) = (lock.clone(), inside.clone(), granted.clone());
            tokio::spawn(async move {
                for _ in 0..100 {
                    match lock.try_lock().await {
                        Ok(Some(guard)) => {
                            assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0, "two holders");
                            granted.fetch_add(1, Ordering::SeqCst);
                            tokio::task::yield_now().await;
                            inside.fetch_sub(1, Ordering::SeqCst);
                            drop(guard);
                        }
                        // Another task of the session holds the key.
                        Ok(None) => tokio::task::yield_now().await,
                        other => panic!("unexpected {other:?}"),
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    assert!(granted.load(Ordering::SeqCst) > 0);
    db.assert_no_locks().await;
    assert!(!session.holds(key));
}

/// The dropped guard's unlock, carried by the next acquisition, finds the key no longer held
/// (something released every lock of the session behind the guard's back). On a pool the
/// connection is closed, since what it holds is no longer known, and the acquisition starts
/// again on another; a shared session only reports it, and the acquisition holds the key once.
#[tokio::test]
async fn a_carried_unlock_that_finds_the_key_free() {
    let db = TestDb::new("combined_not_held").await;
    let key = db.key();
    let session = db.session().await;
    let pool = db.pool(1);
    for (lock, pooled) in [
        (AdvisoryLock::new(&session, key), false),
        (AdvisoryLock::new(&pool, key), true),
    ] {
        // Verified and prepared, so that the carried unlock takes the plain combined form.
        for _ in 0..3 {
            drop(lock.lock().await.unwrap());
        }
        let guard = lock.lock().await.unwrap();
        let pid = AdvisoryLockGuard::backend_pid(&guard);
        guard
            .execute("SELECT pg_advisory_unlock_all()", &[])
            .await
            .unwrap();
        drop(guard);
        // Asked for again before this task yields: the unlock rides in this statement.
        let guard = lock.lock().await.unwrap();
        let now_on = AdvisoryLockGuard::backend_pid(&guard);
        if pooled {
            assert_ne!(now_on, pid, "the pooled connection was closed");
            db.wait_backend_gone(pid).await;
        } else {
            assert_eq!(now_on, pid);
        }
        assert_eq!(
            db.locks().await,
            vec![(now_on, key, "ExclusiveLock".to_owned(), true)]
        );
        AdvisoryLockGuard::unlock(guard).await.unwrap();
        db.assert_no_locks().await;
    }
    assert!(!session.holds(key));
}
