//! Release paths: drop, explicit unlock, panics, a vanished runtime, a killed backend.

use std::sync::Arc;
use std::time::Duration;

use pglock::{AdvisoryLock, AdvisoryLockGuard, Error, Session};

use crate::harness::{session_cleaned_up, wait_for_alive_tasks, TestDb};

#[tokio::test]
async fn drop_releases_and_pool_connection_is_reused_clean() {
    let db = TestDb::new("drop_release").await;
    let pool = db.pool(1);
    let key = db.key();
    let lock = AdvisoryLock::new(&pool, key);
    for _ in 0..50 {
        let guard = lock.lock().await.unwrap();
        drop(guard);
    }
    // The single pooled connection came back each time, with nothing held on it.
    assert_eq!(pool.status().size, 1);
    db.assert_no_locks().await;
}

#[tokio::test]
async fn drop_inside_a_panicking_task_releases() {
    let db = TestDb::new("panic_release").await;
    let pool = db.pool(2);
    let key = db.key();
    let lock = AdvisoryLock::new(&pool, key);
    let task = tokio::spawn({
        let lock = lock.clone();
        async move {
            let _guard = lock.lock().await.unwrap();
            panic!("the protected work failed");
        }
    });
    assert!(task.await.unwrap_err().is_panic());
    let again = lock.try_lock_for(Duration::from_secs(5)).await.unwrap();
    assert!(again.is_some(), "the panicking holder's lock was released");
    drop(again);
    db.assert_no_locks().await;
}

#[test]
fn drop_after_the_runtime_is_gone() {
    let runtime = one_worker_runtime();
    let (db, guard, session_guard) = runtime.block_on(async {
        let db = TestDb::new("runtime_gone").await;
        let pool = db.pool(1);
        let guard = AdvisoryLock::new(&pool, db.key()).lock().await.unwrap();
        let session = db.session().await;
        let session_guard = AdvisoryLock::new(session, db.key()).lock().await.unwrap();
        (db, guard, session_guard)
    });
    let url = db.url();
    let app = db.app.clone();
    drop(runtime);
    // No runtime any more: dropping must neither panic nor block.
    drop(guard);
    drop(session_guard);
    drop(db);
    let check = tokio::runtime::Runtime::new().unwrap();
    check.block_on(async {
        let _ = url;
        let db = TestDb::reopen(app).await;
        db.assert_no_locks().await;
    });
}

/// Guards dropped on a thread outside any runtime while their runtime runs: the task that
/// sends a session's (or a pool's) deferred unlocks is woken from there and sends them; where
/// no such task runs yet, the unlock goes at once.
#[test]
fn guards_dropped_outside_any_runtime_are_released_by_their_runtime() {
    let runtime = one_worker_runtime();
    let db = runtime.block_on(TestDb::new("dropped_off_runtime"));
    let pool = runtime.block_on(async { db.pool(2) });
    let session = runtime.block_on(db.session());
    for _ in 0..3 {
        let key = db.key();
        let (on_session, on_pool) = runtime.block_on(async {
            let on_session = AdvisoryLock::new(&session, key).lock().await.unwrap();
            let on_pool = AdvisoryLock::new(&pool, db.key()).lock().await.unwrap();
            (on_session, on_pool)
        });
        std::thread::spawn(move || {
            assert!(tokio::runtime::Handle::try_current().is_err());
            drop(on_session);
            drop(on_pool);
        })
        .join()
        .unwrap();
        runtime.block_on(db.assert_no_locks());
        assert!(!session.holds(key));
    }
}

#[test]
fn a_session_outliving_the_runtime_that_dropped_its_guard_still_releases() {
    // The session's connection runs on a long-lived runtime; guards are dropped on short-lived
    // ones, which take the session's flusher task with them. Each drop must still be sent:
    // by the flusher as its runtime drops it, then by a new one on the next runtime.
    let main = one_worker_runtime();
    let (db, session) = main.block_on(session_on(&main, "flusher_runtimes"));
    for _ in 0..3 {
        let key = db.key();
        let short = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        short.block_on(async {
            drop(AdvisoryLock::new(&session, key).lock().await.unwrap());
        });
        drop(short);
        main.block_on(db.assert_no_locks());
        assert!(!session.holds(key));
    }
    drop(session);
    main.block_on(db.assert_no_locks());
}

#[test]
fn guards_dropped_as_their_runtime_shuts_down_are_released() {
    // Tasks still holding guards when their runtime goes: the guards drop during the shutdown,
    // when the runtime takes no new task. Nothing may hang, and each lock is released.
    let main = one_worker_runtime();
    let (db, session) = main.block_on(session_on(&main, "flusher_shutdown"));
    let pool = main.block_on(async { db.pool(2) });
    for _ in 0..3 {
        let short = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        short.block_on(async {
            let on_session = AdvisoryLock::new(&session, db.key()).lock().await.unwrap();
            let on_pool = AdvisoryLock::new(&pool, db.key()).lock().await.unwrap();
            tokio::spawn(async move {
                let _held = (on_session, on_pool);
                std::future::pending::<()>().await
            });
            tokio::task::yield_now().await;
        });
        let (done, dropped) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            drop(short);
            let _ = done.send(());
        });
        dropped
            .recv_timeout(Duration::from_secs(10))
            .expect("the runtime shuts down");
        main.block_on(db.assert_no_locks());
    }
}

