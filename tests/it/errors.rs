//! Bad input and hostile conditions give typed errors and lose nothing.

use std::future::Future;
use std::time::Duration;

use pglock::{AdvisoryLock, AdvisoryLockGuard, ConnectionSource, Error, Session, WaitStrategy};

use crate::harness::TestDb;
use crate::support::{StopMode, ThrowawayCluster};

#[tokio::test]
async fn bad_urls_and_unreachable_servers_never_show_the_password() {
    let error = Session::connect("postgres://app:hunter2@127.0.0.1:1/db")
        .await
        .unwrap_err();
    assert!(matches!(error, Error::Connect { .. }), "{error:?}");
    let message = error.to_string();
    assert!(!message.contains("hunter2"), "{message}");
    assert!(message.contains("app:***@127.0.0.1:1"), "{message}");
    assert!(
        message.to_lowercase().contains("refused"),
        "the cause is shown: {message}"
    );

    let error = Session::connect("postgres://app:hunter2@127.0.0.1:5432/db?sslmode=bogus")
        .await
        .unwrap_err();
    assert!(matches!(error, Error::Config(_)), "{error:?}");
    assert!(!error.to_string().contains("hunter2"), "{error}");
    assert!(!format!("{error:?}").contains("hunter2"), "{error:?}");

    let error =
        Session::connect("host=127.0.0.1 port=5432 user=nobody_here password=hunter2 dbname=test")
            .await
            .unwrap_err();
    assert!(matches!(error, Error::Connect { .. }), "{error:?}");
    assert!(!error.to_string().contains("hunter2"), "{error}");
}

#[tokio::test]
async fn an_exhausted_pool_is_a_typed_error_and_the_holder_keeps_its_lock() {
    let db = TestDb::new("pool_exhausted").await;
    let config: tokio_postgres::Config = db.url().parse().unwrap();
    let manager = deadpool_postgres::Manager::new(config, tokio_postgres::NoTls);
    let pool = deadpool_postgres::Pool::builder(manager)
        .max_size(1)
        .wait_timeout(Some(Duration::from_millis(100)))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .unwrap();
    let key = db.key();
    let guard = AdvisoryLock::new(&pool, key).lock().await.unwrap();
    let error = AdvisoryLock::new(&pool, db.key()).lock().await.unwrap_err();
    assert!(matches!(error, Error::PoolExhausted), "{error:?}");
    assert!(error.to_string().contains("max_size"), "{error}");
    assert_eq!(
        db.holders(key).await,
        vec![AdvisoryLockGuard::backend_pid(&guard)]
    );
    AdvisoryLockGuard::unlock(guard).await.unwrap();
    db.assert_no_locks().await;
}

#[tokio::test]
async fn a_wait_cancelled_by_an_administrator_is_typed() {
    let db = TestDb::new("admin_cancel").await;
    let pool = db.pool(2);
    let key = db.key();
    let holder = AdvisoryLock::new(&pool, key).lock().await.unwrap();
    let waiter = tokio::spawn({
        let lock = AdvisoryLock::new(&pool, key);
        async move { lock.lock().await.map(drop) }
    });
    db.wait_for_waiters(key, 1, Duration::from_secs(5)).await;
    let pid = db.waiters(key).await[0];
    db.admin()
        .execute("SELECT pg_cancel_backend($1)", &[&pid])
        .await
        .unwrap();
    let error = waiter.await.unwrap().unwrap_err();
    assert!(
        matches!(error, Error::Cancelled { key: k, .. } if k == key),
        "{error:?}"
    );
    drop(holder);
    db.assert_no_locks().await;
}

