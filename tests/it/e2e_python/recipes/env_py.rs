//! The whole `env.py` of docs/migrations.md (the shop's `migrations/env.py`; the docs' copy
//! must equal it, see `docs.rs`), run by real `alembic` commands:
//!
//! - replicas take turns: four `alembic upgrade head` (one per SQLAlchemy driver) wait for a
//!   lock the test holds, before touching anything, then migrate once;
//! - the lock's wait is bounded (`MIGRATIONS_LOCK_TIMEOUT`), the migrations' statements are not;
//! - under `pglock run migrations` it does not wait for itself; `--sql` works offline;
//! - autogenerate leaves `pglock_leader_terms` alone, and would not without `include_name`.

use std::time::{Duration, Instant};

use pglock::{AdvisoryKey, AdvisoryLock, AdvisoryLockGuard};

use super::super::database::FreshDatabase;
use super::super::process::{alive, Process};
use super::{
    alembic_version, assert_no_advisory_locks, blocked_on_a_table, prerequisites, Shop, HEAD,
    RUN_BOUND,
};
use crate::harness::{connect, TestDb};

/// SQLAlchemy's PostgreSQL drivers, one per replica.
const DRIVERS: [&str; 4] = [
    "postgresql+psycopg2",
    "postgresql+psycopg",
    "postgresql+asyncpg",
    "postgresql+pg8000",
];

/// Alembic logs this for the first migration it applies.
const APPLIES_0001: &str = "Running upgrade  -> 0001";

fn migrations_key() -> AdvisoryKey {
    AdvisoryKey::from_name("migrations")
}

/// How many sessions of `db`'s database wait for `key`.
async fn waiting_for(db: &TestDb, key: AdvisoryKey) -> i64 {
    let (classid, objid, objsubid) = key.pg_locks_ids();
    db.admin()
        .query_one(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
             AND classid = $1::int8::oid AND objid = $2::int8::oid AND objsubid = $3",
            &[&i64::from(classid), &i64::from(objid), &objsubid],
        )
        .await
        .unwrap()
        .get(0)
}

