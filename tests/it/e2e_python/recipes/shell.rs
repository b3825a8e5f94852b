//! Every `sh` recipe of the docs, line by line, as a user runs it: `sh -c LINE` in the shop's
//! directory, against one fresh database, in document order.
//!
//! - `export DATABASE_URL=URL` sets the variable for the lines after it, to the test
//!   database's URL in the same SQLAlchemy form; without one, a block gets the psycopg2 form.
//! - Every other line must be in [`EXPECTED`], which says what it must do: exit with a status
//!   (and leave a trace: migrations applied, a report made, a stand-in run), or serve (a
//!   service that runs until stopped: ready once it prints a line, then stopped by SIGTERM to
//!   the command the line started, as `docker stop` does, with an expected status). Services
//!   that follow each other start together, like replicas; a block's services are stopped at
//!   its end. A line already run with the same `DATABASE_URL` form is not run again.
//! - An entry of [`EXPECTED`] that no doc has any more fails too: the table follows the docs.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use super::super::database::FreshDatabase;
use super::super::process::{children, Process};
use super::docs::{recipes, Block};
use super::{
    alembic_version, assert_gone, assert_no_advisory_locks, prerequisites, same_form,
    wait_for_line, Shop, HEAD, RUN_BOUND, START_BOUND, STOP_BOUND,
};
use crate::harness::TestDb;

/// What a line must do.
#[derive(Clone, Copy, Debug)]
enum Step {
    /// Exits with this status, then `Then` holds.
    Exits(i32, Then),
    /// Runs until stopped, `ready` once started; SIGTERM ends it with `stopped`.
    Serves { ready: Ready, stopped: i32 },
}