/// A standby answers advisory lock calls, but its locks do not coordinate with the primary:
/// pglock refuses there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_standby_is_refused() {
    // A hot standby needs the WAL of a replica-level primary.
    let cluster = ThrowawayCluster::builder()
        .setting("wal_level", "replica")
        .setting("max_wal_senders", 2)
        .start()
        .await;
    cluster.stop(StopMode::Fast).await;
    let signal = cluster.data_dir().join("standby.signal");
    std::fs::write(&signal, b"").unwrap();
    let status = std::process::Command::new("chown")
        .arg("postgres:postgres")
        .arg(&signal)
        .status()
        .unwrap();
    assert!(status.success());
    cluster.start_again().await;
    let session = Session::connect(&cluster.url()).await.unwrap();
    let in_recovery: bool = session
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(in_recovery, "the cluster should be a standby");
    // Dedicated to this task: transaction scope is allowed there.
    let session = std::sync::Arc::new(session.dedicated());
    for lock in [
        AdvisoryLock::new(&session, "migrations"),
        AdvisoryLock::new(&session, "migrations").scope(pglock::LockScope::Transaction),
    ] {
        let error = lock.lock().await.unwrap_err();
        assert!(matches!(error, Error::ReadOnlyStandby), "{error:?}");
        assert!(error.to_string().contains("primary"), "{error}");
        assert!(matches!(lock.try_lock().await, Err(Error::ReadOnlyStandby)));
    }
    // A set's requests go out together, and are refused together.
    let set = pglock::LockSet::from_sessions([session.clone()]).unwrap();
    let (single, pair) = futures_util::future::join(
        set.try_lock(7i64),
        set.try_lock(pglock::AdvisoryKey::Pair(7, 8)),
    )
    .await;
    assert!(matches!(single, Err(Error::ReadOnlyStandby)), "{single:?}");
    assert!(matches!(pair, Err(Error::ReadOnlyStandby)), "{pair:?}");
    let advisory_locks = || async {
        session
            .query_one(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    assert_eq!(advisory_locks().await, 0);
    // Promoted, the server takes locks on the same session: a connection found on a standby is
    // never verified as direct (src/backend.rs), and its checking statements now grant.
    let promoted: bool = session
        .query_one("SELECT pg_promote(true, 30)", &[])
        .await
        .unwrap()
        .get(0);
    assert!(promoted);
    let lock = AdvisoryLock::new(&session, "migrations");
    let observer = crate::harness::connect(&cluster.url()).await;
    for _ in 0..2 {
        let guard = lock.lock().await.expect("a primary now");
        let pid = AdvisoryLockGuard::backend_pid(&guard);
        let sql: String = observer
            .query_one("SELECT query FROM pg_stat_activity WHERE pid = $1", &[&pid])
            .await
            .unwrap()
            .get(0);
        assert!(sql.contains("pg_is_in_recovery()"), "still checking: {sql}");
        assert_eq!(advisory_locks().await, 1);
        AdvisoryLockGuard::unlock(guard).await.unwrap();
    }
    drop(lock);
    assert_eq!(advisory_locks().await, 0);
}

/// The holder of a lock runs CREATE INDEX CONCURRENTLY, which waits for every transaction with
/// an older snapshot, including a session blocked on the lock: PostgreSQL's deadlock detector
/// then kills the blocked waiter (or, when the build's own check runs first, the build). A
/// polling waiter never blocks, so it gets the lock afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_index_concurrently_deadlocks_a_blocked_waiter_but_not_a_polling_one() {
    // CREATE INDEX CONCURRENTLY waits for every older snapshot in its database, including those
    // of unrelated tests running in parallel: it gets a server of its own.
    let cluster = ThrowawayCluster::start().await;
    let db = TestDb::on_server(&cluster.url(), "cic").await;
    let pool = db.pool(3);
    let table = format!("pglock_cic_{:08x}", rand::random::<u32>());
    db.admin()
        .batch_execute(&format!("CREATE TABLE {table} (v int)"))
        .await
        .unwrap();

    for (round, polling) in [(0, false), (1, true)] {
        let key = db.key();
        let holder = AdvisoryLock::new(&pool, key).lock().await.unwrap();
        let strategy = if polling {
            WaitStrategy::Poll {
                initial: Duration::from_millis(5),
                max: Duration::from_millis(50),
            }
        } else {
            WaitStrategy::Block
        };
        let mut waiter = tokio::spawn({
            let lock = AdvisoryLock::new(&pool, key).wait_strategy(strategy);
            async move {
                let guard = lock.lock().await?;
                AdvisoryLockGuard::unlock(guard).await
            }
        });
        if !polling {
            db.wait_for_waiters(key, 1, Duration::from_secs(5)).await;
        } else {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let statement = format!("CREATE INDEX CONCURRENTLY {table}_v{round} ON {table} (v)");
        if polling {
            tokio::time::timeout(Duration::from_secs(20), holder.batch_execute(&statement))
                .await
                .expect("CREATE INDEX CONCURRENTLY hung")
                .unwrap();
            AdvisoryLockGuard::unlock(holder).await.unwrap();
            let result = tokio::time::timeout(Duration::from_secs(10), waiter)
                .await
                .unwrap()
                .unwrap();
            result.expect("the polling waiter gets the lock once the holder is done");
            continue;
        }
        // A blocked waiter: depending on which backend's deadlock check sees the cycle, the
        // waiter is killed with SQLSTATE 40P01, or both wait on each other indefinitely (what
        // PostgreSQL 15.20 does here). Either way only giving up on the wait resolves it. Under
        // heavy CPU load the index build's own check can run first and make the build the
        // victim instead: the waiter then gets the lock once the holder lets go.
        let mut cic = Box::pin(holder.batch_execute(&statement));
        let mut waiter_gets_the_lock = false;
        match tokio::time::timeout(Duration::from_secs(3), cic.as_mut()).await {
            Ok(Ok(())) => {
                let result = tokio::time::timeout(Duration::from_secs(10), &mut waiter)
                    .await
                    .unwrap()
                    .unwrap();
                let error = result.expect_err("the waiter was the deadlock victim");
                assert!(error.is_deadlock(), "{error:?}");
                assert_eq!(
                    error.code(),
                    Some(&tokio_postgres::error::SqlState::T_R_DEADLOCK_DETECTED)
                );
            }
            Ok(Err(cic_error)) => {
                assert_eq!(
                    cic_error.code(),
                    Some(&tokio_postgres::error::SqlState::T_R_DEADLOCK_DETECTED),
                    "the index build fails only as the deadlock victim: {cic_error:?}"
                );
                waiter_gets_the_lock = true;
            }
            Err(_) => {
                assert!(
                    !waiter.is_finished(),
                    "the waiter is still blocked behind the holder"
                );
                // Dropping the wait cancels it on the server, which unblocks the index build.
                waiter.abort();
                tokio::time::timeout(Duration::from_secs(10), cic.as_mut())
                    .await
                    .expect("CIC finishes once the wait is cancelled")
                    .unwrap();
            }
        }
        drop(cic);
        AdvisoryLockGuard::unlock(holder).await.unwrap();
        if waiter_gets_the_lock {
            tokio::time::timeout(Duration::from_secs(10), waiter)
                .await
                .unwrap()
                .unwrap()
                .expect("the waiter gets the lock once the holder lets go");
        }
    }
    db.admin()
        .batch_execute(&format!("DROP TABLE {table}"))
        .await
        .unwrap();
    db.assert_no_locks().await;
}

/// PostgreSQL answers COMMIT of a failed transaction with a rollback and no error: `commit`
/// must not report that as committed.
#[tokio::test]
async fn commit_of_a_failed_transaction_is_reported_as_rolled_back() {
    let db = TestDb::new("commit_rolled_back").await;
    let pool = db.pool(2);
    let table = format!("pglock_rollback_{:08x}", rand::random::<u32>());
    db.admin()
        .batch_execute(&format!("CREATE TABLE {table} (v int)"))
        .await
        .unwrap();
    let lock = AdvisoryLock::new(&pool, db.key()).scope(pglock::LockScope::Transaction);
    let insert = format!("INSERT INTO {table} VALUES (1)");

    // A healthy transaction commits, and says so.
    let guard = lock.lock().await.unwrap();
    guard.batch_execute(&insert).await.unwrap();
    AdvisoryLockGuard::commit(guard).await.unwrap();

    // A failed one is rolled back by the COMMIT, and says so too (through unlock as well).
    for via_unlock in [false, true] {
        let guard = lock.lock().await.unwrap();
        guard.batch_execute(&insert).await.unwrap();
        assert!(guard.batch_execute("SELECT 1/0").await.is_err());
        let error = if via_unlock {
            AdvisoryLockGuard::unlock(guard).await.unwrap_err()
        } else {
            AdvisoryLockGuard::commit(guard).await.unwrap_err()
        };
        assert!(matches!(error, Error::RolledBack { .. }), "{error:?}");
        let message = error.to_string();
        assert!(message.contains("rolled it back"), "{message}");
        assert!(message.contains("25P02"), "{message}");
    }
    let rows: i64 = db
        .admin()
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 1, "only the healthy transaction's row was committed");
    db.assert_no_locks().await;
    // The lock is free for the next holder.
    assert!(lock.try_lock().await.unwrap().is_some());
    db.admin()
        .batch_execute(&format!("DROP TABLE {table}"))
        .await
        .unwrap();
}

