//! `pglock run migrations -- alembic upgrade head` in six instances started at once: the race
//! of the README, with real Alembic, SQLAlchemy and PostgreSQL's own catalogs.
//!
//! The Alembic project (`tests/fixtures/alembic/`) has three migrations with ENUM types, a slow
//! backfill, and its version table in a schema of its own (`version_table_schema`). Each
//! migration writes a row to `migration_meta.applied`, so that the test can count how often it
//! ran.

use std::process::ExitStatus;
use std::time::Duration;

use crate::harness::TestDb;

use super::database::FreshDatabase;
use super::process::Process;
use super::{fixture, Scratch, Venv};

/// The `DATABASE_URL` forms of SQLAlchemy's PostgreSQL drivers; instance `i` uses form
/// `i % 4`, as six services configured by different teams would.
const DRIVER_FORMS: [&str; 4] = [
    "postgresql+psycopg2",
    "postgresql+psycopg",
    "postgresql+asyncpg",
    "postgresql+pg8000",
];

const INSTANCES: usize = 6;

/// How long the last migration's backfill keeps its transaction open: a second, so that the
/// instances started without a lock, which begin together (env.py's `START_BARRIER`), collide
/// with its uncommitted catalog rows in every run, however loaded the machine.
const BACKFILL_SECONDS: &str = "1";

/// A bound to keep a broken run from hanging, not a timing target: six upgrades one after
/// another take about ten seconds on an idle machine here.
const RUN_BOUND: Duration = Duration::from_secs(90);

/// How each instance ended.
struct Ended {
    status: ExitStatus,
    process: Process,
}

impl std::fmt::Debug for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {:?}", self.status, self.process)
    }
}

/// `alembic upgrade head` in `INSTANCES` processes started at once against one database.
struct Six {
    processes: Vec<Process>,
    /// The directory of env.py's `START_BARRIER`, for as long as they run.
    _meeting_point: Scratch,
}

impl Six {
    /// Starts them, each under `pglock run LOCK` if a lock is given. Without a lock, they wait
    /// for each other once connected: six Python start-ups on a loaded 2-core machine can
    /// spread over more than the first one's whole migration.
    fn start(venv: &Venv, database: &FreshDatabase, lock: Option<&str>) -> Six {
        let meeting_point = Scratch::new("alembic-barrier");
        let barrier = format!("{}:{INSTANCES}", meeting_point.dir().display());
        let processes = (0..INSTANCES)
            .map(|instance| {
                let barrier = lock.is_none().then_some(barrier.as_str());
                upgrade(venv, database, instance, lock, barrier)
            })
            .collect();
        Six {
            processes,
            _meeting_point: meeting_point,
        }
    }

    async fn finish(self) -> Vec<Ended> {
        let mut ended = Vec::new();
        for mut process in self.processes {
            let status = process.exit(RUN_BOUND).await;
            ended.push(Ended { status, process });
        }
        ended
    }
}

/// `alembic upgrade head` as a service's entry point runs it, in the Alembic project's
/// directory, with the service's `DATABASE_URL`; with `barrier` (`DIR:N`) as env.py's
/// `START_BARRIER`.
fn upgrade(
    venv: &Venv,
    database: &FreshDatabase,
    instance: usize,
    lock: Option<&str>,
    barrier: Option<&str>,
) -> Process {
    let form = DRIVER_FORMS[instance % DRIVER_FORMS.len()];
    let mut command = match lock {
        None => venv.command("alembic"),
        Some(lock) => venv.pglock(database, form, &["run", lock, "--", "alembic"]),
    };
    command
        .args(["upgrade", "head"])
        .current_dir(fixture("alembic"))
        .env("DATABASE_URL", database.url(form))
        .env("BACKFILL_SECONDS", BACKFILL_SECONDS);
    if let Some(barrier) = barrier {
        command.env("START_BARRIER", barrier);
    }
    let label = match lock {
        None => format!("alembic #{instance} ({form})"),
        Some(lock) => format!("pglock run {lock} -- alembic #{instance} ({form})"),
    };
    Process::spawn(label, command)
}

/// How an upgrade that lost the race failed, if it did: a catalog row inserted by another
/// transaction still open (the README's `pg_type_typname_nsp_index`), or an object another one
/// committed between this one's check and its `CREATE`. The last line that says so (Python's
/// traceback ends with the exception).
fn race_symptom(process: &Process) -> Option<String> {
    let lines = process.lines();
    [
        "duplicate key value violates unique constraint",
        "already exists",
    ]
    .iter()
    .find_map(|symptom| {
        lines.iter().rev().find_map(|(_, line)| {
            // PostgreSQL's DETAIL of a duplicate key also says "already exists".
            (line.contains(symptom) && !line.starts_with("DETAIL")).then(|| line.trim().to_owned())
        })
    })
}

