//! Cancel safety: an acquisition dropped at any point leaves no lock held and no waiter queued.

use std::time::Duration;

use pglock::{AdvisoryLock, AdvisoryLockGuard, LockScope, WaitStrategy};
use rand::Rng;

use crate::harness::{drop_after_polls, session_cleaned_up, TestDb};

/// Whether the acquisition finished (with a guard, dropped here) before it was abandoned.
fn completed_guard(outcome: Option<pglock::Result<Option<AdvisoryLockGuard>>>) -> bool {
    match outcome {
        Some(result) => {
            // A try may find the key still held for a moment by an attempt abandoned just
            // before (its cleanup runs in the background); it must never fail.
            drop(result.unwrap());
            true
        }
        None => false,
    }
}

/// Checks that `holder` alone holds its key (every abandoned attempt left nothing), releases
/// it, and checks that nothing is left.
async fn release_sole_holder(db: &TestDb, holder: AdvisoryLockGuard) {
    let key = AdvisoryLockGuard::key(&holder);
    let pid = AdvisoryLockGuard::backend_pid(&holder);
    assert_eq!(db.holders(key).await, vec![pid]);
    drop(holder);
    db.assert_no_locks().await;
}

/// Every acquisition kind, dropped after 1, 2, 3, ... polls on a free key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_after_n_polls_on_a_free_key() {
    let db = TestDb::new("cancel_polls_free").await;
    let pool = db.pool(4);
    let session = db.dedicated_session().await;
    let key = db.key();
    let mut completed = 0;
    for polls in 1..=8 {
        for round in 0..40 {
            let scope = if round % 2 == 0 {
                LockScope::Session
            } else {
                LockScope::Transaction
            };
            let on_pool = AdvisoryLock::new(&pool, key).scope(scope);
            let on_session = AdvisoryLock::new(&session, key).scope(scope);
            // Each outcome is dropped at once: a guard that completed within `polls` polls is
            // released before the next acquisition on the same session.
            let outcomes = [
                completed_guard(
                    drop_after_polls(on_pool.lock(), polls)
                        .await
                        .map(|r| r.map(Some)),
                ),
                completed_guard(drop_after_polls(on_pool.try_lock(), polls).await),
                completed_guard(
                    drop_after_polls(on_pool.try_lock_for(Duration::from_secs(1)), polls).await,
                ),
                completed_guard(
                    drop_after_polls(on_session.lock(), polls)
                        .await
                        .map(|r| r.map(Some)),
                ),
                completed_guard(drop_after_polls(on_session.try_lock_shared(), polls).await),
            ];
            completed += outcomes.iter().filter(|done| **done).count();
            // Cleanup of an abandoned attempt on the session runs in the background.
            session_cleaned_up(&session, key).await;
        }
    }
    assert!(
        completed > 0,
        "some acquisitions should complete within a few polls"
    );
    db.assert_no_locks().await;
    // The session and the pool are still usable and hold nothing.
    let guard = AdvisoryLock::new(&session, key)
        .try_lock()
        .await
        .unwrap()
        .expect("free");
    AdvisoryLockGuard::unlock(guard).await.unwrap();
    let guard = AdvisoryLock::new(&pool, key)
        .try_lock()
        .await
        .unwrap()
        .expect("free");
    drop(guard);
    db.assert_no_locks().await;
}

/// A waiter dropped while queued behind a holder leaves the queue at once, not when the
/// holder releases: no ghost takes the lock later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_waiter_leaves_the_server_queue() {
    let db = TestDb::new("cancel_queue").await;
    let pool = db.pool(4);
    let session = db.dedicated_session().await;
    let key = db.key();
    let holder = AdvisoryLock::new(&pool, key).lock().await.unwrap();
    for (i, scope) in [LockScope::Session, LockScope::Transaction]
        .into_iter()
        .cycle()
        .take(20)
        .enumerate()
    {
        let lock = if i % 4 < 2 {
            AdvisoryLock::new(&pool, key).scope(scope)
        } else {
            AdvisoryLock::new(&session, key).scope(scope)
        };
        let waiting = tokio::spawn(async move {
            loop {
                match lock.lock().await {
                    // A cancel request of the previous round's abandoned wait on the shared
                    // session, arriving late, can end this wait instead (docs/design.md,
                    // "Shared sessions and stray cancels"): queue again.
                    Err(pglock::Error::Cancelled { .. }) => continue,
                    result => return result.map(|_| ()),
                }
            }
        });
        db.wait_for_waiters(key, 1, Duration::from_secs(5)).await;
        waiting.abort();
        assert!(waiting.await.unwrap_err().is_cancelled());
        // The server-side wait ends while the holder still holds the key.
        db.wait_for_waiters(key, 0, Duration::from_secs(5)).await;
        session_cleaned_up(&session, key).await;
    }
    release_sole_holder(&db, holder).await;
    // The session is still usable after its waits were cancelled.
    let one: i32 = session.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
}