/// The protected work's own mistakes on a live connection are not reported as a lost
/// connection (which would tell the caller that its lock is gone).
#[tokio::test]
async fn a_statement_error_of_protected_work_is_not_a_lost_connection() {
    let db = TestDb::new("statement_error_kind").await;
    let pool = db.pool(1);
    let guard = AdvisoryLock::new(&pool, db.key()).lock().await.unwrap();
    async fn no_row(client: &tokio_postgres::Client) -> pglock::Result<i32> {
        Ok(client.query_one("SELECT 1 WHERE false", &[]).await?.get(0))
    }
    let error = no_row(&guard).await.unwrap_err();
    assert!(!error.is_connection_lost(), "{error:?}");
    assert!(matches!(error, Error::Postgres(_)), "{error:?}");
    // The lock is still held and the guard still works.
    assert!(!AdvisoryLockGuard::is_lost(&guard));
    AdvisoryLockGuard::unlock(guard).await.unwrap();
    db.assert_no_locks().await;
}

/// pglock remembers the statements it prepared on each pooled connection across checkouts. If
/// someone deallocates them (`DEALLOCATE ALL` on a pooled connection), the server refuses the
/// next acquisition's statement before running it. On a connection verified as direct
/// (src/backend.rs) that can only mean the statements are gone: pglock closes that connection
/// and acquires on a fresh one, at once. On a connection it could not verify, the same refusal
/// may be a backend that changed under a transaction pooler, so it reports the typed error, and
/// the acquisition after it works.
#[tokio::test]
async fn deallocated_statements_on_a_pooled_connection() {
    let db = TestDb::new("deallocated_pool").await;
    for verified in [true, false] {
        let pool = db.pool(1);
        let source = ConnectionSource::from(&pool);
        let source = if verified {
            source
        } else {
            source.always_check_backend()
        };
        let key = db.key();
        let lock = AdvisoryLock::new(source, key);
        for try_first in [false, true] {
            let acquire = || async {
                if try_first {
                    lock.try_lock().await.map(|guard| guard.expect("free"))
                } else {
                    lock.lock().await
                }
            };
            // Twice: the first lock on a connection verifies it, and the second runs the plain
            // statements it uses from then on (the ones to deallocate).
            let mut first_pid = 0;
            for _ in 0..2 {
                let guard = acquire().await.unwrap();
                first_pid = AdvisoryLockGuard::backend_pid(&guard);
                AdvisoryLockGuard::unlock(guard).await.unwrap();
            }
            // The same (only) connection, behind pglock's back.
            let object = pool.get().await.unwrap();
            object.batch_execute("DEALLOCATE ALL").await.unwrap();
            drop(object);
            let guard = if verified {
                acquire().await.expect("acquired again at once")
            } else {
                fails_once_then_acquires(&db, acquire).await
            };
            assert_ne!(
                AdvisoryLockGuard::backend_pid(&guard),
                first_pid,
                "acquired on a fresh connection"
            );
            assert_eq!(db.holders(key).await.len(), 1);
            AdvisoryLockGuard::unlock(guard).await.unwrap();
            db.assert_no_locks().await;
        }
    }
}

