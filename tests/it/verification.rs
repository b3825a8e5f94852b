//! A connection's first lock verifies it as direct to a primary's backend; from then on pglock
//! sends the plain statements there, and a connection it cannot verify keeps the checking ones
//! (see src/backend.rs). Behind PgBouncer: `pgbouncer::session_mode_keeps_the_checking_statements`;
//! on a standby: `errors::a_hot_standby_is_refused`.

use std::sync::Arc;
use std::time::Duration;

use pglock::{AdvisoryLock, AdvisoryLockGuard, ConnectionSource, LockScope, Session};

use crate::harness::{prepared_lock_statements, TestDb};

/// The plain statements, as the server sees them.
const PLAIN_LOCK: &str = "SELECT pg_advisory_lock($1::int8) IS NOT NULL";
const PLAIN_COMBINED: &str = "SELECT pg_advisory_lock($1::int8) IS NOT NULL, u.released \
     FROM (SELECT pg_advisory_unlock($1::int8) AS released OFFSET 0) AS u";

/// The first lock on a session runs the checking statement and verifies the session; the next
/// ones run the plain statements, and they lock, exclude and release as the others do.
#[tokio::test]
async fn a_direct_session_is_verified_by_its_first_lock() {
    let db = TestDb::new("verify_session").await;
    let session = db.dedicated_session().await;
    let other = db.dedicated_session().await;
    let key = db.key();
    let lock = AdvisoryLock::new(&session, key);

    let guard = lock.lock().await.unwrap();
    let pid = AdvisoryLockGuard::backend_pid(&guard);
    assert!(db.statement_of(pid).await.contains("pg_backend_pid()"));
    AdvisoryLockGuard::unlock(guard).await.unwrap();

    let guard = lock.lock().await.unwrap();
    assert_eq!(db.statement_of(pid).await, PLAIN_LOCK);
    assert_eq!(db.holders(key).await, [pid]);
    assert!(AdvisoryLock::new(&other, key)
        .try_lock()
        .await
        .unwrap()
        .is_none());
    AdvisoryLockGuard::unlock(guard).await.unwrap();
    assert!(db.holders(key).await.is_empty());

    // The other kinds of acquisition, plain too: with a timeout, shared, transaction-scoped.
    let guard = lock
        .try_lock_for(Duration::from_secs(5))
        .await
        .unwrap()
        .expect("free");
    assert!(!db.statement_of(pid).await.contains("pg_backend_pid()"));
    // Held by the session itself: waited for in-process, busy once the timeout has passed.
    assert!(lock
        .try_lock_for(Duration::from_millis(50))
        .await
        .unwrap()
        .is_none());
    AdvisoryLockGuard::unlock(guard).await.unwrap();
    let shared = lock.lock_shared().await.unwrap();
    assert_eq!(
        db.statement_of(pid).await,
        "SELECT pg_advisory_lock_shared($1::int8) IS NOT NULL"
    );
    AdvisoryLockGuard::unlock(shared).await.unwrap();
    let in_transaction = AdvisoryLock::new(&session, key)
        .scope(LockScope::Transaction)
        .lock()
        .await
        .unwrap();
    assert_eq!(
        db.statement_of(pid).await,
        "SELECT pg_advisory_xact_lock($1::int8) IS NOT NULL"
    );
    AdvisoryLockGuard::commit(in_transaction).await.unwrap();

    drop((lock, session, other));
    db.assert_no_locks().await;
}

/// A `lock` + drop loop from a connection's first lock on: the second cycle already sends the
/// plain combined statement (the first acquisition prepared the plain forms beside the checking
/// ones), and every cycle holds the key once.
#[tokio::test]
async fn a_lock_and_drop_loop_reaches_the_plain_combined_statement() {
    let db = TestDb::new("verify_drop_loop").await;
    let session = db.dedicated_session().await;
    let pool = db.pool(1);
    for lock in [
        AdvisoryLock::new(&session, db.key()),
        AdvisoryLock::new(&pool, db.key()),
    ] {
        let guard = lock.lock().await.unwrap();
        let pid = AdvisoryLockGuard::backend_pid(&guard);
        let key = AdvisoryLockGuard::key(&guard);
        assert!(db.statement_of(pid).await.contains("pg_backend_pid()"));
        drop(guard);
        for _ in 0..5 {
            let guard = lock.lock().await.unwrap();
            assert_eq!(db.statement_of(pid).await, PLAIN_COMBINED);
            assert_eq!(
                db.locks().await,
                [(pid, key, "ExclusiveLock".to_owned(), true)]
            );
            drop(guard);
        }
        drop(lock);
        db.assert_no_locks().await;
    }
}

