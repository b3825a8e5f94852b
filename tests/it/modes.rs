//! Try-lock contention, shared and exclusive modes, both scopes, both key spaces.

use std::time::Duration;

use pglock::{AdvisoryKey, AdvisoryLock, AdvisoryLockGuard, Error, LockMode, LockScope};

use crate::harness::TestDb;

#[tokio::test]
async fn try_lock_is_none_while_held_and_some_after() {
    let db = TestDb::new("try_lock").await;
    let pool = db.pool(3);
    let lock = AdvisoryLock::new(&pool, db.key());
    let held = lock.try_lock().await.unwrap().expect("free key");
    for _ in 0..10 {
        assert!(lock.try_lock().await.unwrap().is_none());
        assert!(lock.try_lock_shared().await.unwrap().is_none());
    }
    AdvisoryLockGuard::unlock(held).await.unwrap();
    let again = lock.try_lock().await.unwrap().expect("released key");
    drop(again);
    db.assert_no_locks().await;
}

#[tokio::test]
async fn shared_holders_coexist_and_exclude_exclusive() {
    let db = TestDb::new("shared").await;
    let pool = db.pool(5);
    let key = db.key();
    let lock = AdvisoryLock::new(&pool, key);
    let a = lock.lock_shared().await.unwrap();
    let b = lock
        .try_lock_shared()
        .await
        .unwrap()
        .expect("shared with shared");
    let c = lock
        .try_lock_shared_for(Duration::from_millis(50))
        .await
        .unwrap()
        .expect("shared");
    assert_eq!(AdvisoryLockGuard::mode(&a), LockMode::Shared);
    assert_eq!(db.holders(key).await.len(), 3);
    assert!(
        lock.try_lock().await.unwrap().is_none(),
        "exclusive while shared holders exist"
    );
    assert!(lock
        .try_lock_for(Duration::from_millis(50))
        .await
        .unwrap()
        .is_none());
    drop((a, b));
    AdvisoryLockGuard::unlock(c).await.unwrap();
    let exclusive = lock
        .try_lock_for(Duration::from_secs(5))
        .await
        .unwrap()
        .expect("all shared gone");
    assert!(
        lock.try_lock_shared().await.unwrap().is_none(),
        "shared while exclusive held"
    );
    drop(exclusive);
    db.assert_no_locks().await;
}

#[tokio::test]
async fn the_two_key_spaces_are_disjoint() {
    let db = TestDb::new("key_spaces").await;
    let pool = db.pool(2);
    let raw: i32 = rand::random::<i32>() & 0x3fff_ffff;
    let single = AdvisoryLock::new(&pool, AdvisoryKey::Single(i64::from(raw)));
    let pair = AdvisoryLock::new(&pool, AdvisoryKey::Pair(0, raw));
    let a = single.lock().await.unwrap();
    let b = pair.try_lock().await.unwrap().expect("(0, k) is not k");
    assert_eq!(
        db.holders(AdvisoryKey::Pair(0, raw)).await,
        vec![AdvisoryLockGuard::backend_pid(&b)]
    );
    drop((a, b));
    db.assert_no_locks().await;
}

