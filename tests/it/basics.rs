use std::time::Duration;

use pglock::{AdvisoryLock, AdvisoryLockGuard, LockScope};

use crate::harness::TestDb;

#[tokio::test]
async fn lock_unlock_on_pool_and_session() {
    let db = TestDb::new("lock_unlock").await;
    let pool = db.pool(2);
    let key = db.key();
    let lock = AdvisoryLock::new(&pool, key);
    let guard = lock.lock().await.unwrap();
    assert_eq!(
        db.holders(key).await,
        vec![AdvisoryLockGuard::backend_pid(&guard)]
    );
    assert!(
        lock.try_lock().await.unwrap().is_none(),
        "second connection must not get it"
    );
    AdvisoryLockGuard::unlock(guard).await.unwrap();
    assert!(db.holders(key).await.is_empty());

    let session = db.session().await;
    let on_session = AdvisoryLock::new(session.clone(), key);
    let guard = on_session.lock().await.unwrap();
    // Held by the session itself: busy, as when another session holds it.
    assert!(on_session.try_lock().await.unwrap().is_none());
    drop(guard);
    db.assert_no_locks().await;
}

#[tokio::test]
async fn timeout_statement_restores_lock_timeout() {
    let db = TestDb::new("timeout_restore").await;
    let pool = db.pool(2);
    let key = db.key();
    let lock = AdvisoryLock::new(&pool, key).scope(LockScope::Transaction);
    let holder = AdvisoryLock::new(&pool, key).lock().await.unwrap();
    let started = std::time::Instant::now();
    assert!(lock
        .try_lock_for(Duration::from_millis(200))
        .await
        .unwrap()
        .is_none());
    assert!(
        started.elapsed() >= Duration::from_millis(190),
        "{:?}",
        started.elapsed()
    );
    drop(holder);
    db.wait_for_waiters(key, 0, Duration::from_secs(2)).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let guard = lock
        .try_lock_for(Duration::from_secs(5))
        .await
        .unwrap()
        .expect("free now");
    let setting: String = guard
        .query_one("SHOW lock_timeout", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        setting, "0",
        "the statement-scoped lock_timeout leaked into the transaction"
    );
    AdvisoryLockGuard::commit(guard).await.unwrap();
    db.assert_no_locks().await;
}
