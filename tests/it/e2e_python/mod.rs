//! End to end with the real clients: `pglock` in front of Alembic and Celery beat, as the
//! Python services it was made for run it, each test against fresh databases of its own.
//!
//! The clients come from a Python venv that `.ci/setup-python` makes from the pinned
//! `.ci/python-requirements.txt`, in `<repo>/target/ci-python` unless `PGLOCK_PYTHON_VENV` says
//! otherwise. Without it, the tests skip with a message saying how to make it, except under CI
//! (`CI` set), where they fail.
//!
//! The Python side lives in `tests/fixtures/`: an Alembic project (`alembic/`) and a Celery app
//! (`celery/`); and the docs' recipes (`recipes`) run against the example service of
//! `examples/python-service/`.

mod alembic;
mod celery_beat;
mod database;
mod process;
mod recipes;

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::Command;

use database::FreshDatabase;

/// The venv of `.ci/setup-python`.
#[derive(Clone)]
pub struct Venv {
    dir: PathBuf,
}

impl Venv {
    /// The venv, or `None` after saying on stderr why the test skips. Under CI a missing or
    /// unfinished venv fails the test instead: `.ci/run` makes it before the tests.
    pub fn find() -> Option<Venv> {
        let dir = std::env::var_os("PGLOCK_PYTHON_VENV")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/ci-python"));
        // setup-python writes the stamp last: without it the install did not finish.
        let complete = dir.join(".pglock-requirements.stamp").is_file()
            && ["python", "alembic", "celery"]
                .iter()
                .all(|tool| dir.join("bin").join(tool).is_file());
        if complete {
            return Some(Venv { dir });
        }
        let why = format!(
            "the Python venv {} is missing or unfinished (make it with .ci/setup-python)",
            dir.display()
        );
        if std::env::var_os("CI").is_some() {
            panic!("{why}: .ci/run should have made it");
        }
        eprintln!("SKIPPED: {why}");
        None
    }

    /// A command run with the venv first on `PATH`, as a service's container runs its tools:
    /// `alembic` and `celery` are found by name, by the test and by `pglock` alike.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let path = std::env::join_paths(
            std::iter::once(self.dir.join("bin")).chain(std::env::split_paths(&path)),
        )
        .expect("PATH");
        let mut command = Command::new(program);
        command
            .env("PATH", path)
            .env("VIRTUAL_ENV", &self.dir)
            // No __pycache__ in tests/fixtures; every line out at once.
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        command
    }

    /// The venv's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `pglock ARGS` in a service whose `DATABASE_URL` is `database` in SQLAlchemy's `form`
    /// (`postgresql+psycopg2`...): pglock reads the variable the service's own code reads. The
    /// venv is on `PATH` for the command pglock runs.
    pub fn pglock(&self, database: &FreshDatabase, form: &str, args: &[&str]) -> Command {
        let mut command = self.command(env!("CARGO_BIN_EXE_pglock"));
        command.args(args).env("DATABASE_URL", database.url(form));
        command
    }
}

/// A scratch directory (schedules, pid files), removed on drop.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new(purpose: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!(
            "pglock-e2e-{purpose}-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).expect("create a scratch directory");
        Scratch(dir)
    }

    pub fn dir(&self) -> &Path {
        &self.0
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A file or directory of `tests/fixtures/`.
pub fn fixture(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(path)
}