/// After its statements were deallocated behind pglock's back, on a connection pglock could
/// not verify as direct: the next acquisition is refused with the typed error and takes
/// nothing, and the one after it is granted (its guard returned).
async fn fails_once_then_acquires<F, Fut>(db: &TestDb, acquire: F) -> AdvisoryLockGuard
where
    F: Fn() -> Fut,
    Fut: Future<Output = pglock::Result<AdvisoryLockGuard>>,
{
    let error = acquire().await.unwrap_err();
    assert!(matches!(error, Error::BackendChanged { .. }), "{error:?}");
    db.assert_no_locks().await;
    acquire().await.unwrap()
}

/// The same on a shared session: it forgets its statements and prepares them again, on the
/// same session.
#[tokio::test]
async fn deallocated_statements_on_a_session() {
    let db = TestDb::new("deallocated_session").await;
    for verified in [true, false] {
        let session = Session::connect(&db.url()).await.unwrap();
        let session = if verified {
            session
        } else {
            session.always_check_backend()
        };
        let session = std::sync::Arc::new(session);
        let key = db.key();
        let lock = AdvisoryLock::new(&session, key);
        for _ in 0..2 {
            AdvisoryLockGuard::unlock(lock.lock().await.unwrap())
                .await
                .unwrap();
        }
        session.batch_execute("DEALLOCATE ALL").await.unwrap();
        let guard = if verified {
            lock.lock().await.expect("acquired again at once")
        } else {
            fails_once_then_acquires(&db, || lock.lock()).await
        };
        assert_eq!(db.holders(key).await, [session_pid(&session).await]);
        AdvisoryLockGuard::unlock(guard).await.unwrap();
        db.assert_no_locks().await;
    }
}

