//! End to end: the `pglock` binary as users run it, against the real database.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use pglock::{AdvisoryKey, AdvisoryLock};
use rand::Rng;
use tokio::process::{Child, Command};

use crate::harness::{database_url, TestDb};

/// The exit codes docs/cli.md promises.
const USAGE: i32 = 64;
const CANNOT_CONNECT: i32 = 69;
const CONFLICT: i32 = 75;
const LOCK_LOST: i32 = 76;
const NOT_FOUND: i32 = 127;
/// 128 + SIGTERM: a command that died of SIGTERM, or pglock interrupted by it while waiting.
pub(crate) const SIGTERM_EXIT: i32 = 143;

/// A `pglock` process with `DATABASE_URL` set; killed if the test ends early.
fn pglock(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_pglock"));
    command
        .args(args)
        .env("DATABASE_URL", database_url())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

struct Finished {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Finished {
    fn code(&self) -> i32 {
        self.status
            .code()
            .unwrap_or_else(|| panic!("pglock died of a signal: {self:?}"))
    }
}

impl std::fmt::Debug for Finished {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}\n--- stdout\n{}--- stderr\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Runs `pglock args` to the end (at most 20 s).
async fn run(args: &[&str]) -> Finished {
    finish(pglock(args).spawn().expect("start pglock")).await
}

async fn finish(child: Child) -> Finished {
    let output = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .expect("pglock finishes within 20 s")
        .expect("wait for pglock");
    Finished {
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

pub(crate) fn unique(prefix: &str) -> String {
    format!("{prefix}-{:08x}", rand::thread_rng().gen::<u32>())
}

/// A scratch directory for marker files, removed on drop.
pub(crate) struct Scratch(PathBuf);

impl Scratch {
    pub(crate) fn new() -> Self {
        let dir = std::env::temp_dir().join(unique("pglock-cli"));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn wait_for_file(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until nobody holds or awaits `key` (pglock processes are not in the test's
/// application name, so the harness's leak check does not see them).
pub(crate) async fn assert_key_free(db: &TestDb, key: AdvisoryKey) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (holders, waiters) = (db.holders(key).await, db.waiters(key).await);
        if holders.is_empty() && waiters.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{key} still held by {holders:?}, awaited by {waiters:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub(crate) async fn wait_for_holder(db: &TestDb, key: AdvisoryKey) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let [pid] = db.holders(key).await[..] {
            return pid;
        }
        assert!(Instant::now() < deadline, "nobody took {key}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub(crate) fn kill(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} {pid}");
}

#[tokio::test]
async fn six_processes_run_one_at_a_time() {
    let db = TestDb::new("cli_one_at_a_time").await;
    let name = unique("cli-serial");
    let table = format!("cli_runs_{:08x}", rand::thread_rng().gen::<u32>());
    db.admin()
        .batch_execute(&format!(
            "CREATE TABLE {table} (run int, what text, at timestamptz DEFAULT clock_timestamp())"
        ))
        .await
        .unwrap();
    // Each child records its start and its end, from the database's one clock.
    let script = format!(
        "psql -X -q -v ON_ERROR_STOP=1 \"$DATABASE_URL\" -c \"INSERT INTO {table} (run, what) VALUES ($RUN, 'start')\" \
         && sleep 0.2 \
         && psql -X -q -v ON_ERROR_STOP=1 \"$DATABASE_URL\" -c \"INSERT INTO {table} (run, what) VALUES ($RUN, 'end')\""
    );
    let children: Vec<Child> = (0..6)
        .map(|run| {
            pglock(&["run", "-q", &name, "--", "sh", "-c", &script])
                .env("RUN", run.to_string())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let finished = finish(child).await;
        assert_eq!(finished.code(), 0, "{finished:?}");
        assert!(finished.stderr.is_empty(), "-q: {finished:?}");
    }
    let rows = db
        .admin()
        .query(
            &format!(
                "SELECT run, min(at) FILTER (WHERE what = 'start'), max(at) FILTER (WHERE what = 'end'), count(*)
                 FROM {table} GROUP BY run ORDER BY 2"
            ),
            &[],
        )
        .await
        .unwrap();
    db.admin()
        .batch_execute(&format!("DROP TABLE {table}"))
        .await
        .unwrap();
    assert_eq!(rows.len(), 6, "every run ran");
    let spans: Vec<(std::time::SystemTime, std::time::SystemTime)> = rows
        .iter()
        .map(|row| {
            assert_eq!(row.get::<_, i64>(3), 2, "one start and one end per run");
            (row.get(1), row.get(2))
        })
        .collect();
    for pair in spans.windows(2) {
        let (_, end) = pair[0];
        let (next_start, _) = pair[1];
        assert!(
            next_start >= end,
            "runs overlapped: one ended at {end:?}, the next started at {next_start:?}"
        );
    }
    assert_key_free(&db, AdvisoryKey::from_name(&name)).await;
    db.assert_no_locks().await;
}

#[tokio::test]
async fn busy_timeout_and_exit_codes() {
    let db = TestDb::new("cli_exit_codes").await;
    let pool = db.pool(1);
    let name = unique("cli-busy");
    let key = AdvisoryKey::from_name(&name);
    let holder = AdvisoryLock::new(&pool, key).lock().await.unwrap();
    let holder_pid = pglock::AdvisoryLockGuard::backend_pid(&holder);

    let busy = run(&["run", "-n", &name, "--", "true"]).await;
    assert_eq!(busy.code(), CONFLICT, "{busy:?}");
    assert!(
        busy.stderr.contains(&format!("pid {holder_pid}")) && busy.stderr.contains(&db.app),
        "says who holds it: {busy:?}"
    );
    let custom = run(&["run", "-q", "-n", "-E", "3", &name, "--", "true"]).await;
    assert_eq!(custom.code(), 3, "{custom:?}");
    assert!(custom.stderr.is_empty(), "-q: {custom:?}");

    let started = Instant::now();
    let timed_out = run(&["run", "--timeout", "300ms", &name, "--", "true"]).await;
    assert_eq!(timed_out.code(), CONFLICT, "{timed_out:?}");
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(timed_out.stderr.contains("waiting up to"), "{timed_out:?}");
    // The same key by number, and `--timeout 0` as no-wait.
    let AdvisoryKey::Single(number) = key else {
        unreachable!()
    };
    let by_key = run(&[
        "run",
        "-q",
        "-w",
        "0",
        "--key",
        &number.to_string(),
        "--",
        "true",
    ])
    .await;
    assert_eq!(by_key.code(), CONFLICT, "{by_key:?}");
    drop(holder);
    assert_key_free(&db, key).await;

    // Free: the child's own status, its environment, and 128 + N for a signal.
    let ok = run(&[
        "run",
        &name,
        "--",
        "sh",
        "-c",
        "echo \"$PGLOCK_NAME $PGLOCK_KEY $PGLOCK_MODE\"; exit 7",
    ])
    .await;
    assert_eq!(ok.code(), 7, "{ok:?}");
    assert_eq!(ok.stdout.trim(), format!("{name} {number} exclusive"));
    let killed = run(&["run", &name, "--", "sh", "-c", "kill -KILL $$"]).await;
    assert_eq!(killed.code(), 128 + 9, "{killed:?}");
    let pair = run(&[
        "run",
        "-s",
        "--key",
        "7,-8",
        "--",
        "sh",
        "-c",
        "echo $PGLOCK_KEY $PGLOCK_MODE",
    ])
    .await;
    assert_eq!(pair.code(), 0, "{pair:?}");
    assert_eq!(pair.stdout.trim(), "7,-8 shared");

    // pglock's own failures.
    let missing = run(&["run", &name, "--", "/nonexistent/command"]).await;
    assert_eq!(missing.code(), NOT_FOUND, "{missing:?}");
    let no_command = run(&["run", &name]).await;
    assert_eq!(no_command.code(), USAGE, "{no_command:?}");
    let bad_key = run(&["run", "--key", "x", "--", "true"]).await;
    assert_eq!(bad_key.code(), USAGE, "{bad_key:?}");
    let bad_duration = run(&["run", "--timeout", "soon", &name, "--", "true"]).await;
    assert_eq!(bad_duration.code(), USAGE, "{bad_duration:?}");
    let no_url = finish(
        pglock(&["run", &name, "--", "true"])
            .env_remove("DATABASE_URL")
            .spawn()
            .unwrap(),
    )
    .await;
    assert_eq!(no_url.code(), USAGE, "{no_url:?}");
    assert!(no_url.stderr.contains("DATABASE_URL"), "{no_url:?}");
    // A refused connection may be a server restarting: pglock tries again for the connect
    // timeout (1 s here), then gives up with 69.
    let unreachable = run(&[
        "--database-url",
        "postgres://someone:hunter2@127.0.0.1:1/nowhere",
        "--connect-timeout",
        "1s",
        "run",
        &name,
        "--",
        "true",
    ])
    .await;
    assert_eq!(unreachable.code(), CANNOT_CONNECT, "{unreachable:?}");
    assert!(
        !unreachable.stderr.contains("hunter2") && unreachable.stderr.contains("someone:***@"),
        "password redacted: {unreachable:?}"
    );
    let help = run(&["run", "--help"]).await;
    assert_eq!(help.code(), 0);
    assert!(help.stdout.contains("Exit codes:") && help.stdout.contains("76"));

    assert_key_free(&db, key).await;
    db.assert_no_locks().await;
}

#[tokio::test]
async fn forwards_signals_to_the_command() {
    let db = TestDb::new("cli_signals").await;
    let scratch = Scratch::new();
    let name = unique("cli-signals");
    let key = AdvisoryKey::from_name(&name);
    for signal in ["TERM", "INT", "HUP"] {
        let ready = scratch.path(&format!("{signal}.ready"));
        let got = scratch.path(&format!("{signal}.got"));
        let script = format!(
            "trap 'echo {signal} > {got}; exit 7' {signal}; touch {ready}; while :; do sleep 0.05; done",
            got = got.display(),
            ready = ready.display()
        );
        let child = pglock(&["run", &name, "--", "sh", "-c", &script])
            .spawn()
            .unwrap();
        wait_for_file(&ready).await;
        kill(child.id().unwrap(), signal);
        let finished = finish(child).await;
        assert_eq!(finished.code(), 7, "{signal}: {finished:?}");
        assert_eq!(std::fs::read_to_string(&got).unwrap().trim(), signal);
        assert_key_free(&db, key).await;
    }

    // A command that dies of the forwarded signal: 128 + 15.
    let ready = scratch.path("plain.ready");
    let script = format!("touch {}; exec sleep 30", ready.display());
    let child = pglock(&["run", &name, "--", "sh", "-c", &script])
        .spawn()
        .unwrap();
    wait_for_file(&ready).await;
    kill(child.id().unwrap(), "TERM");
    let finished = finish(child).await;
    assert_eq!(finished.code(), 128 + 15, "{finished:?}");

    // A signal while waiting for the lock: pglock gives up and leaves no waiter behind.
    let pool = db.pool(1);
    let holder = AdvisoryLock::new(&pool, key).lock().await.unwrap();
    let child = pglock(&["run", "-q", &name, "--", "true"]).spawn().unwrap();
    db.wait_for_waiters(key, 1, Duration::from_secs(10)).await;
    kill(child.id().unwrap(), "INT");
    let finished = finish(child).await;
    assert_eq!(finished.code(), 128 + 2, "{finished:?}");
    db.wait_for_waiters(key, 0, Duration::from_secs(5)).await;
    drop(holder);
    assert_key_free(&db, key).await;
    db.assert_no_locks().await;
}

#[tokio::test]
async fn stops_the_command_when_the_lock_is_lost() {
    let db = TestDb::new("cli_lost").await;
    let scratch = Scratch::new();
    let name = unique("cli-lost");
    let key = AdvisoryKey::from_name(&name);

    // A command that stops on SIGTERM.
    let ready = scratch.path("obeys.ready");
    let stopped = scratch.path("obeys.stopped");
    let script = format!(
        "trap 'touch {stopped}; exit 0' TERM; touch {ready}; while :; do sleep 0.05; done",
        stopped = stopped.display(),
        ready = ready.display()
    );
    let child = pglock(&["run", &name, "--", "sh", "-c", &script])
        .spawn()
        .unwrap();
    wait_for_file(&ready).await;
    let backend = wait_for_holder(&db, key).await;
    db.terminate(backend).await;
    let finished = finish(child).await;
    assert_eq!(finished.code(), LOCK_LOST, "{finished:?}");
    assert!(stopped.exists(), "the command got SIGTERM");
    assert!(finished.stderr.contains("lost lock"), "{finished:?}");

    // A command that ignores SIGTERM gets SIGKILL after --kill-after.
    let ready = scratch.path("stubborn.ready");
    let script = format!(
        "trap '' TERM; touch {}; while :; do sleep 0.05; done",
        ready.display()
    );
    let child = pglock(&[
        "run",
        "--kill-after",
        "500ms",
        &name,
        "--",
        "sh",
        "-c",
        &script,
    ])
    .spawn()
    .unwrap();
    wait_for_file(&ready).await;
    let backend = wait_for_holder(&db, key).await;
    let started = Instant::now();
    db.terminate(backend).await;
    let finished = finish(child).await;
    assert_eq!(finished.code(), LOCK_LOST, "{finished:?}");
    assert!(started.elapsed() >= Duration::from_millis(500));
    assert!(finished.stderr.contains("SIGKILL"), "{finished:?}");
    assert_key_free(&db, key).await;
    db.assert_no_locks().await;
}

#[tokio::test]
async fn status_shows_holders_and_waiters() {
    let db = TestDb::new("cli_status").await;
    let scratch = Scratch::new();
    let name = unique("cli-status");
    let key = AdvisoryKey::from_name(&name);
    let ready = scratch.path("ready");
    let script = format!("touch {}; exec sleep 30", ready.display());
    let holder = pglock(&["run", &name, "--", "sh", "-c", &script])
        .spawn()
        .unwrap();
    wait_for_file(&ready).await;
    let holder_backend = wait_for_holder(&db, key).await;
    let pool = db.pool(1);
    let waiter = tokio::spawn({
        let lock = AdvisoryLock::new(&pool, key);
        async move { drop(lock.lock_shared().await.unwrap()) }
    });
    db.wait_for_waiters(key, 1, Duration::from_secs(10)).await;
    let AdvisoryKey::Single(number) = key else {
        unreachable!()
    };

    let json = run(&["status", "--json", "--key", &number.to_string()]).await;
    assert_eq!(json.code(), 0, "{json:?}");
    let value: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    let locks = value["locks"].as_array().unwrap();
    assert_eq!(locks.len(), 2, "{json:?}");
    let (held, waiting) = (&locks[0], &locks[1]);
    assert_eq!(held["name"], name.as_str());
    assert_eq!(held["key"], number.to_string());
    assert_eq!(held["state"], "held");
    assert_eq!(held["mode"], "exclusive");
    assert_eq!(held["scope"], "session");
    assert_eq!(held["pid"], holder_backend);
    assert_eq!(held["application_name"], format!("pglock run {name}"));
    assert_eq!(held["client_addr"], "127.0.0.1");
    // pglock's loss detection probes the holder's session, so when it got the lock cannot be
    // told (held_since is null once the first probe ran); when it connected can.
    assert!(held["backend_start"].is_string(), "{held}");
    assert_eq!(held["blocked_by"], serde_json::json!([]));
    assert_eq!(waiting["name"], name.as_str());
    assert_eq!(waiting["state"], "waiting");
    assert_eq!(waiting["mode"], "shared");
    assert_eq!(waiting["application_name"], db.app.as_str());
    assert!(waiting["wait_start"].is_string(), "{waiting}");
    assert_eq!(waiting["blocked_by"], serde_json::json!([holder_backend]));

    let table = run(&["status", "--name", &name]).await;
    assert_eq!(table.code(), 0, "{table:?}");
    let lines: Vec<&str> = table.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{table:?}");
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        header,
        [
            "LOCK",
            "KEY",
            "MODE",
            "SCOPE",
            "STATE",
            "PID",
            "APPLICATION",
            "CLIENT",
            "SINCE",
            "FOR",
            "BLOCKED",
            "BY"
        ]
    );
    let held_row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        &held_row[..8],
        [
            name.as_str(),
            &number.to_string(),
            "exclusive",
            "session",
            "held",
            &holder_backend.to_string(),
            "pglock",
            "run"
        ]
    );
    assert!(lines[2].contains("waiting") && lines[2].contains(&holder_backend.to_string()));

    // While a second pglock waits, it says who holds the lock.
    let second = pglock(&["run", "--progress-every", "200ms", &name, "--", "true"])
        .spawn()
        .unwrap();
    db.wait_for_waiters(key, 2, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    kill(holder.id().unwrap(), "TERM");
    let finished = finish(holder).await;
    assert_eq!(finished.code(), 128 + 15, "{finished:?}");
    let second = finish(second).await;
    assert_eq!(second.code(), 0, "{second:?}");
    let reports = second
        .stderr
        .lines()
        .filter(|l| l.contains(&format!("pid {holder_backend} (pglock run {name}")))
        .count();
    assert!(reports >= 2, "reports every 200 ms: {second:?}");
    tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .unwrap()
        .unwrap();

    let empty = run(&["status", "--name", &name]).await;
    assert_eq!(empty.stdout.trim(), "No advisory locks held or awaited.");
    assert_key_free(&db, key).await;
    db.assert_no_locks().await;
}

#[tokio::test]
async fn status_names_locks_whose_names_are_not_ascii() {
    let db = TestDb::new("cli_status_utf8").await;
    let scratch = Scratch::new();
    // PostgreSQL keeps only printable ASCII of an application_name: pglock percent-encodes the
    // rest, and status decodes it.
    let name = unique("café-日本");
    let key = AdvisoryKey::from_name(&name);
    let ready = scratch.path("ready");
    let script = format!("touch {}; exec sleep 30", ready.display());
    let holder = pglock(&["run", &name, "--", "sh", "-c", &script])
        .spawn()
        .unwrap();
    wait_for_file(&ready).await;
    let backend = wait_for_holder(&db, key).await;
    let app: String = db
        .admin()
        .query_one(
            "SELECT application_name FROM pg_stat_activity WHERE pid = $1",
            &[&backend],
        )
        .await
        .unwrap()
        .get(0);
    assert!(app.is_ascii() && !app.contains('?'), "{app}");
    assert!(app.starts_with("pglock run caf%C3%A9-"), "{app}");

    // Found by key alone, without --name or --known.
    let AdvisoryKey::Single(number) = key else {
        unreachable!()
    };
    let json = run(&["status", "--json", "--key", &number.to_string()]).await;
    assert_eq!(json.code(), 0, "{json:?}");
    let value: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(value["locks"][0]["name"], name.as_str(), "{json:?}");
    let table = run(&["status", "--key", &number.to_string()]).await;
    assert_eq!(table.code(), 0, "{table:?}");
    assert!(
        table.stdout.lines().nth(1).unwrap().starts_with(&name),
        "{table:?}"
    );

    kill(holder.id().unwrap(), "TERM");
    assert_eq!(finish(holder).await.code(), SIGTERM_EXIT);
    assert_key_free(&db, key).await;
    db.assert_no_locks().await;
}

/// Whether `pid` runs (a zombie, dead but not yet reaped, does not count).
fn process_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

#[tokio::test]
async fn process_groups_and_parent_death() {
    let db = TestDb::new("cli_process_groups").await;
    let name = unique("cli-groups");
    let key = AdvisoryKey::from_name(&name);
    let own_group = std::process::Command::new("ps")
        .args(["-o", "pgid=", "-p", &std::process::id().to_string()])
        .output()
        .unwrap();
    let test_group = String::from_utf8_lossy(&own_group.stdout).trim().to_owned();

    // By default the command leads a process group of its own; with --foreground it stays in
    // pglock's (here: the test's) group.
    let script = "echo $$ $(ps -o pgid= -p $$)";
    let default = run(&["run", &name, "--", "sh", "-c", script]).await;
    let fields: Vec<&str> = default.stdout.split_whitespace().collect();
    assert_eq!(fields.len(), 2, "{default:?}");
    assert_eq!(fields[0], fields[1], "the command leads its own group");
    let foreground = run(&["run", "--foreground", &name, "--", "sh", "-c", script]).await;
    let fields: Vec<&str> = foreground.stdout.split_whitespace().collect();
    assert_eq!(
        fields.get(1).copied(),
        Some(test_group.as_str()),
        "{foreground:?}"
    );

    // If pglock is killed outright, the command does not go on without the lock.
    let scratch = Scratch::new();
    let pid_file = scratch.path("pid");
    let script = format!("echo $$ > {}; exec sleep 30", pid_file.display());
    let mut child = pglock(&["run", &name, "--", "sh", "-c", &script])
        .spawn()
        .unwrap();
    wait_for_file(&pid_file).await;
    wait_for_holder(&db, key).await;
    let command_pid: i32 = loop {
        if let Ok(pid) = std::fs::read_to_string(&pid_file).unwrap().trim().parse() {
            break pid;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(process_alive(command_pid));
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while process_alive(command_pid) {
        assert!(Instant::now() < deadline, "the command outlived pglock");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_key_free(&db, key).await;
    db.assert_no_locks().await;
}

/// The key `pglock leader NAME` holds.
pub(crate) fn leader_key(name: &str) -> AdvisoryKey {
    AdvisoryKey::from_name(&format!("leader:{name}"))
}

/// Reads `path` as lines of `TERM ID`.
fn terms(path: &Path) -> Vec<(i64, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let (term, id) = line.split_once(' ')?;
            Some((term.parse().ok()?, id.to_owned()))
        })
        .collect()
}

async fn wait_for_terms(path: &Path, n: usize) -> Vec<(i64, String)> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let seen = terms(path);
        if seen.len() >= n {
            return seen;
        }
        assert!(
            Instant::now() < deadline,
            "{n} terms expected, saw {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn leader_fails_over_between_processes() {
    let db = TestDb::new("cli_leader_failover").await;
    let scratch = Scratch::new();
    let name = unique("cli-leader");
    let key = leader_key(&name);
    let log = scratch.path("terms");
    let stops = scratch.path("stops");
    let mut contenders: Vec<(String, Child)> = ["a", "b", "c"]
        .iter()
        .map(|id| {
            // The command logs its term when it starts and when it is stopped.
            let script = format!(
                "trap 'echo \"$PGLOCK_TERM {id}\" >> {stops}; exit 0' TERM; \
                 echo \"$PGLOCK_TERM {id}\" >> {log}; while :; do sleep 0.05; done",
                log = log.display(),
                stops = stops.display()
            );
            let child = pglock(&["leader", &name, "--", "sh", "-c", &script])
                .spawn()
                .unwrap();
            (id.to_string(), child)
        })
        .collect();

    // One leads.
    let first = wait_for_terms(&log, 1).await;
    let (first_term, first_id) = first[0].clone();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(terms(&log).len(), 1, "exactly one leader at a time");

    // Its backend is terminated: another instance leads, in a later term, and the old leader
    // stops its command once it detects the loss (within the detection bound), then campaigns
    // again.
    db.terminate(wait_for_holder(&db, key).await).await;
    let second = wait_for_terms(&log, 2).await;
    let (second_term, second_id) = second[1].clone();
    assert!(second_term > first_term, "{second:?}");
    assert_ne!(second_id, first_id);
    assert_eq!(
        wait_for_terms(&stops, 1).await[0],
        (first_term, first_id.clone())
    );

    // The current leader stops gracefully (SIGTERM): its command gets the signal, pglock exits
    // with the command's status, and a standby takes over at once.
    let position = contenders
        .iter()
        .position(|(id, _)| *id == second_id)
        .unwrap();
    let (_, leader) = contenders.remove(position);
    kill(leader.id().unwrap(), "TERM");
    let finished = finish(leader).await;
    assert_eq!(finished.code(), 0, "{finished:?}");
    assert_eq!(wait_for_terms(&stops, 2).await[1], (second_term, second_id));
    let third = wait_for_terms(&log, 3).await;
    assert!(third[2].0 > second_term, "{third:?}");

    // Both remaining instances end on SIGTERM, the standby first (so that it cannot take over
    // from the leader); the one that was deposed said so.
    contenders.sort_by_key(|(id, _)| *id == third[2].1);
    for (id, child) in contenders {
        kill(child.id().unwrap(), "TERM");
        let finished = finish(child).await;
        assert_eq!(finished.code() == 0, id == third[2].1, "{id}: {finished:?}");
        if id == first_id {
            assert!(
                finished.stderr.contains("lost the leadership"),
                "{finished:?}"
            );
        }
    }
    let all = terms(&log);
    for pair in all.windows(2) {
        assert!(pair[1].0 > pair[0].0, "terms strictly increase: {all:?}");
    }
    assert_key_free(&db, key).await;
    db.assert_no_locks().await;
}

#[tokio::test]
async fn leader_restart_policies() {
    let db = TestDb::new("cli_leader_restart").await;
    let scratch = Scratch::new();
    let name = unique("cli-restart");
    let log = scratch.path("terms");
    let counter = scratch.path("count");
    // Fails twice, then succeeds.
    let script = format!(
        "echo \"$PGLOCK_TERM x\" >> {log}; n=$(cat {counter} 2>/dev/null || echo 0); n=$((n+1)); \
         echo $n > {counter}; [ $n -ge 3 ] && exit 0 || exit 3",
        log = log.display(),
        counter = counter.display()
    );
    let on_failure = run(&[
        "leader",
        "--restart-delay",
        "50ms",
        &name,
        "--",
        "sh",
        "-c",
        &script,
    ])
    .await;
    assert_eq!(on_failure.code(), 0, "{on_failure:?}");
    let runs = terms(&log);
    assert_eq!(runs.len(), 3, "{runs:?}");
    assert!(runs.windows(2).all(|p| p[1].0 > p[0].0), "{runs:?}");

    let never = run(&[
        "leader",
        "--restart",
        "never",
        &name,
        "--",
        "sh",
        "-c",
        "exit 3",
    ])
    .await;
    assert_eq!(never.code(), 3, "{never:?}");

    // With --restart never, a lost leadership ends pglock with 76.
    let ready = scratch.path("ready");
    let script = format!("touch {}; exec sleep 30", ready.display());
    let child = pglock(&[
        "leader",
        "--restart",
        "never",
        &name,
        "--",
        "sh",
        "-c",
        &script,
    ])
    .spawn()
    .unwrap();
    wait_for_file(&ready).await;
    db.terminate(wait_for_holder(&db, leader_key(&name)).await)
        .await;
    let lost = finish(child).await;
    assert_eq!(lost.code(), LOCK_LOST, "{lost:?}");

    let table = run(&["status", "--name", &format!("leader:{name}")]).await;
    assert_eq!(table.stdout.trim(), "No advisory locks held or awaited.");
    assert_key_free(&db, leader_key(&name)).await;
    db.assert_no_locks().await;
}

#[tokio::test]
async fn stops_the_command_when_the_network_goes_silent() {
    use crate::support::TcpProxy;

    let db = TestDb::new("cli_blackhole").await;
    let scratch = Scratch::new();
    let name = unique("cli-blackhole");
    let key = AdvisoryKey::from_name(&name);
    let config: tokio_postgres::Config = database_url().parse().unwrap();
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        _ => "127.0.0.1".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let server = tokio::net::lookup_host((host.as_str(), port))
        .await
        .unwrap()
        .next()
        .unwrap();
    let proxy = TcpProxy::start(server).await;
    let user = config.get_user().unwrap_or("postgres");
    let dbname = config.get_dbname().unwrap_or("test");
    let url = format!("postgres://{user}@{}/{dbname}", proxy.addr());

    let ready = scratch.path("ready");
    let stopped = scratch.path("stopped");
    let script = format!(
        "trap 'touch {stopped}; exit 0' TERM; touch {ready}; while :; do sleep 0.05; done",
        stopped = stopped.display(),
        ready = ready.display()
    );
    let child = pglock(&["run", &name, "--", "sh", "-c", &script])
        .env("DATABASE_URL", &url)
        .spawn()
        .unwrap();
    wait_for_file(&ready).await;
    let backend = wait_for_holder(&db, key).await;

    // Packets stop; no socket closes. Only pglock's probes can tell.
    let started = Instant::now();
    proxy.blackhole();
    let finished = finish(child).await;
    assert_eq!(finished.code(), LOCK_LOST, "{finished:?}");
    assert!(stopped.exists(), "the command got SIGTERM");
    assert!(finished.stderr.contains("probe"), "{finished:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "noticed in {:?}",
        started.elapsed()
    );

    // The server still sees the session behind the silent proxy; end it.
    drop(proxy);
    if db.holders(key).await.contains(&backend) {
        let _ = db
            .admin()
            .query_one("SELECT pg_terminate_backend($1)", &[&backend])
            .await;
    }
    assert_key_free(&db, key).await;
    db.assert_no_locks().await;
}

#[tokio::test]
async fn verbose_prints_the_library_events() {
    let name = unique("verbose");
    let done = run(&["-v", "run", &name, "--", "true"]).await;
    assert_eq!(done.code(), 0, "{done:?}");
    assert!(done.stderr.contains("advisory lock granted"), "{done:?}");
    assert!(done.stderr.contains("advisory lock released"), "{done:?}");
    assert!(
        done.stderr.contains("acquire{key="),
        "the acquisition span: {done:?}"
    );
    // Without -v the events stay silent.
    let quiet = run(&["run", &name, "--", "true"]).await;
    assert_eq!(quiet.code(), 0, "{quiet:?}");
    assert!(!quiet.stderr.contains("advisory lock granted"), "{quiet:?}");
}
