//! pglock behind a real PgBouncer (see `bouncer.rs`), in session and in transaction pooling
//! mode. The decision these tests pin down is documented in docs/pgbouncer.md.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use pglock::{AdvisoryKey, AdvisoryLock, AdvisoryLockGuard, ConnectionSource, Error, LockScope};
use tokio_postgres::types::Type;
use tokio_postgres::{Client, NoTls};

use crate::bouncer::{PgBouncer, PoolMode};
use crate::harness::{connect, TestDb};

/// A deadpool pool of at most `size` client connections to PgBouncer.
fn pool_through(bouncer: &PgBouncer, db: &TestDb, size: usize) -> Pool {
    let config: tokio_postgres::Config = bouncer.url(&db.app).parse().unwrap();
    let manager = Manager::from_config(
        config,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(size)
        .wait_timeout(Some(Duration::from_secs(20)))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .unwrap()
}

/// `(granted, backend_pid)` of `pg_try_advisory_lock(key)` run the way a hand-written session
/// lock would, without a prepared statement (which a transaction pooler would lose).
async fn naive_try_lock(client: &Client, key: AdvisoryKey) -> (bool, i32) {
    let AdvisoryKey::Single(k) = key else {
        unreachable!("the tests use single keys")
    };
    let rows = client
        .query_typed(
            "SELECT pg_try_advisory_lock($1), pg_backend_pid()",
            &[(&k, Type::INT8)],
        )
        .await
        .unwrap();
    (rows[0].get(0), rows[0].get(1))
}

async fn backend_pid(client: &Client) -> i32 {
    client
        .query_typed("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()[0]
        .get(0)
}

/// Ends a test in which `other` holds a transaction open on the bouncer: rolls it back, closes
/// everything, and checks that no advisory lock is left.
async fn end_with_other_client(db: &TestDb, bouncer: PgBouncer, pool: Pool, other: Client) {
    other.batch_execute("ROLLBACK").await.unwrap();
    drop(other);
    drop(pool);
    bouncer.stop();
    db.assert_no_locks().await;
}

/// The failure this whole file is about: behind a transaction pooler, a session lock stays on
/// the server connection, which the pooler then hands to another client, which is granted the
/// same lock (advisory locks are re-entrant within a backend), and the lock outlives its client.
#[tokio::test]
async fn naive_session_lock_is_shared_between_clients_in_transaction_mode() {
    let db = TestDb::new("pgb_naive").await;
    // One server connection makes the pooler's choice deterministic; with more, the same
    // happens whenever two clients' transactions land on the same server connection.
    let Some(bouncer) = PgBouncer::start(PoolMode::Transaction, 1).await else {
        return;
    };
    let key = db.key();
    let alice = connect(&bouncer.url(&db.app)).await;
    let bob = connect(&bouncer.url(&db.app)).await;

    let (alice_got_it, alice_backend) = naive_try_lock(&alice, key).await;
    let (bob_got_it, bob_backend) = naive_try_lock(&bob, key).await;
    assert!(alice_got_it);
    assert!(
        bob_got_it,
        "expected the naive lock to be granted to the second client as well"
    );
    assert_eq!(
        alice_backend, bob_backend,
        "both ran on one server connection"
    );
    assert_eq!(db.holders(key).await, vec![alice_backend]);

    // Both clients go away; the lock does not: it lives on PgBouncer's server connection.
    drop(alice);
    drop(bob);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        db.holders(key).await,
        vec![alice_backend],
        "the lock outlived both clients"
    );

    bouncer.stop();
    db.assert_no_locks().await;
}

/// In session pooling mode a client keeps its server connection: session locks behave as on a
/// direct connection.
#[tokio::test]
async fn session_locks_work_in_session_mode() {
    let db = TestDb::new("pgb_session_mode").await;
    let Some(bouncer) = PgBouncer::start(PoolMode::Session, 3).await else {
        return;
    };
    let pool = pool_through(&bouncer, &db, 3);
    let key = db.key();
    let lock = AdvisoryLock::new(&pool, key);

    let guard = lock.lock().await.unwrap();
    let pid = AdvisoryLockGuard::backend_pid(&guard);
    assert_eq!(db.holders(key).await, vec![pid]);
    assert!(lock.try_lock().await.unwrap().is_none());
    assert_eq!(backend_pid(&guard).await, pid);
    AdvisoryLockGuard::unlock(guard).await.unwrap();
    assert!(db.holders(key).await.is_empty());

    let guard = lock.try_lock().await.unwrap().expect("free again");
    drop(guard);
    drop(pool);
    bouncer.stop();
    db.assert_no_locks().await;
}

/// PgBouncer gives its clients cancel keys of its own, so pglock never verifies a connection
/// through it as direct (src/backend.rs): every statement keeps checking the backend and the
/// standby state, even in session mode, where the server connection happens not to change.
#[tokio::test]
async fn session_mode_keeps_the_checking_statements() {
    let db = TestDb::new("pgb_checks").await;
    let Some(bouncer) = PgBouncer::start(PoolMode::Session, 1).await else {
        return;
    };
    let session = Arc::new(
        pglock::Session::connect(&bouncer.url(&db.app))
            .await
            .unwrap(),
    );
    let lock = AdvisoryLock::new(&session, db.key());
    for _ in 0..3 {
        let guard = lock.lock().await.unwrap();
        let pid = AdvisoryLockGuard::backend_pid(&guard);
        assert!(db.statement_of(pid).await.contains("pg_backend_pid()"));
        AdvisoryLockGuard::unlock(guard).await.unwrap();
        drop(lock.lock().await.unwrap());
        // The next lock carries the dropped guard's unlock: the checking combined statement.
        let guard = lock.lock().await.unwrap();
        let sql = db.statement_of(pid).await;
        assert!(
            sql.contains("pg_backend_pid()") && sql.contains("pg_advisory_unlock"),
            "{sql}"
        );
        AdvisoryLockGuard::unlock(guard).await.unwrap();
    }
    drop((lock, session));
    bouncer.stop();
    db.assert_no_locks().await;
}

/// Transaction-scoped locks hold behind a transaction pooler: the transaction pins one server
/// connection from `BEGIN` to `COMMIT`, and the lock ends with it. Declared with
/// `behind_transaction_pooler`, pglock sends its statements unprepared, which PgBouncer 1.18
/// (no prepared statements in transaction mode) needs.
#[tokio::test]
async fn transaction_locks_exclude_each_other_in_transaction_mode() {
    let db = TestDb::new("pgb_xact_mutex").await;
    let Some(bouncer) = PgBouncer::start(PoolMode::Transaction, 3).await else {
        return;
    };
    let pool = pool_through(&bouncer, &db, 6);
    let source = ConnectionSource::from(pool.clone()).behind_transaction_pooler();
    let key = db.key();
    let inside = Arc::new(AtomicBool::new(false));
    let entries = Arc::new(AtomicUsize::new(0));

    let mut workers = Vec::new();
    for _ in 0..6 {
        let lock = AdvisoryLock::new(source.clone(), key).scope(LockScope::Transaction);
        let (inside, entries) = (inside.clone(), entries.clone());
        workers.push(tokio::spawn(async move {
            for _ in 0..10 {
                let guard = lock.lock().await.expect("transaction lock");
                assert!(
                    !inside.swap(true, Ordering::SeqCst),
                    "two holders at once behind the pooler"
                );
                entries.fetch_add(1, Ordering::SeqCst);
                // The transaction keeps its server connection: the guard's queries run on the
                // backend that holds the lock.
                assert_eq!(
                    backend_pid(&guard).await,
                    AdvisoryLockGuard::backend_pid(&guard)
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
                inside.store(false, Ordering::SeqCst);
                AdvisoryLockGuard::commit(guard).await.expect("commit");
            }
        }));
    }
    for worker in workers {
        worker.await.unwrap();
    }
    assert_eq!(entries.load(Ordering::SeqCst), 60);

    // Contention is seen as such: a held transaction lock is busy for every other client.
    let lock = AdvisoryLock::new(source.clone(), key).scope(LockScope::Transaction);
    let guard = lock.lock().await.unwrap();
    assert!(lock.try_lock().await.unwrap().is_none());
    assert!(lock
        .try_lock_for(Duration::from_millis(50))
        .await
        .unwrap()
        .is_none());
    AdvisoryLockGuard::rollback(guard).await.unwrap();
    assert!(db.holders(key).await.is_empty());

    drop(pool);
    bouncer.stop();
    db.assert_no_locks().await;
}

/// Declared behind a transaction pooler, a session-scope lock is refused before anything is
/// sent.
#[tokio::test]
async fn session_lock_is_refused_behind_a_declared_transaction_pooler() {
    let db = TestDb::new("pgb_refuse").await;
    let Some(bouncer) = PgBouncer::start(PoolMode::Transaction, 2).await else {
        return;
    };
    let pool = pool_through(&bouncer, &db, 2);
    let key = db.key();
    let source = ConnectionSource::from(&pool).behind_transaction_pooler();
    let lock = AdvisoryLock::new(source, key);
    for result in [lock.lock().await.map(Some), lock.try_lock().await] {
        match result {
            Err(error @ Error::SessionLockBehindPooler { .. }) => {
                assert!(
                    error.to_string().contains("LockScope::Transaction"),
                    "{error}"
                );
            }
            other => panic!("expected SessionLockBehindPooler, got {other:?}"),
        }
    }
    assert!(db.holders(key).await.is_empty());

    // The same for a Session declared to be behind the pooler (and dedicated to one task, as
    // transaction scope on a session requires).
    let session = Arc::new(
        pglock::Session::connect(&bouncer.url(&db.app))
            .await
            .unwrap()
            .behind_transaction_pooler()
            .dedicated(),
    );
    let on_session = AdvisoryLock::new(session.clone(), key);
    assert!(matches!(
        on_session.try_lock().await,
        Err(Error::SessionLockBehindPooler { .. })
    ));
    let guard = on_session
        .scope(LockScope::Transaction)
        .lock()
        .await
        .expect("a transaction lock on the session");
    AdvisoryLockGuard::commit(guard).await.unwrap();

    drop(pool);
    drop(session);
    bouncer.stop();
    db.assert_no_locks().await;
}

/// Undeclared, a session lock behind a transaction pooler is granted (pglock cannot tell yet),
/// another client that lands on the same server connection is granted it too (pglock cannot
/// see that either: this is the documented risk), and pglock's own next statement for the
/// lock reaches another backend, which pglock reports as `Error::BackendChanged` without
/// releasing anything there.
#[tokio::test]
async fn undeclared_session_lock_reports_backend_change() {
    let db = TestDb::new("pgb_backend_change").await;
    let Some(bouncer) = PgBouncer::start(PoolMode::Transaction, 2).await else {
        return;
    };
    let pool = pool_through(&bouncer, &db, 1);
    let key = db.key();
    let guard = AdvisoryLock::new(&pool, key).lock().await.unwrap();
    let granted_on = AdvisoryLockGuard::backend_pid(&guard);
    assert_eq!(db.holders(key).await, vec![granted_on]);

    // Another client's transaction gets the idle server connection, the one holding the lock,
    // and is granted the lock as well.
    let other = connect(&bouncer.url(&db.app)).await;
    other.batch_execute("BEGIN").await.unwrap();
    let (other_got_it, other_backend) = naive_try_lock(&other, key).await;
    assert_eq!(other_backend, granted_on);
    assert!(
        other_got_it,
        "the documented risk: pglock cannot prevent this"
    );

    // pglock's release now reaches another server connection.
    match AdvisoryLockGuard::unlock(guard).await {
        Err(error @ Error::BackendChanged { .. }) => {
            let message = error.to_string();
            assert!(message.contains("behind_transaction_pooler"), "{message}");
        }
        other => panic!("expected BackendChanged, got {other:?}"),
    }
    // Nothing was released on the wrong backend, and the lock is still where it was granted.
    assert_eq!(db.holders(key).await, vec![granted_on]);

    end_with_other_client(&db, bouncer, pool, other).await;
}

/// The same, for a dropped guard whose unlock rides in the next acquisition's statement (see
/// `combined.rs`): that statement reaches another server connection, where it is not even
/// prepared. The unlock it carries never runs there, the pooled connection is closed, and the
/// acquisition starts again on a fresh one, which finds the key still held where it was
/// granted.
#[tokio::test]
async fn undeclared_combined_unlock_releases_nothing_on_another_backend() {
    let db = TestDb::new("pgb_combined_change").await;
    let Some(bouncer) = PgBouncer::start(PoolMode::Transaction, 2).await else {
        return;
    };
    let pool = pool_through(&bouncer, &db, 1);
    let key = db.key();
    let lock = AdvisoryLock::new(&pool, key);
    // `try_lock` twice, so that the second sends the combined form of the first's statement.
    let guard = lock.try_lock().await.unwrap().expect("free");
    let granted_on = AdvisoryLockGuard::backend_pid(&guard);

    // Another client's transaction takes the server connection that holds the lock.
    let other = connect(&bouncer.url(&db.app)).await;
    other.batch_execute("BEGIN").await.unwrap();
    assert_eq!(backend_pid(&other).await, granted_on);

    drop(guard);
    let retried = tokio::time::timeout(Duration::from_secs(20), lock.try_lock())
        .await
        .expect("the acquisition ends");
    assert!(
        matches!(retried, Ok(None)),
        "expected busy on a fresh connection, got {retried:?}"
    );
    // Nothing was released on the wrong backend.
    assert_eq!(db.holders(key).await, vec![granted_on]);

    end_with_other_client(&db, bouncer, pool, other).await;
}

/// Undeclared, a transaction lock whose statement was prepared on one server connection and
/// then runs on another fails with a typed error rather than a bare "prepared statement does
/// not exist".
#[tokio::test]
async fn undeclared_transaction_lock_reports_backend_change() {
    let db = TestDb::new("pgb_xact_undeclared").await;
    let Some(bouncer) = PgBouncer::start(PoolMode::Transaction, 2).await else {
        return;
    };
    let pool = pool_through(&bouncer, &db, 1);
    let key = db.key();
    let lock = AdvisoryLock::new(&pool, key).scope(LockScope::Transaction);
    // The first acquisition prepares its statement on the only server connection, P.
    let guard = lock.lock().await.unwrap();
    let first_backend = AdvisoryLockGuard::backend_pid(&guard);
    AdvisoryLockGuard::commit(guard).await.unwrap();

    // Another client's transaction pins P; the next acquisition gets a new server connection.
    let other = connect(&bouncer.url(&db.app)).await;
    other.batch_execute("BEGIN").await.unwrap();
    assert_eq!(backend_pid(&other).await, first_backend);
    match lock.lock().await {
        Err(error @ Error::BackendChanged { .. }) => {
            assert!(error.code().is_some(), "carries the server's SQLSTATE");
        }
        other => panic!("expected BackendChanged, got {other:?}"),
    }

    end_with_other_client(&db, bouncer, pool, other).await;
}

/// Why pglock cannot detect the pool mode up front: PgBouncer answers `SHOW` only on its admin
/// console; on a client connection the command goes to PostgreSQL, which knows no such
/// setting.
#[tokio::test]
async fn pool_mode_is_not_visible_on_a_client_connection() {
    let db = TestDb::new("pgb_show").await;
    let Some(bouncer) = PgBouncer::start(PoolMode::Transaction, 1).await else {
        return;
    };
    let client = connect(&bouncer.url(&db.app)).await;
    let error = client.simple_query("SHOW pool_mode").await.unwrap_err();
    assert_eq!(
        error.code(),
        Some(&tokio_postgres::error::SqlState::UNDEFINED_OBJECT),
        "{error:?}"
    );
    drop(client);
    bouncer.stop();
    db.assert_no_locks().await;
}

/// Undeclared, a watched session lock behind a transaction pooler is reported lost as soon as
/// a loss probe reaches another backend, before pglock's own release would notice.
#[tokio::test]
async fn loss_probe_reports_backend_change() {
    let db = TestDb::new("pgb_loss_probe").await;
    let Some(bouncer) = PgBouncer::start(PoolMode::Transaction, 2).await else {
        return;
    };
    let pool = pool_through(&bouncer, &db, 1);
    let key = db.key();
    let guard = AdvisoryLock::new(&pool, key)
        .health_check(pglock::HealthCheck::new(
            Duration::from_millis(50),
            Duration::from_millis(500),
        ))
        .lock()
        .await
        .unwrap();
    let granted_on = AdvisoryLockGuard::backend_pid(&guard);
    let mut loss = AdvisoryLockGuard::loss_signal(&guard);

    // Another client's transaction pins the server connection that holds the lock, so the
    // next probe is routed to another one. A probe in flight may hold that server connection
    // when the transaction begins, which then gets the other one: begin again until it pins
    // the lock's.
    let other = connect(&bouncer.url(&db.app)).await;
    let mut pinned = false;
    for _ in 0..200 {
        other.batch_execute("BEGIN").await.unwrap();
        if backend_pid(&other).await == granted_on {
            pinned = true;
            break;
        }
        other.batch_execute("COMMIT").await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(pinned, "a transaction pins the lock's server connection");

    let reason = tokio::time::timeout(Duration::from_secs(10), loss.lost())
        .await
        .expect("the probe notices the backend change");
    match reason {
        pglock::LossReason::BackendChanged { expected, actual } => {
            assert_eq!(expected, granted_on);
            assert_ne!(actual, granted_on);
        }
        other => panic!("expected BackendChanged, got {other:?}"),
    }

    drop(guard);
    end_with_other_client(&db, bouncer, pool, other).await;
}