/// Twenty rounds of a `lock` + drop whose unlock is combined with the next lock, then of one
/// whose unlock must be sent alone (another key follows).
async fn drop_loop(db: &TestDb, session: &Arc<Session>) {
    let lock = AdvisoryLock::new(session, db.key());
    for _ in 0..20 {
        drop(lock.lock().await.unwrap());
        drop(AdvisoryLock::new(session, db.key()).lock().await.unwrap());
    }
}

#[tokio::test]
async fn a_connected_session_sends_dropped_unlocks_from_its_connection_task() {
    let db = TestDb::new("driver_task").await;
    let tasks = tokio::runtime::Handle::current().metrics();
    let before = tasks.num_alive_tasks();
    let session = db.session().await;
    // The connection's task, and no other.
    assert_eq!(tasks.num_alive_tasks(), before + 1);
    drop_loop(&db, &session).await;
    db.assert_no_locks().await;
    // Each drop rings the connection's task again, which sends the unlock without waiting for
    // any further acquisition.
    for _ in 0..5 {
        let key = db.key();
        drop(AdvisoryLock::new(&session, key).lock().await.unwrap());
        session_cleaned_up(&session, key).await;
        db.assert_no_locks().await;
    }
    // No flusher task (a release task reading a last answer may still be finishing).
    wait_for_alive_tasks(&tasks, before + 1).await;
    drop(session);
    wait_for_alive_tasks(&tasks, before).await;
}