/// The schema as `pg_dump --schema-only` prints it, without what differs between two dumps of
/// equal schemas: comments, blank lines, and the random key of `\restrict`.
async fn schema(database: &FreshDatabase) -> Vec<String> {
    let dump = tokio::process::Command::new("pg_dump")
        .args(["--schema-only", "--no-owner", "--no-privileges"])
        .arg(database.url("postgresql"))
        .output()
        .await
        .expect("run pg_dump");
    assert!(
        dump.status.success(),
        "pg_dump {}: {}",
        database.name(),
        String::from_utf8_lossy(&dump.stderr)
    );
    String::from_utf8(dump.stdout)
        .unwrap()
        .lines()
        .filter(|line| {
            !(line.is_empty()
                || line.starts_with("--")
                || line.starts_with("\\restrict")
                || line.starts_with("\\unrestrict"))
        })
        .map(str::to_owned)
        .collect()
}

/// `(revision, times applied)` from the migrations' own log.
async fn applied(db: &TestDb) -> Vec<(String, i64)> {
    db.admin()
        .query(
            "SELECT revision, count(*) FROM migration_meta.applied GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

async fn version(db: &TestDb) -> Vec<String> {
    db.admin()
        .query(
            "SELECT version_num FROM migration_meta.alembic_version",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

#[tokio::test]
async fn six_upgrades_at_once_migrate_once() {
    let Some(venv) = Venv::find() else { return };
    let migrations_once = [("0001", 1), ("0002", 1), ("0003", 1)].map(|(r, n)| (r.to_owned(), n));

    // Three runs at once, each in a fresh database of its own: six instances without a lock,
    // six under pglock, and one alone for the reference schema. They are independent, and the
    // locked run, one instance at a time, leaves a core free for the others.
    let race = FreshDatabase::create("alembic_race").await;
    let locked = FreshDatabase::create("alembic_locked").await;
    let reference = FreshDatabase::create("alembic_reference").await;
    let db = TestDb::on_server(&locked.url("postgresql"), "e2e_alembic").await;
    let started = std::time::Instant::now();
    let unlocked = Six::start(&venv, &race, None);
    let mut alone = upgrade(&venv, &reference, 0, None, None);
    let under_lock = Six::start(&venv, &locked, Some("migrations"))
        .finish()
        .await;
    eprintln!(
        "under pglock: {INSTANCES} upgrades ended in {:?}",
        started.elapsed()
    );
    let unlocked = unlocked.finish().await;

    // Without a lock, the race of the README happens: instances that start while the first
    // one's migration transaction is open fail on the catalogs' unique indexes (or, having
    // looked before it committed, find what they create already there).
    let failed: Vec<&Ended> = unlocked.iter().filter(|e| !e.status.success()).collect();
    assert!(
        !failed.is_empty(),
        "six unlocked upgrades at once all succeeded: the race did not happen\n{unlocked:#?}"
    );
    let symptoms: Vec<String> = failed
        .iter()
        .map(|ended| {
            race_symptom(&ended.process).unwrap_or_else(|| {
                panic!("an unlocked upgrade failed for another reason than the race: {ended:?}")
            })
        })
        .collect();
    eprintln!(
        "without pglock: {} of {INSTANCES} upgrades failed: {symptoms:#?}",
        failed.len()
    );
    race.drop_now().await;

    // Under pglock: all six succeed, and the migrations ran once, in one of them.
    for ended in &under_lock {
        assert!(ended.status.success(), "{ended:?}");
    }
    // Alembic logs `Running upgrade  -> 0001, ...`, `Running upgrade 0001 -> 0002, ...`.
    for revision in ["-> 0001,", "-> 0002,", "-> 0003,"] {
        let runs: Vec<&str> = under_lock
            .iter()
            .filter(|e| {
                e.process
                    .lines_with("Running upgrade")
                    .iter()
                    .any(|(_, line)| line.contains(revision))
            })
            .map(|e| e.process.label.as_str())
            .collect();
        assert_eq!(runs.len(), 1, "upgrade {revision} ran in {runs:?}");
    }
    assert_eq!(applied(&db).await, migrations_once);
    assert_eq!(version(&db).await, ["0003"]);

    // The same schema as one instance alone makes.
    let status = alone.exit(RUN_BOUND).await;
    assert!(status.success(), "{status}: {alone:?}");
    let (migrated, expected) = (schema(&locked).await, schema(&reference).await);
    assert!(
        expected
            .iter()
            .any(|line| line.contains("CREATE TYPE public.order_status AS ENUM")),
        "the reference schema has the migrations' types: {expected:#?}"
    );
    if migrated != expected {
        let only_migrated: Vec<&String> =
            migrated.iter().filter(|l| !expected.contains(l)).collect();
        let only_expected: Vec<&String> =
            expected.iter().filter(|l| !migrated.contains(l)).collect();
        panic!(
            "the schema of the six differs from one upgrade's: lines only in the six: \
             {only_migrated:#?}, only in the one: {only_expected:#?}; the six's: \
             {migrated:#?}, the one's: {expected:#?}"
        );
    }

    // Nothing of pglock's is left in the database.
    let advisory: i64 = db
        .admin()
        .query_one(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(advisory, 0, "advisory locks left in {}", locked.name());
    db.assert_no_locks().await;
    drop(db);
    locked.drop_now().await;
    reference.drop_now().await;
}