#[tokio::test]
async fn transaction_scope_commit_rollback_and_drop() {
    let db = TestDb::new("xact").await;
    let pool = db.pool(3);
    let key = db.key();
    let table = format!("pglock_xact_{}", rand::random::<u32>());
    db.admin()
        .batch_execute(&format!("CREATE TABLE {table} (v int)"))
        .await
        .unwrap();
    let lock = AdvisoryLock::new(&pool, key).scope(LockScope::Transaction);
    let session_lock = AdvisoryLock::new(&pool, key);

    // Commit keeps the work and frees the lock.
    let guard = lock.lock().await.unwrap();
    assert_eq!(AdvisoryLockGuard::scope(&guard), LockScope::Transaction);
    guard
        .execute(&format!("INSERT INTO {table} VALUES (1)"), &[])
        .await
        .unwrap();
    assert!(
        session_lock.try_lock().await.unwrap().is_none(),
        "held by the transaction"
    );
    AdvisoryLockGuard::commit(guard).await.unwrap();
    assert!(db.holders(key).await.is_empty());

    // Rollback discards the work and frees the lock.
    let guard = lock.try_lock().await.unwrap().unwrap();
    guard
        .execute(&format!("INSERT INTO {table} VALUES (2)"), &[])
        .await
        .unwrap();
    AdvisoryLockGuard::rollback(guard).await.unwrap();
    assert!(db.holders(key).await.is_empty());

    // Drop rolls back.
    let guard = lock
        .try_lock_for(Duration::from_secs(1))
        .await
        .unwrap()
        .unwrap();
    guard
        .execute(&format!("INSERT INTO {table} VALUES (3)"), &[])
        .await
        .unwrap();
    drop(guard);
    db.assert_no_locks().await;
    let rows: Vec<i32> = db
        .admin()
        .query(&format!("SELECT v FROM {table} ORDER BY v"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(rows, vec![1]);

    // Busy transaction-scoped try leaves no transaction open behind it.
    let holder = session_lock.lock().await.unwrap();
    assert!(lock.try_lock().await.unwrap().is_none());
    assert!(lock
        .try_lock_for(Duration::from_millis(30))
        .await
        .unwrap()
        .is_none());
    drop(holder);
    let open: i64 = db.admin().query_one(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND state LIKE 'idle in transaction%'",
        &[&db.app],
    ).await.unwrap().get(0);
    assert_eq!(open, 0, "a busy attempt left a transaction open");

    // Commit and rollback are refused on a session guard, which stays usable.
    let guard = session_lock.lock().await.unwrap();
    assert!(matches!(
        AdvisoryLockGuard::commit(guard).await,
        Err(Error::Config(_))
    ));
    db.assert_no_locks().await;
    db.admin()
        .batch_execute(&format!("DROP TABLE {table}"))
        .await
        .unwrap();
}

#[tokio::test]
async fn session_transaction_scope_and_reentrancy() {
    let db = TestDb::new("session_reentry").await;
    // Transaction scope needs a session that one task uses.
    let session = std::sync::Arc::new(
        pglock::Session::connect(&db.url())
            .await
            .unwrap()
            .dedicated(),
    );
    let pool = db.pool(1);
    let (k1, k2) = (db.key(), db.key());

    let a = AdvisoryLock::new(&session, k1).lock().await.unwrap();
    // Another key on the same session is fine; the same key is never stacked: a `try` finds
    // it busy without a round trip, a wait waits in-process for the guard to go.
    let b = AdvisoryLock::new(&session, k2)
        .try_lock()
        .await
        .unwrap()
        .unwrap();
    assert!(tokio::time::timeout(
        Duration::from_millis(50),
        AdvisoryLock::new(&session, k1).lock()
    )
    .await
    .is_err());
    assert!(AdvisoryLock::new(&session, k1)
        .try_lock_shared()
        .await
        .unwrap()
        .is_none());
    assert_eq!(db.holders(k1).await.len(), 1, "never stacked");
    // A different connection of the same process is just another session: busy.
    assert!(AdvisoryLock::new(&pool, k1)
        .try_lock()
        .await
        .unwrap()
        .is_none());
    AdvisoryLockGuard::unlock(a).await.unwrap();
    assert!(!session.holds(k1));
    // One pglock transaction at a time on a session.
    let tx = AdvisoryLock::new(&session, k1)
        .scope(LockScope::Transaction)
        .lock()
        .await
        .unwrap();
    let k3 = db.key();
    assert!(matches!(
        AdvisoryLock::new(&session, k3)
            .scope(LockScope::Transaction)
            .try_lock()
            .await,
        Err(Error::TransactionInProgress)
    ));
    AdvisoryLockGuard::commit(tx).await.unwrap();
    // After the commit, the session lock b is still held and the key k1 is free.
    assert_eq!(db.holders(k2).await.len(), 1);
    assert!(db.holders(k1).await.is_empty());
    drop(b);
    db.assert_no_locks().await;
}
