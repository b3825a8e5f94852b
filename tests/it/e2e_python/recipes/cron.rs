//! Every crontab recipe of the docs, run as cron runs its jobs: `/bin/sh -c COMMAND` in the
//! user's home directory, with cron's own environment only (`HOME`, `LOGNAME`, `SHELL=/bin/sh`,
//! `PATH=/usr/bin:/bin`) and the crontab's variable lines on top (cron does not expand
//! variables in them).
//!
//! What is replaced, because this machine is not the docs' server: the project directory
//! `/srv/shop` (the shop's copy, whose `.venv` is the test venv), `/usr/local/bin` in `PATH`
//! (pglock's directory), and `DATABASE_URL`'s value (the test database, in the same form).
//! Each job then runs twice: with its lock free it must do its work and print nothing (cron
//! mails what a job prints); with its lock held elsewhere it must exit 0, print nothing, and do
//! nothing.

use std::collections::HashSet;

use pglock::{AdvisoryKey, AdvisoryLock, AdvisoryLockGuard};

use super::super::database::FreshDatabase;
use super::super::process::Process;
use super::docs::recipes;
use super::{
    alembic_version, assert_no_advisory_locks, prerequisites, same_form, Shop, HEAD, RUN_BOUND,
};
use crate::harness::TestDb;

/// What cron gives every job, before the crontab's own variables.
const CRON_PATH: &str = "/usr/bin:/bin";

/// The docs' server paths and what they are here.
const PROJECT: &str = "/srv/shop";
const BIN: &str = "/usr/local/bin";

/// One job line: the schedule's five fields, then the command.
struct Job {
    schedule: Vec<String>,
    command: String,
}

fn parse_job(line: &str) -> Job {
    let mut fields = line.splitn(6, ' ').filter(|f| !f.is_empty());
    let schedule: Vec<String> = fields.by_ref().take(5).map(str::to_owned).collect();
    let command = fields.collect::<Vec<_>>().join(" ");
    Job { schedule, command }
}

/// Whether `field` is a crontab time field: `*`, numbers, ranges, lists, steps.
fn time_field(field: &str) -> bool {
    !field.is_empty()
        && field
            .chars()
            .all(|c| c.is_ascii_digit() || matches!(c, '*' | ',' | '-' | '/'))
}

/// The lock name of `pglock run [OPTIONS] NAME -- ...` in `command`.
fn lock_name(command: &str) -> String {
    let words: Vec<&str> = command.split_whitespace().collect();
    let start = words
        .windows(2)
        .position(|w| w == ["pglock", "run"])
        .expect("the job runs pglock run")
        + 2;
    words[start..]
        .iter()
        .take_while(|w| **w != "--")
        .filter(|w| !w.starts_with('-'))
        .last()
        .expect("a lock name")
        .to_string()
}

#[tokio::test]
async fn crontab_recipes_run_as_cron_runs_them() {
    let Some((venv, _)) = prerequisites(false).await else {
        return;
    };
    let shop = Shop::new(venv, "cron");
    let database = FreshDatabase::create("recipes_cron").await;
    let db = TestDb::on_server(&database.url("postgresql"), "recipes_cron").await;
    // The jobs run on a migrated database.
    shop.migrate(&database.url("postgresql+psycopg2")).await;
    assert_eq!(alembic_version(&db).await.as_deref(), Some(HEAD));

    let home = shop.path("tmp");
    let pglock_dir = super::pglock_dir();
    let mut seen = HashSet::new();
    let mut jobs_run = 0;
    for block in recipes("cron") {
        let mut environment: Vec<(String, String)> = vec![
            ("HOME".into(), home.display().to_string()),
            ("LOGNAME".into(), "root".into()),
            ("SHELL".into(), "/bin/sh".into()),
            ("PATH".into(), CRON_PATH.into()),
        ];
        let mut jobs = Vec::new();
        for line in block.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let first = line.split_whitespace().next().unwrap();
            if let Some((name, value)) = first.split_once('=').filter(|_| !time_field(first)) {
                let value = match name {
                    "DATABASE_URL" => same_form(&database, value),
                    "PATH" => {
                        assert!(value.contains(BIN), "{}: {line}", block.place);
                        value.replace(BIN, &pglock_dir.display().to_string())
                    }
                    _ => value.to_owned(),
                };
                environment.retain(|(n, _)| n != name);
                environment.push((name.to_owned(), value));
                continue;
            }
            let job = parse_job(line);
            assert!(
                job.schedule.len() == 5 && job.schedule.iter().all(|f| time_field(f)),
                "{}: not a crontab job line: {line}",
                block.place
            );
            // cron turns `%` into a newline.
            assert!(!job.command.contains('%'), "{}: % in {line}", block.place);
            assert!(job.command.contains(PROJECT), "{}: {line}", block.place);
            jobs.push(job);
        }
        assert!(!jobs.is_empty(), "{}: no job", block.place);
        for variable in ["DATABASE_URL", "PATH"] {
            assert!(
                environment.iter().any(|(n, _)| n == variable)
                    && block.text.contains(&format!("{variable}=")),
                "{}: the crontab must set {variable}",
                block.place
            );
        }
        for job in jobs {
            // The same job in two docs runs once.
            if !seen.insert(job.command.clone()) {
                continue;
            }
            let command = job
                .command
                .replace(PROJECT, &shop.dir().display().to_string());
            let run = || {
                let mut cron = tokio::process::Command::new("/bin/sh");
                cron.arg("-c")
                    .arg(&command)
                    .env_clear()
                    .envs(environment.iter().map(|(n, v)| (n, v)))
                    .current_dir(&home)
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .kill_on_drop(true);
                Process::spawn(format!("{}: {}", block.place, job.command), cron)
            };
            let done = || async { work_done(&shop, &db).await };

            // Free: it does its work, silently.
            let before = done().await;
            let mut free = run();
            let status = free.exit(RUN_BOUND).await;
            assert_eq!(status.code(), Some(0), "{free:?}");
            assert!(free.lines().is_empty(), "cron would mail this: {free:?}");
            assert_ne!(done().await, before, "the job did nothing: {free:?}");

            // Busy (another machine runs it): exit 0, silently, nothing done.
            let name = lock_name(&job.command);
            let holder = db.session().await;
            let guard = AdvisoryLock::new(holder.clone(), AdvisoryKey::from_name(&name))
                .lock()
                .await
                .unwrap();
            let before = done().await;
            let mut busy = run();
            let status = busy.exit(RUN_BOUND).await;
            assert_eq!(status.code(), Some(0), "{busy:?}");
            assert!(busy.lines().is_empty(), "cron would mail this: {busy:?}");
            assert_eq!(done().await, before, "the job ran while busy: {busy:?}");
            AdvisoryLockGuard::unlock(guard).await.unwrap();
            jobs_run += 1;
        }
    }
    assert!(jobs_run >= 2, "{jobs_run} crontab jobs");
    assert_no_advisory_locks(&db).await;
    db.assert_no_locks().await;
    drop(db);
    database.drop_now().await;
}

/// What the jobs have done so far: the reports made, and what the stand-ins logged.
async fn work_done(shop: &Shop, db: &TestDb) -> (i64, String) {
    let reports: i64 = db
        .admin()
        .query_one("SELECT count(*) FROM reports", &[])
        .await
        .unwrap()
        .get(0);
    (reports, shop.stand_ins_ran())
}
