//! Lock cohorting: local handoffs, fairness to other sessions, cancellation.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use pglock::{AdvisoryLock, AdvisoryLockGuard, CohortGuard, CohortLock, Error, LockScope};
use tokio::time::Instant;

use crate::harness::{drop_after_polls, TestDb};

/// Polls `future` once; `Some` if it finished.
async fn poll_once<F: Future + Unpin>(future: &mut F) -> Option<F::Output> {
    poll_fn(|cx| {
        Poll::Ready(match Pin::new(&mut *future).poll(cx) {
            Poll::Ready(v) => Some(v),
            Poll::Pending => None,
        })
    })
    .await
}

/// Polls `future` (which must not finish) until a session waits for `key` in the server.
async fn drive_until_waiting<F: Future + Unpin>(
    future: &mut F,
    db: &TestDb,
    key: pglock::AdvisoryKey,
) where
    F::Output: std::fmt::Debug,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(done) = tokio::time::timeout(Duration::from_millis(10), &mut *future).await {
            panic!("finished while the key is held elsewhere: {done:?}");
        }
        let waiters = db.waiters(key).await;
        if waiters.len() == 1 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not the one waiter in the server: waiters {waiters:?}, locks {:?}",
            db.locks().await
        );
    }
}

/// Drops `future` after `polls` polls, or after 20 ms if it is not woken that often (a task
/// queued in memory is only woken by its turn).
async fn cancel_after<F: Future>(future: F, polls: usize) -> Option<F::Output> {
    tokio::time::timeout(Duration::from_millis(20), drop_after_polls(future, polls))
        .await
        .ok()
        .flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_tasks_share_one_server_lock() {
    let db = TestDb::new("cohort_many").await;
    let pool = db.pool(4);
    let key = db.key();
    let lock = CohortLock::new(AdvisoryLock::new(&pool, key));
    let inside = Arc::new(AtomicBool::new(false));
    let handoffs = Arc::new(AtomicU64::new(0));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let sampling = sampling.clone();
        let admin = db.client().await;
        tokio::spawn(async move {
            let (classid, objid, objsubid) = key.pg_locks_ids();
            let mut most = 0i64;
            while sampling.load(Ordering::Relaxed) {
                let waiting: i64 = admin
                    .query_one(
                        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted
                         AND classid = $1::int8::oid AND objid = $2::int8::oid AND objsubid = $3",
                        &[&i64::from(classid), &i64::from(objid), &objsubid],
                    )
                    .await
                    .unwrap()
                    .get(0);
                most = most.max(waiting);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            most
        })
    };
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let (lock, inside, handoffs) = (lock.clone(), inside.clone(), handoffs.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..20 {
                let guard = lock.lock().await.unwrap();
                assert!(!inside.swap(true, Ordering::SeqCst), "two holders at once");
                if CohortGuard::handoffs(&guard) > 0 {
                    handoffs.fetch_add(1, Ordering::Relaxed);
                }
                tokio::task::yield_now().await;
                inside.store(false, Ordering::SeqCst);
                drop(guard);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert!(
        handoffs.load(Ordering::Relaxed) > 2_000,
        "most acquisitions should be local handoffs, saw {}",
        handoffs.load(Ordering::Relaxed)
    );
    // Only one connection of the process ever waited in the server's queue.
    sampling.store(false, Ordering::Relaxed);
    let most_waiting = sampler.await.unwrap();
    assert!(
        most_waiting <= 1,
        "{most_waiting} sessions waited in the server"
    );
    db.assert_no_locks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_session_gets_the_lock_within_the_bound() {
    let db = TestDb::new("cohort_fair").await;
    let pool = db.pool(4);
    let other_pool = db.pool(1);
    let key = db.key();
    let max_hold = Duration::from_millis(20);
    let lock = CohortLock::new(AdvisoryLock::new(&pool, key)).max_hold(max_hold);
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let (lock, stop) = (lock.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let guard = lock.lock().await.unwrap();
                tokio::task::yield_now().await;
                drop(guard);
            }
        }));
    }
    // The local tasks now pass the lock around continuously; another session asks for it.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let other = AdvisoryLock::new(&other_pool, key);
    let mut worst = Duration::ZERO;
    for _ in 0..5 {
        let asked = Instant::now();
        let guard = tokio::time::timeout(Duration::from_secs(10), other.lock())
            .await
            .expect("the other session was starved")
            .unwrap();
        worst = worst.max(asked.elapsed());
        AdvisoryLockGuard::unlock(guard).await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }
    // The documented bound is max_hold + one critical section + a round trip; allow for a
    // loaded CI machine, but far below what starvation would look like.
    assert!(worst < Duration::from_secs(2), "worst wait {worst:?}");
    db.assert_no_locks().await;
}