async fn session_pid(session: &Session) -> i32 {
    session
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0)
}

/// A held lock whose unlock statement was deallocated (through the guard's own connection) is
/// still released: pglock sends the guarded unlock again without preparing it, on a session and
/// on a pool, by `unlock` and by drop.
#[tokio::test]
async fn a_lock_whose_unlock_was_deallocated_is_still_released() {
    let db = TestDb::new("deallocated_unlock").await;
    let session = db.session().await;
    let pool = db.pool(1);
    let key = db.key();
    for (on_pool, by_drop) in [(false, false), (false, true), (true, false), (true, true)] {
        let lock = if on_pool {
            AdvisoryLock::new(&pool, key)
        } else {
            AdvisoryLock::new(&session, key)
        };
        let guard = lock.lock().await.unwrap();
        guard.batch_execute("DEALLOCATE ALL").await.unwrap();
        if by_drop {
            drop(guard);
            tokio::time::timeout(Duration::from_secs(5), async {
                while !db.holders(key).await.is_empty() {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            })
            .await
            .expect("the dropped guard's lock was released");
        } else {
            AdvisoryLockGuard::unlock(guard).await.unwrap();
        }
        db.assert_no_locks().await;
        // The next acquisition prepares again and works.
        AdvisoryLockGuard::unlock(lock.lock().await.unwrap())
            .await
            .unwrap();
        db.assert_no_locks().await;
    }
}