#[tokio::test]
async fn a_session_from_a_client_sends_dropped_unlocks_from_one_task_that_ends_with_it() {
    let db = TestDb::new("flusher_task").await;
    let tasks = tokio::runtime::Handle::current().metrics();
    let (client, connection) = tokio_postgres::connect(&db.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let session = Arc::new(Session::from_client(client));
    let with_session = tasks.num_alive_tasks();
    drop_loop(&db, &session).await;
    db.assert_no_locks().await;
    // However many guards were dropped: one task to send their unlocks, beside the
    // connection's (which pglock does not run here).
    wait_for_alive_tasks(&tasks, with_session + 1).await;
    drop(session);
    // The flusher ends with the session, and the connection with its client.
    wait_for_alive_tasks(&tasks, with_session - 1).await;
}

#[tokio::test]
async fn a_guard_dropped_after_its_sessions_connection_ended_frees_its_key() {
    // The task that drove the connection, and sent deferred unlocks, is over: the drop must
    // not wait for it. Its unlock fails on the closed connection, and the key is free again
    // on the session, whose next acquisition reports the closed connection.
    let db = TestDb::new("driver_ended").await;
    let session = db.session().await;
    let key = db.key();
    let guard = AdvisoryLock::new(&session, key).lock().await.unwrap();
    db.terminate_and_wait(AdvisoryLockGuard::backend_pid(&guard))
        .await;
    tokio::time::timeout(Duration::from_secs(10), async {
        while !session.is_closed() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the client sees its connection closed");
    drop(guard);
    session_cleaned_up(&session, key).await;
    let error = AdvisoryLock::new(&session, key).lock().await.unwrap_err();
    assert!(matches!(error, Error::ConnectionLost { .. }), "{error}");
}

#[tokio::test]
async fn explicit_unlock_reports_a_terminated_backend_and_the_pool_drops_it() {
    let db = TestDb::new("terminated").await;
    let pool = db.pool(1);
    let key = db.key();
    let lock = AdvisoryLock::new(&pool, key);
    let guard = lock.lock().await.unwrap();
    let pid = AdvisoryLockGuard::backend_pid(&guard);
    db.terminate_and_wait(pid).await;
    // The server freed the lock with the session.
    let other = db.client().await;
    let free: bool = other
        .query_one(
            "SELECT pg_try_advisory_lock($1)",
            &[&match key {
                pglock::AdvisoryKey::Single(k) => k,
                _ => unreachable!(),
            }],
        )
        .await
        .unwrap()
        .get(0);
    assert!(free);
    other
        .query_one("SELECT pg_advisory_unlock_all()", &[])
        .await
        .unwrap();
    let error = AdvisoryLockGuard::unlock(guard).await.unwrap_err();
    assert!(error.is_connection_lost(), "{error}");
    // The pool never hands out the dead connection.
    let next = lock.lock().await.unwrap();
    assert_ne!(AdvisoryLockGuard::backend_pid(&next), pid);
    let alive: i32 = next.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(alive, 1);
    drop(next);
    db.assert_no_locks().await;
}

#[tokio::test]
async fn drop_after_termination_discards_the_connection() {
    let db = TestDb::new("terminated_drop").await;
    let pool = db.pool(1);
    let lock = AdvisoryLock::new(&pool, db.key());
    for _ in 0..5 {
        let guard = lock.lock().await.unwrap();
        let pid = AdvisoryLockGuard::backend_pid(&guard);
        db.terminate_and_wait(pid).await;
        drop(guard);
        let next = lock.lock().await.unwrap();
        assert_ne!(AdvisoryLockGuard::backend_pid(&next), pid);
        next.query_one("SELECT 1", &[]).await.unwrap();
        drop(next);
    }
    db.assert_no_locks().await;
}

#[tokio::test]
async fn unlock_of_a_lock_lost_on_a_live_session_is_not_held() {
    let db = TestDb::new("not_held").await;
    let pool = db.pool(1);
    let key = db.key();
    let guard = AdvisoryLock::new(&pool, key).lock().await.unwrap();
    // Something outside pglock releases every lock of the session behind the guard's back.
    guard
        .query_one("SELECT pg_advisory_unlock_all()", &[])
        .await
        .unwrap();
    let error = AdvisoryLockGuard::unlock(guard).await.unwrap_err();
    assert!(
        matches!(error, Error::NotHeld { key: k } if k == key),
        "{error}"
    );
    db.assert_no_locks().await;
}

#[tokio::test]
async fn leak_keeps_the_lock_until_the_session_ends() {
    let db = TestDb::new("leak").await;
    let pool = db.pool(1);
    let key = db.key();
    let guard = AdvisoryLock::new(&pool, key).lock().await.unwrap();
    let pid = AdvisoryLockGuard::backend_pid(&guard);
    AdvisoryLockGuard::leak(guard);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(db.holders(key).await, vec![pid]);
    // The pool lost that connection and opens another.
    let other = AdvisoryLock::new(&pool, db.key()).lock().await.unwrap();
    assert_ne!(AdvisoryLockGuard::backend_pid(&other), pid);
    drop(other);
    db.terminate(pid).await;
    db.assert_no_locks().await;
}

/// Guards of one session dropped together (a `Vec` of them) are released together: one
/// statement per mode and key form, and an acquisition of one of the keys right after the drop
/// still holds it exactly once.
///
/// On a current-thread runtime, where nothing can send the unlocks before the dropping task
/// yields, so that the statements' shape is certain. On a multi-thread runtime another worker
/// may send the first unlocks while the last guards are still being dropped (in batches too,
/// but the last may hold one unlock).
#[tokio::test]
async fn guards_of_a_session_dropped_together_are_released_together() {
    let db = TestDb::new("release_together").await;
    let session = db.session().await;
    let pair_base: i32 = rand::random();
    let mut guards = Vec::new();
    let mut keys = Vec::new();
    for i in 0..300 {
        let key = match i % 3 {
            0 => pglock::AdvisoryKey::Pair(pair_base, i),
            _ => db.key(),
        };
        keys.push(key);
        let lock = AdvisoryLock::new(&session, key);
        let guard = if i % 5 == 0 {
            lock.lock_shared().await.unwrap()
        } else {
            lock.lock().await.unwrap()
        };
        guards.push(guard);
    }
    let backend_pid = AdvisoryLockGuard::backend_pid(&guards[0]);
    assert_eq!(db.locks().await.len(), keys.len());
    drop(guards);
    // Asked for again before the dropping task yields: its unlock rides in this statement, the
    // others go out ahead of it.
    let again = AdvisoryLock::new(&session, keys[7]).lock().await.unwrap();
    let held = db.locks().await;
    assert_eq!(held.len(), 1, "{held:?}");
    assert_eq!(held[0].0, backend_pid);
    assert_eq!(held[0].1, keys[7]);
    AdvisoryLockGuard::unlock(again).await.unwrap();
    assert!(db.holders(keys[7]).await.is_empty(), "not stacked");
    // The same without an acquisition: the task of the last drop sends them all.
    let mut guards = Vec::new();
    for key in &keys {
        guards.push(AdvisoryLock::new(&session, *key).lock().await.unwrap());
    }
    drop(guards);
    db.assert_no_locks().await;
    let last: String = db
        .admin()
        .query_one(
            "SELECT query FROM pg_stat_activity WHERE pid = $1",
            &[&backend_pid],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        last.contains("unnest") && last.contains("pg_advisory_unlock"),
        "{last}"
    );
    assert_eq!(session.held_count(), 0);
}

/// A multi-thread runtime of one worker, for a test that starts and drops runtimes itself.
fn one_worker_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// A test database and a session whose connection runs on `runtime`, whatever runtime its
/// guards are taken and dropped on.
async fn session_on(
    runtime: &tokio::runtime::Runtime,
    name: &str,
) -> (TestDb, std::sync::Arc<pglock::Session>) {
    let db = TestDb::new(name).await;
    let (client, connection) = tokio_postgres::connect(&db.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    runtime.spawn(connection);
    (
        db,
        std::sync::Arc::new(pglock::Session::from_client(client)),
    )
}