/// Waits until `n` sessions of `db`'s database wait for `key`, while `processes` run.
async fn wait_for_waiters(db: &TestDb, key: AdvisoryKey, n: i64, processes: &[Process]) {
    let deadline = Instant::now() + super::START_BOUND;
    while waiting_for(db, key).await < n {
        assert!(
            Instant::now() < deadline && processes.iter().all(|p| alive(p.pid())),
            "fewer than {n} waiters on {key}: {processes:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `alembic ARGS` in the shop with `DATABASE_URL` in `form`, and more environment.
fn alembic(
    shop: &Shop,
    database: &FreshDatabase,
    form: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> Process {
    let mut command = shop.command("alembic", &database.url(form));
    command.args(args).envs(env.iter().copied());
    Process::spawn(format!("alembic {} ({form})", args.join(" ")), command)
}

#[tokio::test]
async fn env_py_makes_replicas_take_turns() {
    let Some((venv, _)) = prerequisites(false).await else {
        return;
    };
    let shop = Shop::new(venv, "env-py");
    let database = FreshDatabase::create("recipes_env_py").await;
    let db = TestDb::on_server(&database.url("postgresql"), "recipes_env_py").await;

    // Another replica migrates: the test holds the lock. Four replicas start, one per driver;
    // all four wait for the lock before they touch anything.
    let holder = db.session().await;
    let guard = AdvisoryLock::new(holder.clone(), migrations_key())
        .lock()
        .await
        .unwrap();
    let mut replicas: Vec<Process> = DRIVERS
        .iter()
        .map(|form| alembic(&shop, &database, form, &["upgrade", "head"], &[]))
        .collect();
    wait_for_waiters(&db, migrations_key(), DRIVERS.len() as i64, &replicas).await;
    assert_eq!(alembic_version(&db).await, None, "touched before the lock");

    // The lock is free: they migrate one at a time, once.
    AdvisoryLockGuard::unlock(guard).await.unwrap();
    for replica in &mut replicas {
        let status = replica.exit(RUN_BOUND).await;
        assert!(status.success(), "{replica:?}");
    }
    let applied: Vec<&str> = replicas
        .iter()
        .filter(|r| !r.lines_with(APPLIES_0001).is_empty())
        .map(|r| r.label.as_str())
        .collect();
    assert_eq!(
        applied.len(),
        1,
        "0001 applied by {applied:?}: {replicas:#?}"
    );
    assert_eq!(alembic_version(&db).await.as_deref(), Some(HEAD));

    // Under `pglock run migrations`, env.py leaves the lock to pglock: had it waited for
    // itself, the wait would end with a lock timeout.
    let mut command = shop.command("pglock", &database.url("postgresql+psycopg2"));
    command
        .args(["run", "migrations", "--", "alembic", "upgrade", "head"])
        .env("MIGRATIONS_LOCK_TIMEOUT", "10s");
    let mut under_pglock = Process::spawn("pglock run migrations -- alembic", command);
    let status = under_pglock.exit(RUN_BOUND).await;
    assert!(status.success(), "{under_pglock:?}");

    // Offline, it prints the SQL and connects to nothing.
    let mut offline = alembic(
        &shop,
        &database,
        "postgresql+asyncpg",
        &["upgrade", "head", "--sql"],
        &[],
    );
    let status = offline.exit(RUN_BOUND).await;
    assert!(status.success(), "{offline:?}");
    assert!(
        !offline.lines_with("CREATE TABLE orders").is_empty(),
        "{offline:?}"
    );

    assert_no_advisory_locks(&db).await;
    db.assert_no_locks().await;
    drop(holder);
    drop(db);
    database.drop_now().await;
}

#[tokio::test]
async fn env_py_bounds_the_wait_for_the_lock_and_not_the_migrations() {
    let Some((venv, _)) = prerequisites(false).await else {
        return;
    };
    const TIMEOUT: Duration = Duration::from_secs(1);
    let timeout = [("MIGRATIONS_LOCK_TIMEOUT", "1s")];
    let shop = Shop::new(venv, "env-py-timeout");
    let database = FreshDatabase::create("recipes_env_py_timeout").await;
    let db = TestDb::on_server(&database.url("postgresql"), "recipes_env_py_timeout").await;

    // A replica that waits for the lock longer than the timeout gives up.
    let holder = db.session().await;
    let guard = AdvisoryLock::new(holder.clone(), migrations_key())
        .lock()
        .await
        .unwrap();
    let mut gives_up = alembic(
        &shop,
        &database,
        "postgresql+psycopg2",
        &["upgrade", "head"],
        &timeout,
    );
    let status = gives_up.exit(RUN_BOUND).await;
    assert!(!status.success(), "{gives_up:?}");
    assert!(
        !gives_up.lines_with("lock timeout").is_empty(),
        "{gives_up:?}"
    );
    assert_eq!(alembic_version(&db).await, None);
    AdvisoryLockGuard::unlock(guard).await.unwrap();

    // A migration statement that waits longer than that does not: another session has created
    // alembic_version in a transaction still open, so Alembic's own CREATE TABLE waits on it.
    let other = connect(&db.url()).await;
    other
        .batch_execute(
            "BEGIN; CREATE TABLE alembic_version (version_num varchar(32) NOT NULL PRIMARY KEY)",
        )
        .await
        .unwrap();
    let mut migrates = alembic(
        &shop,
        &database,
        "postgresql+psycopg2",
        &["upgrade", "head"],
        &timeout,
    );
    let deadline = Instant::now() + super::START_BOUND;
    while !blocked_on_a_table(&db).await {
        assert!(
            Instant::now() < deadline && alive(migrates.pid()),
            "alembic never waited: {migrates:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Seen waiting; twice the timeout later, it still waits.
    tokio::time::sleep(TIMEOUT * 2).await;
    assert!(
        alive(migrates.pid()) && blocked_on_a_table(&db).await,
        "the migration's own wait was cut short: {migrates:?}"
    );
    other.batch_execute("ROLLBACK").await.unwrap();
    let status = migrates.exit(RUN_BOUND).await;
    assert!(status.success(), "{migrates:?}");
    assert_eq!(alembic_version(&db).await.as_deref(), Some(HEAD));

    assert_no_advisory_locks(&db).await;
    db.assert_no_locks().await;
    drop((holder, other, db));
    database.drop_now().await;
}

#[tokio::test]
async fn autogenerate_leaves_the_term_table_alone() {
    let Some((venv, _)) = prerequisites(false).await else {
        return;
    };
    let shop = Shop::new(venv, "autogenerate");
    let database = FreshDatabase::create("recipes_autogenerate").await;
    let db = TestDb::on_server(&database.url("postgresql"), "recipes_autogenerate").await;
    let url = database.url("postgresql+psycopg2");
    shop.migrate(&url).await;

    // `pglock leader` has run in the database: its term table is there.
    let mut command = shop.command("pglock", &url);
    command.args(["leader", "--restart", "never", "beat", "--", "true"]);
    let mut leader = Process::spawn("pglock leader beat -- true", command);
    let status = leader.exit(RUN_BOUND).await;
    assert!(status.success(), "{leader:?}");
    let terms: i64 = db
        .admin()
        .query_one("SELECT count(*) FROM pglock_leader_terms", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(terms, 1);

    // With env.py as the docs give it: nothing to do.
    let generated = autogenerate(&shop, &database, "with_filter").await;
    assert!(
        !generated.contains("drop_table") && !generated.contains("op."),
        "autogenerate proposed changes:\n{generated}"
    );

    // Without include_name: the drop the filter prevents (so this test can see it).
    let env_py = shop.path("migrations/env.py");
    let original = std::fs::read_to_string(&env_py).unwrap();
    let filter = "        include_name=include_name,\n";
    assert_eq!(original.matches(filter).count(), 2, "{original}");
    std::fs::write(&env_py, original.replace(filter, "")).unwrap();
    let generated = autogenerate(&shop, &database, "without_filter").await;
    assert!(
        generated.contains("op.drop_table('pglock_leader_terms')"),
        "without include_name:\n{generated}"
    );

    assert_no_advisory_locks(&db).await;
    db.assert_no_locks().await;
    drop(db);
    database.drop_now().await;
}

/// `alembic revision --autogenerate -m MESSAGE`: the migration it wrote, which is then
/// removed.
async fn autogenerate(shop: &Shop, database: &FreshDatabase, message: &str) -> String {
    let mut revision = alembic(
        shop,
        database,
        "postgresql+psycopg2",
        &["revision", "--autogenerate", "-m", message],
        &[],
    );
    let status = revision.exit(RUN_BOUND).await;
    assert!(status.success(), "{revision:?}");
    let versions = shop.path("migrations/versions");
    let written: Vec<_> = std::fs::read_dir(&versions)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.to_string_lossy().ends_with(&format!("_{message}.py")))
        .collect();
    assert_eq!(written.len(), 1, "{written:?}: {revision:?}");
    let text = std::fs::read_to_string(&written[0]).unwrap();
    std::fs::remove_file(&written[0]).unwrap();
    // The migration's body: what `upgrade()` does.
    text.split("def upgrade()")
        .nth(1)
        .and_then(|rest| rest.split("def downgrade()").next())
        .unwrap_or_else(|| panic!("no upgrade() in:\n{text}"))
        .to_owned()
}