/// On a pool, what pglock learned about a connection outlives the checkout: another lock of
/// the same source finds the connection verified and runs the plain statements at once.
#[tokio::test]
async fn a_pooled_connection_stays_verified_across_checkouts() {
    let db = TestDb::new("verify_pool").await;
    let source = ConnectionSource::from(db.open_pool(1).await);
    let (first, second) = (db.key(), db.key());

    let guard = AdvisoryLock::new(source.clone(), first)
        .lock()
        .await
        .unwrap();
    let pid = AdvisoryLockGuard::backend_pid(&guard);
    assert!(db.statement_of(pid).await.contains("pg_backend_pid()"));
    AdvisoryLockGuard::unlock(guard).await.unwrap();

    let guard = AdvisoryLock::new(source.clone(), second)
        .lock()
        .await
        .unwrap();
    assert_eq!(db.statement_of(pid).await, PLAIN_LOCK);
    assert_eq!(db.holders(second).await, [pid]);
    AdvisoryLockGuard::unlock(guard).await.unwrap();

    drop(source);
    db.assert_no_locks().await;
}

/// A lock made for one acquisition (one per request, say) builds a new source each time; the
/// pooled connection it gets was verified through another lock, and it sends the plain
/// statements at once, prepared then. A source that always checks does not take that verdict
/// over.
#[tokio::test]
async fn a_lock_made_per_acquisition_finds_its_pooled_connection_verified() {
    let db = TestDb::new("verify_per_request").await;
    let pool = db.open_pool(1).await;
    let guard = AdvisoryLock::new(&pool, db.key()).lock().await.unwrap();
    let pid = AdvisoryLockGuard::backend_pid(&guard);
    assert!(db.statement_of(pid).await.contains("pg_backend_pid()"));
    AdvisoryLockGuard::unlock(guard).await.unwrap();
    let mut prepared = None;
    for _ in 0..3 {
        let guard = AdvisoryLock::new(&pool, db.key()).lock().await.unwrap();
        assert_eq!(AdvisoryLockGuard::backend_pid(&guard), pid);
        assert_eq!(db.statement_of(pid).await, PLAIN_LOCK);
        // Nor does it prepare its statements again: they are remembered with the connection.
        let now = prepared_lock_statements(&guard).await;
        assert_eq!(*prepared.get_or_insert(now), now);
        AdvisoryLockGuard::unlock(guard).await.unwrap();
    }
    let checking = ConnectionSource::from(&pool).always_check_backend();
    let guard = AdvisoryLock::new(checking, db.key()).lock().await.unwrap();
    assert!(db.statement_of(pid).await.contains("pg_backend_pid()"));
    AdvisoryLockGuard::unlock(guard).await.unwrap();

    drop(pool);
    db.assert_no_locks().await;
}

/// `always_check_backend` keeps the checking statements, on a session and on a pool.
#[tokio::test]
async fn always_check_backend_keeps_the_checking_statements() {
    let db = TestDb::new("verify_never").await;
    let key = db.key();
    let session = Arc::new(
        Session::connect(&db.url())
            .await
            .unwrap()
            .always_check_backend(),
    );
    let source = ConnectionSource::from(db.open_pool(1).await).always_check_backend();
    let on_session = AdvisoryLock::new(&session, key);
    let on_pool = AdvisoryLock::new(source, db.key());
    for _ in 0..3 {
        let guard = on_session.lock().await.unwrap();
        AdvisoryLockGuard::unlock(guard).await.unwrap();
        drop(on_session.lock().await.unwrap());
        let guard = on_pool.lock().await.unwrap();
        assert_eq!(prepared_lock_statements(&guard).await.1, 0);
        drop(guard);
    }
    let guard = on_session.lock().await.unwrap();
    assert_eq!(prepared_lock_statements(session.client()).await, (3, 0));
    AdvisoryLockGuard::unlock(guard).await.unwrap();

    drop((on_session, on_pool, session));
    db.assert_no_locks().await;
}

/// A `LockSet`'s batches verify their session too, and then ask in the plain form; the guards
/// they hand out release with the plain unlock.
#[tokio::test]
async fn a_lock_set_verifies_its_session_and_batches_plainly() {
    let db = TestDb::new("verify_lock_set").await;
    let session = db.session().await;
    let set = pglock::LockSet::from_sessions([session.clone()]).unwrap();
    let plain_batch =
        "SELECT t.i, pg_try_advisory_lock(t.k) FROM unnest($1::int8[]) WITH ORDINALITY AS t(k, i)";
    let first = set.try_lock(db.key()).await.unwrap().expect("free");
    assert!(db
        .statement_of(AdvisoryLockGuard::backend_pid(&first))
        .await
        .contains("pg_backend_pid()"));
    let keys = [db.key(), db.key(), db.key()];
    let guards = futures_util::future::join_all(keys.iter().map(|key| set.try_lock(*key))).await;
    let pid = AdvisoryLockGuard::backend_pid(&first);
    assert_eq!(db.statement_of(pid).await, plain_batch);
    for (key, guard) in keys.iter().zip(guards) {
        let guard = guard.unwrap().expect("free");
        assert_eq!(db.holders(*key).await, [pid]);
        AdvisoryLockGuard::unlock(guard).await.unwrap();
        assert!(db.holders(*key).await.is_empty());
    }
    AdvisoryLockGuard::unlock(first).await.unwrap();
    drop((set, session));
    db.assert_no_locks().await;
}
