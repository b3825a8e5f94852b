//! The containers' entry point, `bin/migrate-then` (docs/python.md's copy must equal it, see
//! `docs.rs`), stopped as `docker stop` stops it: SIGTERM to the process the compose file's
//! `app` command starts (the container's first process, or the only child of its init), with
//! that service's environment.
//!
//! - While pglock waits for the lock (held by the test): pglock stops waiting (no waiter is
//!   left), everything exits 143, the service never starts.
//! - While alembic migrates (its `CREATE TABLE alembic_version` blocked behind another session's
//!   open transaction): alembic dies, pglock frees the lock at once (while that transaction is
//!   still open), everything exits 143, the service never starts, and the migration's
//!   transaction is rolled back.
//!
//! The third stage, after `exec`, is the service's own: `compose.rs` stops it.

use std::time::{Duration, Instant};

use pglock::{AdvisoryKey, AdvisoryLock, AdvisoryLockGuard};

use super::super::database::FreshDatabase;
use super::super::process::Process;
use super::compose::{compose, Service};
use super::{
    advisory_locks, alembic_version, assert_gone, blocked_on_a_table, exit_code, prerequisites,
    wait_for_line, Shop, START_BOUND, STOP_BOUND,
};
use crate::harness::{connect, TestDb};

/// What uvicorn prints when it starts: it must not, after a stop during the migrations.
const SERVICE_STARTED: &str = "Started server process";

#[tokio::test]
async fn migrate_then_passes_sigterm_on_to_pglock() {
    let Some((venv, _)) = prerequisites(false).await else {
        return;
    };
    let shop = Shop::new(venv, "migrate-then");
    let app = Service::of(&compose(&shop), "app");
    assert_eq!(app.command[0], "migrate-then", "{:?}", app.command);
    let database = FreshDatabase::create("recipes_migrate_then").await;
    let db = TestDb::on_server(&database.url("postgresql"), "recipes_migrate_then").await;
    let key = AdvisoryKey::from_name("migrations");

    // Stopped while pglock waits for the lock.
    let holder = db.session().await;
    let guard = AdvisoryLock::new(holder.clone(), key).lock().await.unwrap();
    let mut waiting = app.replica(&shop, &database, None, 0).process;
    // pglock says so once it found the lock busy, whether it then queues or polls.
    wait_for_line(&waiting, "pglock: lock migrations is busy", START_BOUND).await;
    let tree = waiting.tree();
    assert!(tree.len() >= 2, "migrate-then and pglock: {waiting:?}");
    waiting.signal("TERM");
    let status = exit_code(waiting.exit(STOP_BOUND).await);
    assert_eq!(status, 143, "{waiting:?}");
    assert_gone(&tree, STOP_BOUND).await;
    assert_eq!(advisory_locks(&db).await, 1, "only the test's lock is left");
    assert!(
        waiting.lines_with(SERVICE_STARTED).is_empty(),
        "{waiting:?}"
    );
    AdvisoryLockGuard::unlock(guard).await.unwrap();

    // Stopped while alembic migrates.
    let other = connect(&db.url()).await;
    other
        .batch_execute(
            "BEGIN; CREATE TABLE alembic_version (version_num varchar(32) NOT NULL PRIMARY KEY)",
        )
        .await
        .unwrap();
    let mut migrating = app.replica(&shop, &database, None, 1).process;
    wait_until(&migrating, "alembic to wait in its migration", || async {
        blocked_on_a_table(&db).await
    })
    .await;
    let tree = migrating.tree();
    assert!(
        tree.len() >= 3,
        "migrate-then, pglock, alembic: {migrating:?}"
    );
    assert_eq!(advisory_locks(&db).await, 1, "pglock holds the lock");
    migrating.signal("TERM");
    let status = exit_code(migrating.exit(STOP_BOUND).await);
    assert_eq!(status, 143, "{migrating:?}");
    assert_gone(&tree, STOP_BOUND).await;
    // Freed at once, not when the blocked migration's session ends.
    assert_eq!(advisory_locks(&db).await, 0, "{migrating:?}");
    assert!(
        migrating.lines_with(SERVICE_STARTED).is_empty(),
        "{migrating:?}"
    );
    other.batch_execute("ROLLBACK").await.unwrap();
    // The dead alembic's session ends once its statement can go on; its transaction is rolled
    // back.
    wait_until(&migrating, "the dead alembic's session to end", || async {
        other_sessions(&db).await == 0
    })
    .await;
    assert_eq!(alembic_version(&db).await, None);

    db.assert_no_locks().await;
    drop((holder, other, db));
    database.drop_now().await;
}

/// Waits, up to the start bound, until `condition` holds; `process` is shown if it does not.
async fn wait_until<F, Fut>(process: &Process, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + START_BOUND;
    while !condition().await {
        assert!(
            Instant::now() < deadline,
            "waited {START_BOUND:?} for {what}: {process:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How many client sessions of `db`'s database are not the test's own.
async fn other_sessions(db: &TestDb) -> i64 {
    db.admin()
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND backend_type = 'client backend' AND pid <> pg_backend_pid() \
             AND application_name <> $1",
            &[&db.app],
        )
        .await
        .unwrap()
        .get(0)
}