#[tokio::test]
async fn a_dropped_waiter_passes_on_a_handoff_it_never_saw() {
    let db = TestDb::new("cohort_drop_handoff").await;
    let pool = db.pool(2);
    let key = db.key();
    // A budget that never runs out here: every release is a local handoff.
    let lock = CohortLock::new(AdvisoryLock::new(&pool, key)).max_hold(Duration::from_secs(60));
    let first = lock.lock().await.unwrap();
    // Waiters dropped while queued leave the queue.
    for polls in 1..=3 {
        assert!(cancel_after(lock.lock(), polls).await.is_none());
    }
    let mut second = Box::pin(lock.lock());
    let mut third = Box::pin(lock.lock());
    assert!(poll_once(&mut second).await.is_none());
    assert!(poll_once(&mut third).await.is_none());
    // The release hands the lock to `second`, which is dropped before it ever sees it.
    drop(first);
    drop(second);
    let third = third.await.unwrap();
    assert_eq!(
        CohortGuard::handoffs(&third),
        2,
        "handed on twice, no server round trip"
    );
    assert_eq!(db.holders(key).await.len(), 1);
    drop(third);
    // Nobody waits locally any more: the lock goes back to the server.
    db.assert_no_locks().await;
    let plain = AdvisoryLock::new(&pool, key).try_lock().await.unwrap();
    assert!(plain.is_some(), "the cohort released the key");
    drop(plain);
    db.assert_no_locks().await;
}

#[tokio::test]
async fn cancelling_the_server_waiter_passes_the_turn() {
    let db = TestDb::new("cohort_cancel_server").await;
    let pool = db.pool(4);
    let outside_pool = db.pool(1);
    let key = db.key();
    let outside = AdvisoryLock::new(&outside_pool, key).lock().await.unwrap();
    let lock = CohortLock::new(AdvisoryLock::new(&pool, key));
    for polls in 1..=6 {
        // The first task asks the server and waits there; it is dropped after `polls` polls.
        assert!(cancel_after(lock.lock(), polls).await.is_none());
    }
    let mut asking = Box::pin(lock.lock());
    drive_until_waiting(&mut asking, &db, key).await;
    let mut queued = Box::pin(lock.lock());
    assert!(poll_once(&mut queued).await.is_none());
    // Cancelling the server waiter hands the turn to the queued task, which then waits on the
    // server itself.
    drop(asking);
    // The queued task now asks the server in place of the cancelled one, and waits there.
    drive_until_waiting(&mut queued, &db, key).await;
    AdvisoryLockGuard::unlock(outside).await.unwrap();
    let guard = tokio::time::timeout(Duration::from_secs(5), &mut queued)
        .await
        .expect("the queued task got its turn")
        .unwrap();
    assert_eq!(CohortGuard::handoffs(&guard), 0);
    CohortGuard::unlock(guard).await.unwrap();
    db.assert_no_locks().await;
}

#[tokio::test]
async fn timeouts_and_try_lock() {
    let db = TestDb::new("cohort_timeouts").await;
    let pool = db.pool(2);
    let key = db.key();
    let lock = CohortLock::new(AdvisoryLock::new(&pool, key));
    let held = lock.try_lock().await.unwrap().expect("free");
    assert!(lock.try_lock().await.unwrap().is_none(), "held locally");
    let started = Instant::now();
    assert!(lock
        .try_lock_for(Duration::from_millis(50))
        .await
        .unwrap()
        .is_none());
    assert!(started.elapsed() >= Duration::from_millis(45));
    CohortGuard::unlock(held).await.unwrap();
    db.assert_no_locks().await;
    let again = lock
        .try_lock_for(Duration::from_secs(1))
        .await
        .unwrap()
        .expect("free again");
    drop(again);

    let xact = CohortLock::new(AdvisoryLock::new(&pool, key).scope(LockScope::Transaction));
    assert!(matches!(xact.lock().await, Err(Error::Config(_))));
    db.assert_no_locks().await;
}

/// Compile-time: the cohort's futures and guards move between threads, as `tokio::spawn`
/// requires, and so do the lock set's.
#[allow(dead_code, unused_must_use, clippy::let_underscore_future)]
fn futures_are_send(lock: CohortLock, guard: CohortGuard, set: pglock::LockSet) {
    fn is_send<T: Send>(_: &T) {}
    is_send(&lock.lock());
    is_send(&lock.try_lock());
    is_send(&lock.try_lock_for(Duration::from_secs(1)));
    is_send(&CohortGuard::unlock(guard));
    is_send(&set.lock(1i64));
    is_send(&set.try_lock(1i64));
    is_send(&set.try_lock_for(1i64, Duration::from_secs(1)));
    is_send(&pglock::LockSet::connect("postgres://localhost/db", 2));
}

#[test]
fn types_are_send_and_sync() {
    fn is_send_sync<T: Send + Sync>() {}
    is_send_sync::<CohortLock>();
    is_send_sync::<CohortGuard>();
    is_send_sync::<pglock::LockSet>();
}