/// A cancel request that reaches a backend before it has started the statement is ignored by
/// PostgreSQL. On a shared session that is the rule, not a race: a wait abandoned while a slow
/// query runs ahead of it on the session has its first cancel land on that query. pglock keeps
/// asking until the abandoned statement has ended, so no ghost waiter stays in the queue (where
/// it would hold up the session, and every release queued behind it, until the key came free).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_abandoned_behind_a_slow_query_still_leaves_the_queue() {
    let db = TestDb::new("cancel_behind_slow").await;
    let pool = db.pool(2);
    let session = db.dedicated_session().await;
    let key = db.key();
    let holder = AdvisoryLock::new(&pool, key).lock().await.unwrap();
    // Prepares the session's statements, so that the acquisition below sends its lock at once.
    let warm_up = AdvisoryLock::new(&session, db.key()).lock().await.unwrap();
    AdvisoryLockGuard::unlock(warm_up).await.unwrap();
    let slow = {
        let session = session.clone();
        tokio::spawn(async move { session.batch_execute("SELECT pg_sleep(2)").await })
    };
    // The slow query is running before the acquisition is queued behind it. It runs long enough
    // for a loaded machine's poll of pg_stat_activity to see it.
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let row = db
                .admin()
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(2)'                      AND state = 'active'",
                    &[],
                )
                .await
                .unwrap();
            if row.get::<_, i64>(0) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .expect("the slow query started");
    let lock = AdvisoryLock::new(&session, key);
    // Abandoned while the slow query still runs: its statement is queued on the session.
    assert!(tokio::time::timeout(Duration::from_millis(50), lock.lock())
        .await
        .is_err());
    // The first cancel may have ended the slow query (the documented cost of a blocking wait on a
    // shared session); either way it was the only statement the cancel could reach.
    if let Err(error) = slow.await.unwrap() {
        assert_eq!(
            error.code(),
            Some(&tokio_postgres::error::SqlState::QUERY_CANCELED),
            "{error}"
        );
    }
    // The abandoned wait leaves the queue while the holder still holds the key...
    db.wait_for_waiters(key, 0, Duration::from_secs(5)).await;
    session_cleaned_up(&session, key).await;
    // ...and the session is free for everyone else at once.
    let one: i32 = tokio::time::timeout(Duration::from_secs(5), session.query_one("SELECT 1", &[]))
        .await
        .expect("the session is not stuck behind a ghost waiter")
        .unwrap()
        .get(0);
    assert_eq!(one, 1);
    release_sole_holder(&db, holder).await;
}

/// Acquisitions on a pool abandoned right after their statement was sent, many times over: some
/// cancel requests reach the backend before the statement does, and are ignored there. None of
/// the abandoned waits may stay queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_abandoned_at_once_leave_no_ghost_waiter() {
    let db = TestDb::new("cancel_at_once").await;
    let pool = db.pool(4);
    let key = db.key();
    let holder = AdvisoryLock::new(db.pool(1), key).lock().await.unwrap();
    for round in 0..60 {
        let scope = if round % 2 == 0 {
            LockScope::Session
        } else {
            LockScope::Transaction
        };
        let lock = AdvisoryLock::new(&pool, key).scope(scope);
        // A zero timeout drops the acquisition after its first poll; the others a little later.
        // (Counting polls would hang here: a wait in the server is woken only by its answer.)
        let patience = Duration::from_micros(200 * (round % 4));
        assert!(tokio::time::timeout(patience, lock.lock()).await.is_err());
    }
    db.wait_for_waiters(key, 0, Duration::from_secs(10)).await;
    release_sole_holder(&db, holder).await;
}

