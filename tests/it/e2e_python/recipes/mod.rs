//! The docs' recipes for a Python service, run as written (docs/python.md, "How these recipes
//! are checked", says what each test here checks).
//!
//! The recipes run in a copy of the example service of `examples/python-service/` ("the
//! shop": a FastAPI app, a Celery worker and beat, Alembic migrations), in the venv of
//! `.ci/setup-python`, with `pglock` and the shop's `bin/` on `PATH`, against fresh databases.
//! Celery's broker is a Redis of the test's own (`redis-server` on a Unix socket). Without the
//! venv or `redis-server`, the tests that need them skip, except under CI, where they fail.
//!
//! - `docs`: finds the blocks of the docs, and checks that every block a user would copy is
//!   marked as a recipe (or as a copy of a file, equal to it);
//! - `shell`: every `sh` recipe, line by line; `cron`: every crontab recipe, as cron runs it;
//!   `python`: every Python recipe, as a script;
//! - `env_py`: the whole `env.py` of docs/migrations.md, and autogenerate;
//! - `migrate_then`: the containers' entry point, stopped by SIGTERM at each stage;
//! - `compose`: `docker-compose.yml` and the Dockerfile, as far as this machine can.

mod compose;
mod cron;
mod docs;
mod env_py;
mod migrate_then;
mod python;
mod shell;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::process::Command;

use super::database::FreshDatabase;
use super::process::Process;
use super::{Scratch, Venv};
use crate::harness::TestDb;

/// The programs of a user's own that the CLI's recipes wrap (`pglock run -s warehouse --
/// ./export-report`): stand-ins that log that they ran, and how, to `stand-ins.log`, and print
/// nothing (cron mails what a job prints).
const STAND_INS: [&str; 4] = [
    "export-report",
    "rebuild-warehouse",
    "maintenance.sh",
    "sync-billing",
];

/// A copy of the example service to run recipes in, removed on drop.
pub struct Shop {
    venv: Venv,
    scratch: Scratch,
    broker: Option<String>,
}

impl Shop {
    /// A fresh copy of `examples/python-service`, with `.venv` a link to the test venv (as a
    /// checkout's own virtualenv), a `tmp/` directory (the `TMPDIR` of what runs in it) and the
    /// stand-ins.
    pub fn new(venv: Venv, purpose: &str) -> Shop {
        let scratch = Scratch::new(&format!("shop-{purpose}"));
        copy_tree(&example(), scratch.dir());
        std::os::unix::fs::symlink(venv.dir(), scratch.path(".venv")).expect("link .venv");
        std::fs::create_dir_all(scratch.path("tmp")).unwrap();
        for name in STAND_INS {
            let path = scratch.path(name);
            std::fs::write(
                &path,
                "#!/bin/sh\n\
                 echo \"$(basename \"$0\") ran: PGLOCK_NAME=${PGLOCK_NAME-} \
                 PGLOCK_KEY=${PGLOCK_KEY-} PGLOCK_MODE=${PGLOCK_MODE-}\" \
                 >>\"$(dirname \"$0\")/stand-ins.log\"\n",
            )
            .unwrap();
            make_executable(&path);
        }
        Shop {
            venv,
            scratch,
            broker: None,
        }
    }

    /// Celery's broker for what runs in the shop from now on (`CELERY_BROKER_URL`).
    pub fn with_broker(mut self, redis: &Redis) -> Shop {
        self.broker = Some(redis.url());
        self
    }

    pub fn dir(&self) -> &Path {
        self.scratch.dir()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.scratch.path(name)
    }

    /// `PATH` as in the shop's image: its `bin/`, the venv's (the image's Python), pglock's.
    pub fn path_variable(&self) -> std::ffi::OsString {
        let system = std::env::var_os("PATH").unwrap_or_default();
        std::env::join_paths(
            [self.path("bin"), self.venv.dir().join("bin"), pglock_dir()]
                .into_iter()
                .chain(std::env::split_paths(&system)),
        )
        .expect("PATH")
    }

    /// `program` run in the shop's directory with its environment: `DATABASE_URL`, the broker,
    /// `PATH`, `TMPDIR`, and a free port in `UVICORN_PORT`.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>, database_url: &str) -> Command {
        let mut command = self.venv.command(program);
        command
            .current_dir(self.dir())
            .env("PATH", self.path_variable())
            .env("DATABASE_URL", database_url)
            .env("TMPDIR", self.path("tmp"))
            .env("UVICORN_PORT", free_port().to_string())
            // What a line starts is in a process group of its own, as in a terminal or a
            // container, so that signals to the test's group never reach it.
            .process_group(0);
        match &self.broker {
            Some(broker) => command.env("CELERY_BROKER_URL", broker),
            None => command.env_remove("CELERY_BROKER_URL"),
        };
        command
    }

    /// `sh -c LINE`, as a terminal or a container's shell runs a line.
    pub fn sh(&self, line: &str, database_url: &str) -> Command {
        let mut command = self.command("sh", database_url);
        command.arg("-c").arg(line);
        command
    }

    /// `alembic upgrade head`, which must succeed.
    pub async fn migrate(&self, database_url: &str) {
        let mut command = self.command("alembic", database_url);
        command.args(["upgrade", "head"]);
        let mut migrate = Process::spawn("alembic upgrade head", command);
        let status = migrate.exit(RUN_BOUND).await;
        assert!(status.success(), "{migrate:?}");
    }

    /// What the stand-ins logged so far.
    pub fn stand_ins_ran(&self) -> String {
        std::fs::read_to_string(self.path("stand-ins.log")).unwrap_or_default()
    }
}

/// `examples/python-service`.
pub fn example() -> PathBuf {
    docs::root().join("examples/python-service")
}