#[derive(Clone, Copy, Debug)]
enum Then {
    Nothing,
    /// The shop's migrations are applied.
    Migrated,
    /// `shop.report` made one more report.
    ReportMade,
    /// A stand-in logged this.
    StandInRan(&'static str),
    /// Standard output has this.
    Printed(&'static str),
}

/// How the test knows a service is past its start-up (its signal handlers installed): a line
/// it prints, or a file it makes in its directory.
#[derive(Clone, Copy, Debug)]
enum Ready {
    Printed(&'static str),
    Made(&'static str),
}

/// Celery beat logs this at INFO once its scheduler starts; at the default log level it says
/// nothing, but opens its schedule file (`celerybeat-schedule` in its directory).
const BEAT_STARTED: Ready = Ready::Printed("beat: Starting");
const BEAT_SCHEDULE: Ready = Ready::Made("celerybeat-schedule");

/// Every line of the docs' `sh` recipes (without its trailing comment), and what it must do.
const EXPECTED: &[(&str, Step)] = &[
    (
        "pglock run migrations -- alembic upgrade head",
        Step::Exits(0, Then::Migrated),
    ),
    (
        "pglock run --timeout 10m migrations -- alembic upgrade head",
        Step::Exits(0, Then::Migrated),
    ),
    (
        "pglock run -n nightly-report -- python -m shop.report",
        Step::Exits(0, Then::ReportMade),
    ),
    (
        "pglock leader beat -- celery --app shop beat",
        Step::Serves {
            ready: BEAT_SCHEDULE,
            stopped: 0,
        },
    ),
    (
        "pglock leader beat -- celery --app shop beat --loglevel INFO",
        Step::Serves {
            ready: BEAT_STARTED,
            stopped: 0,
        },
    ),
    (
        "migrate-then uvicorn shop.main:app --host 0.0.0.0",
        // uvicorn re-raises SIGTERM once it has shut down: 128 + 15.
        Step::Serves {
            ready: Ready::Printed("Application startup complete"),
            stopped: 143,
        },
    ),
    (
        "migrate-then celery --app shop worker --loglevel INFO",
        Step::Serves {
            ready: Ready::Printed(" ready."),
            stopped: 0,
        },
    ),
    (
        "pglock run -s warehouse -- ./export-report",
        Step::Exits(
            0,
            Then::StandInRan("export-report ran: PGLOCK_NAME=warehouse PGLOCK_KEY="),
        ),
    ),
    (
        "pglock run warehouse -- ./rebuild-warehouse",
        Step::Exits(
            0,
            Then::StandInRan("rebuild-warehouse ran: PGLOCK_NAME=warehouse PGLOCK_KEY="),
        ),
    ),
    (
        "pglock run --key 42 -- ./maintenance.sh",
        Step::Exits(
            0,
            Then::StandInRan(
                "maintenance.sh ran: PGLOCK_NAME= PGLOCK_KEY=42 PGLOCK_MODE=exclusive",
            ),
        ),
    ),
    // First run in the README's block, while its beat leads.
    (
        "pglock status",
        Step::Exits(0, Then::Printed("leader:beat")),
    ),
    (
        "pglock status --name migrations",
        Step::Exits(0, Then::Nothing),
    ),
    (
        "pglock status --known migrations",
        Step::Exits(0, Then::Nothing),
    ),
    (
        "pglock status --name leader:beat",
        Step::Exits(0, Then::Nothing),
    ),
    (
        "pglock status --json | jq '.locks[] | select(.state == \"waiting\")'",
        Step::Exits(0, Then::Nothing),
    ),
];

/// The line without a trailing comment (`  # ...`).
fn code(line: &str) -> &str {
    line.split(" #").next().unwrap_or("").trim()
}

fn expected(line: &str, block: &Block) -> Step {
    EXPECTED
        .iter()
        .find(|(known, _)| *known == line)
        .map(|(_, step)| *step)
        .unwrap_or_else(|| {
            panic!(
                "{}: the recipe line `{line}` is not in shell.rs's EXPECTED: add what it must do",
                block.place
            )
        })
}

/// A service a block started.
struct Serving {
    line: String,
    process: Process,
    ready: Ready,
    stopped: i32,
}

#[tokio::test]
async fn shell_recipes_run_as_written() {
    let Some((venv, Some(redis))) = prerequisites(true).await else {
        return;
    };
    let blocks = recipes("sh");
    // Every entry of EXPECTED is some doc's line.
    let lines: HashSet<String> = blocks
        .iter()
        .flat_map(|b| b.lines().map(code).map(str::to_owned).collect::<Vec<_>>())
        .collect();
    let stale: Vec<&str> = EXPECTED
        .iter()
        .map(|(line, _)| *line)
        .filter(|line| !lines.contains(*line))
        .collect();
    assert!(stale.is_empty(), "EXPECTED has lines no doc has: {stale:?}");

    let shop = Shop::new(venv, "shell").with_broker(&redis);
    let database = FreshDatabase::create("recipes_shell").await;
    let db = TestDb::on_server(&database.url("postgresql"), "recipes_shell").await;
    let started = Instant::now();
    let mut done: HashSet<(String, String)> = HashSet::new();
    let mut ran = 0;
    for block in &blocks {
        let mut url = database.url("postgresql+psycopg2");
        let mut serving: Vec<Serving> = Vec::new();
        let mut starting: Vec<Serving> = Vec::new();
        for line in block.lines().map(code).filter(|l| !l.is_empty()) {
            assert!(!line.ends_with('\\'), "{}: continued lines", block.place);
            if let Some(value) = line.strip_prefix("export DATABASE_URL=") {
                url = same_form(&database, value);
                continue;
            }
            let step = expected(line, block);
            if !done.insert((line.to_owned(), url.clone())) {
                continue;
            }
            ran += 1;
            match step {
                Step::Serves { ready, stopped } => starting.push(Serving {
                    line: line.to_owned(),
                    process: Process::spawn(line, shop.sh(line, &url)),
                    ready,
                    stopped,
                }),
                Step::Exits(code, then) => {
                    ready_all(&shop, &mut starting, &mut serving).await;
                    exits(&shop, &db, block, line, &url, code, then).await;
                }
            }
        }
        ready_all(&shop, &mut starting, &mut serving).await;
        // Stop the block's services, the last started first, as `docker stop` does: SIGTERM
        // to the command the line started.
        for service in serving.into_iter().rev() {
            stop(service).await;
        }
        assert_no_advisory_locks(&db).await;
    }
    eprintln!(
        "{ran} recipe lines of {} blocks ran in {:?}",
        blocks.len(),
        started.elapsed()
    );
    assert!(ran >= 10, "{ran} lines ran");
    db.assert_no_locks().await;
    drop(db);
    database.drop_now().await;
}

/// Waits until every service in `starting` is ready, and moves them to `serving`.
async fn ready_all(shop: &Shop, starting: &mut Vec<Serving>, serving: &mut Vec<Serving>) {
    for service in starting.drain(..) {
        match service.ready {
            Ready::Printed(text) => {
                wait_for_line(&service.process, text, START_BOUND).await;
            }
            Ready::Made(prefix) => wait_for_file(shop, &service.process, prefix).await,
        }
        if service.line.starts_with("pglock leader") {
            wait_for_line(
                &service.process,
                "pglock: leading beat in term",
                START_BOUND,
            )
            .await;
        }
        serving.push(service);
    }
}

/// Waits until `process` made a file whose name starts with `prefix` in the shop's directory.
async fn wait_for_file(shop: &Shop, process: &Process, prefix: &str) {
    let deadline = Instant::now() + START_BOUND;
    loop {
        let made = std::fs::read_dir(shop.dir()).unwrap().any(|entry| {
            entry
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with(prefix)
        });
        if made {
            return;
        }
        assert!(
            Instant::now() < deadline && super::super::process::alive(process.pid()),
            "{} did not make {prefix}: {process:?}",
            process.label
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn stop(mut service: Serving) {
    // The command the line started: sh's only child (or sh itself, had it exec'd it).
    let sh = service.process.pid();
    let command = match std::fs::read_to_string(format!("/proc/{sh}/comm")) {
        Ok(comm) if comm.trim() == "sh" => {
            let command = children(sh);
            assert_eq!(
                command.len(),
                1,
                "`{}` runs one command under sh: {:?}",
                service.line,
                service.process
            );
            command[0]
        }
        _ => sh,
    };
    let tree = service.process.tree();
    send(command, "TERM");
    let status = service.process.exit(STOP_BOUND).await;
    assert_eq!(
        status.code(),
        Some(service.stopped),
        "`{}` stopped by SIGTERM: {:?}",
        service.line,
        service.process
    );
    assert_gone(&tree, STOP_BOUND).await;
}

fn send(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .args(["-s", signal, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -s {signal} {pid}");
}

async fn exits(
    shop: &Shop,
    db: &TestDb,
    block: &Block,
    line: &str,
    url: &str,
    code: i32,
    then: Then,
) {
    let reports_before = reports(db).await;
    let stand_ins_before = shop.stand_ins_ran().len();
    let mut process = Process::spawn(line, shop.sh(line, url));
    let status = process.exit(RUN_BOUND).await;
    assert_eq!(
        status.code(),
        Some(code),
        "{}: `{line}`: {process:?}",
        block.place
    );
    match then {
        Then::Nothing => {}
        Then::Migrated => assert_eq!(
            alembic_version(db).await.as_deref(),
            Some(HEAD),
            "{}: `{line}`: {process:?}",
            block.place
        ),
        Then::ReportMade => assert_eq!(
            reports(db).await,
            reports_before.map(|n| n + 1).or(Some(1)),
            "{}: `{line}`: {process:?}",
            block.place
        ),
        Then::StandInRan(text) => {
            let log = shop.stand_ins_ran();
            assert!(
                log[stand_ins_before..].contains(text),
                "{}: `{line}`: the stand-ins logged {log:?}, not {text:?}: {process:?}",
                block.place
            );
        }
        Then::Printed(text) => assert!(
            process.lines().iter().any(|(_, l)| l.contains(text)),
            "{}: `{line}` did not print {text:?}: {process:?}",
            block.place
        ),
    }
}

/// How many reports `shop.report` made, if its table exists.
async fn reports(db: &TestDb) -> Option<i64> {
    let exists: bool = db
        .admin()
        .query_one("SELECT to_regclass('reports') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    if !exists {
        return None;
    }
    Some(
        db.admin()
            .query_one("SELECT count(*) FROM reports", &[])
            .await
            .unwrap()
            .get(0),
    )
}