/// Waiters dropped at random moments while the holder releases around the same moment: the
/// grant and the cancellation cross, and nothing may stay held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_at_random_moments_while_the_holder_releases() {
    let db = TestDb::new("cancel_random").await;
    let pool = db.pool(6);
    let session = db.dedicated_session().await;
    let key = db.key();
    let mut rng = rand::rngs::StdRng::from_entropy();
    use rand::SeedableRng;
    let mut granted = 0;
    for i in 0..1000 {
        let holder = match tokio::time::timeout(
            Duration::from_secs(5),
            AdvisoryLock::new(&pool, key).lock(),
        )
        .await
        {
            Ok(holder) => holder.unwrap(),
            Err(_) => {
                let activity: Vec<String> = db.admin().query("SELECT pid::text || ' ' || state || ' ' || query FROM pg_stat_activity WHERE application_name = $1", &[&db.app]).await.unwrap().iter().map(|r| r.get(0)).collect();
                panic!(
                    "iteration {i}: the key stayed held: {:?} {activity:?}",
                    db.locks().await
                )
            }
        };
        let lock = match i % 3 {
            0 => AdvisoryLock::new(&pool, key),
            1 => AdvisoryLock::new(&session, key),
            _ => AdvisoryLock::new(&pool, key).scope(LockScope::Transaction),
        };
        let release_after = Duration::from_micros(rng.gen_range(0..1500));
        let give_up_after = Duration::from_micros(rng.gen_range(0..1500));
        let releaser = tokio::spawn(async move {
            tokio::time::sleep(release_after).await;
            drop(holder);
        });
        if let Ok(Ok(guard)) = tokio::time::timeout(give_up_after, lock.lock()).await {
            granted += 1;
            drop(guard);
        }
        releaser.await.unwrap();
        session_cleaned_up(&session, key).await;
    }
    eprintln!("granted before the random deadline: {granted} of 1000");
    db.assert_no_locks().await;
}

/// Polling waits are cancel-safe too: dropped between attempts or during one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_polling_waits() {
    let db = TestDb::new("cancel_poll").await;
    let pool = db.pool(4);
    let key = db.key();
    let holder = AdvisoryLock::new(&pool, key).lock().await.unwrap();
    let mut rng = rand::thread_rng();
    for i in 0..100 {
        let scope = if i % 2 == 0 {
            LockScope::Session
        } else {
            LockScope::Transaction
        };
        let lock = AdvisoryLock::new(&pool, key)
            .scope(scope)
            .wait_strategy(WaitStrategy::Poll {
                initial: Duration::from_millis(1),
                max: Duration::from_millis(4),
            });
        let give_up = Duration::from_micros(rng.gen_range(0..8000));
        assert!(
            tokio::time::timeout(give_up, lock.lock()).await.is_err(),
            "the holder still holds it"
        );
    }
    assert!(
        db.waiters(key).await.is_empty(),
        "a polling waiter never queues on the server"
    );
    drop(holder);
    db.assert_no_locks().await;
}

/// An abandoned acquisition on a session whose undo (the conditional unlock queued behind it)
/// is itself ended by the repeated cancel requests, three times: the key stays held on the
/// session, which pglock then counts as free. The repeats land on the undo when it runs longer
/// than the pause between them (20 ms, then 40 ms, ...), as on a loaded machine; here an
/// administrator's `LOCK TABLE pg_locks` makes it wait that long.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undo_ended_by_the_repeated_cancels_still_releases() {
    let db = TestDb::new("cancel_undo_cancelled").await;
    let session = db.session().await;
    let key = db.key();
    // Prepares the session's statements, so that the acquisition below sends its lock at once.
    let warm_up = AdvisoryLock::new(&session, db.key()).lock().await.unwrap();
    AdvisoryLockGuard::unlock(warm_up).await.unwrap();
    let blocker = crate::harness::connect(&crate::harness::database_url()).await;
    blocker
        .batch_execute("BEGIN; LOCK TABLE pg_catalog.pg_locks IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    // Sent on the first poll and dropped: the key is free, so the lock is granted at once, and
    // the undo queued behind it waits for the view's lock while the cancel requests repeat.
    // (Rarely the answer is in within that first poll: release and try again.)
    let mut abandoned = false;
    for _ in 0..20 {
        match drop_after_polls(AdvisoryLock::new(&session, key).lock(), 1).await {
            None => {
                abandoned = true;
                break;
            }
            Some(granted) => AdvisoryLockGuard::unlock(granted.unwrap()).await.unwrap(),
        }
    }
    assert!(abandoned, "an acquisition abandoned in flight");
    // Long enough for the first three repeats (20 + 40 + 80 ms after the first request).
    tokio::time::sleep(Duration::from_millis(300)).await;
    blocker.batch_execute("ROLLBACK").await.unwrap();
    session_cleaned_up(&session, key).await;
    // pglock counts the key free on the session; the server must agree.
    db.assert_no_locks().await;
}