/// The directory of the `pglock` binary under test.
pub fn pglock_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_pglock"))
        .parent()
        .unwrap()
        .to_owned()
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if name == "__pycache__" {
            continue;
        }
        let target = to.join(&name);
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

fn make_executable(path: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A TCP port nobody listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

/// A Redis server of the test's own, on a Unix socket in a scratch directory; stopped on drop.
pub struct Redis {
    socket: PathBuf,
    _process: Process,
    _dir: Scratch,
}

impl Redis {
    /// Starts one, or says why the test skips (fails under CI) and returns `None`.
    pub async fn start() -> Option<Redis> {
        let found = std::process::Command::new("redis-server")
            .arg("--version")
            .output()
            .is_ok_and(|output| output.status.success());
        if !found {
            let why = "redis-server is not installed (make it with .ci/setup-redis)";
            if std::env::var_os("CI").is_some() {
                panic!("{why}: .ci/run should have installed it");
            }
            eprintln!("SKIPPED: {why}");
            return None;
        }
        let dir = Scratch::new("redis");
        let socket = dir.path("redis.sock");
        let mut command = Command::new("redis-server");
        command
            .args(["--port", "0", "--save", "", "--appendonly", "no"])
            .arg("--unixsocket")
            .arg(&socket)
            .arg("--dir")
            .arg(dir.dir())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let process = Process::spawn("redis-server", command);
        wait_for_line(&process, "to accept connections", START_BOUND).await;
        Some(Redis {
            socket,
            _process: process,
            _dir: dir,
        })
    }

    /// The broker URL for Celery (kombu's Redis transport over a Unix socket).
    pub fn url(&self) -> String {
        format!("redis+socket://{}", self.socket.display())
    }
}

/// A bound that keeps a broken start from hanging, not a timing target: Python services start
/// in about a second on an idle machine here.
pub const START_BOUND: Duration = Duration::from_secs(60);

/// A bound that keeps a broken command from hanging, not a timing target: `alembic upgrade
/// head` takes about a second on an idle machine here.
pub const RUN_BOUND: Duration = Duration::from_secs(120);

/// A bound on a process's exit once asked to stop (Docker's default grace period is 10 s, the
/// worker's 30 s).
pub const STOP_BOUND: Duration = Duration::from_secs(30);

/// Waits until `process` printed a line containing `text`; panics with its output after
/// `within`, or if it exits first.
pub async fn wait_for_line(process: &Process, text: &str, within: Duration) -> Instant {
    let deadline = Instant::now() + within;
    loop {
        if let Some((at, _)) = process.lines_with(text).first() {
            return *at;
        }
        assert!(
            Instant::now() < deadline,
            "{} did not print {text:?} within {within:?}: {process:?}",
            process.label
        );
        assert!(
            super::process::alive(process.pid()),
            "{} ended before it printed {text:?}: {process:?}",
            process.label
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The database's URL in the SQLAlchemy form that `doc_url` (a URL in a recipe) has:
/// `postgresql+psycopg2://shop:secret@db:5432/shop` gives the test database's
/// `postgresql+psycopg2://...`.
pub fn same_form(database: &FreshDatabase, doc_url: &str) -> String {
    let (scheme, _) = doc_url
        .split_once("://")
        .unwrap_or_else(|| panic!("not a URL: {doc_url}"));
    database.url(scheme)
}

/// How many advisory locks are held or awaited in `db`'s database.
pub async fn advisory_locks(db: &TestDb) -> i64 {
    db.admin()
        .query_one(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// Waits (up to 10 s: a release takes a round trip) until no advisory lock is held or awaited
/// in `db`'s database.
pub async fn assert_no_advisory_locks(db: &TestDb) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = advisory_locks(db).await;
        if left == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "{left} advisory locks left");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A process's status as a shell reports it: its exit code, or 128 + the signal that ended it.
pub fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt as _;
    status
        .code()
        .or(status.signal().map(|signal| 128 + signal))
        .expect("exited or killed")
}

/// Whether a session of `db`'s database waits on a lock that is not advisory: a migration's
/// statement blocked behind another session's open transaction.
pub async fn blocked_on_a_table(db: &TestDb) -> bool {
    db.admin()
        .query_one(
            "SELECT count(*) > 0 FROM pg_stat_activity a \
             WHERE a.datname = current_database() AND a.wait_event_type = 'Lock' \
             AND NOT EXISTS (SELECT 1 FROM pg_locks l WHERE l.pid = a.pid \
                             AND NOT l.granted AND l.locktype = 'advisory')",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// The Alembic revision the database is at, if any.
pub async fn alembic_version(db: &TestDb) -> Option<String> {
    let exists: bool = db
        .admin()
        .query_one("SELECT to_regclass('alembic_version') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    if !exists {
        return None;
    }
    db.admin()
        .query_opt("SELECT version_num FROM alembic_version", &[])
        .await
        .unwrap()
        .map(|row| row.get(0))
}

/// The shop's head revision.
pub const HEAD: &str = "0001";

/// Asserts that the processes of `tree` are all gone, waiting up to `within` for them.
pub async fn assert_gone(tree: &[u32], within: Duration) {
    let deadline = Instant::now() + within;
    while tree.iter().any(|pid| super::process::alive(*pid)) {
        let left: Vec<&u32> = tree
            .iter()
            .filter(|pid| super::process::alive(**pid))
            .collect();
        assert!(Instant::now() < deadline, "processes left: {left:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The venv and, if `redis` says so, a Redis; `None` (the test skips) without them.
pub async fn prerequisites(redis: bool) -> Option<(Venv, Option<Redis>)> {
    let venv = Venv::find()?;
    if !redis {
        return Some((venv, None));
    }
    let redis = Redis::start().await?;
    Some((venv, Some(redis)))
}
