//! `pglock leader` standbys and `pglock run` waiters that wait past many progress intervals:
//! they keep their place in the server's lock queue, report at the interval and no more often,
//! cost next to no CPU, and take over when the holder's whole process tree is killed.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use pglock::AdvisoryKey;
use tokio::process::{Child, Command};

use crate::cli::{
    assert_key_free, kill, leader_key, unique, wait_for_holder, Scratch, SIGTERM_EXIT,
};
use crate::harness::{database_url, TestDb};

/// A `pglock` process whose stderr goes to a file, read while it runs.
pub(crate) struct Instance {
    child: Child,
    stderr: PathBuf,
}

impl Instance {
    fn start(args: &[&str], stderr: PathBuf) -> Self {
        Self::start_on(&database_url(), args, stderr)
    }

    /// Starts `pglock args` with `url` as `DATABASE_URL`.
    pub(crate) fn start_on(url: &str, args: &[&str], stderr: PathBuf) -> Self {
        let file = std::fs::File::create(&stderr).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_pglock"))
            .args(args)
            .env("DATABASE_URL", url)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(file))
            .kill_on_drop(true)
            .spawn()
            .expect("start pglock");
        Instance { child, stderr }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    pub(crate) fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    pub(crate) fn lines_with(&self, needle: &str) -> usize {
        self.stderr().lines().filter(|l| l.contains(needle)).count()
    }

    /// Waits until stderr has a line with `needle`; how long that took.
    pub(crate) async fn wait_for_line(&self, needle: &str, within: Duration) -> Duration {
        let start = Instant::now();
        while !self.stderr().contains(needle) {
            assert!(
                start.elapsed() < within,
                "no line with {needle:?} within {within:?}:\n{}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        start.elapsed()
    }

    pub(crate) async fn exit_code(mut self) -> i32 {
        let status = tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .expect("pglock exits within 20 s")
            .unwrap();
        status
            .code()
            .unwrap_or_else(|| panic!("pglock died of a signal:\n{}", self.stderr()))
    }
}

/// CPU time (user + system) the process has used so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses and may contain spaces.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..]
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_secs_f64(ticks as f64 / clock_ticks_per_second() as f64)
}

fn clock_ticks_per_second() -> u64 {
    let out = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// `pid` and every process descended from it.
fn process_tree(pid: u32) -> Vec<u32> {
    let mut parents = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some(after_name) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
            continue;
        };
        if let Some(parent) = after_name
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<u32>().ok())
        {
            parents.push((child, parent));
        }
    }
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(
            parents
                .iter()
                .filter(|(_, p)| *p == parent)
                .map(|(c, _)| *c),
        );
        i += 1;
    }
    tree
}

/// SIGKILLs `pid` and all its descendants at once, as an orchestrator or the OOM killer would.
pub(crate) fn kill_tree(pid: u32) -> Vec<u32> {
    let tree = process_tree(pid);
    let mut command = std::process::Command::new("kill");
    command.arg("-KILL");
    for pid in &tree {
        command.arg(pid.to_string());
    }
    // Some may have exited in between: that is fine.
    let _ = command.stderr(Stdio::null()).status();
    tree
}

/// The waiters queued for `key`, as `(backend pid, wait start)`, first in line first.
async fn queue(db: &TestDb, key: AdvisoryKey) -> Vec<(i32, String)> {
    let (classid, objid, objsubid) = key.pg_locks_ids();
    db.admin()
        .query(
            "SELECT pid, waitstart::text FROM pg_locks \
             WHERE locktype = 'advisory' AND NOT granted \
             AND classid = $1::int8::oid AND objid = $2::int8::oid AND objsubid = $3 \
             ORDER BY waitstart",
            &[&i64::from(classid), &i64::from(objid), &objsubid],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

async fn wait_for_queue(db: &TestDb, key: AdvisoryKey, n: usize) -> Vec<(i32, String)> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let queued = queue(db, key).await;
        if queued.len() == n {
            return queued;
        }
        assert!(
            Instant::now() < deadline,
            "{n} waiters expected for {key}, saw {queued:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// What the waiters' command prints on stderr (which it shares with its pglock) when it starts.
const STARTED: &str = "the command started";

/// How a scenario runs: the subcommand, the lock, the holder's command, and the line a waiter
/// prints in each progress report.
struct Scenario<'a> {
    /// `leader` or `run`.
    verb: &'a str,
    key: AdvisoryKey,
    name: String,
    holder_command: &'a [&'a str],
    /// Runs after printing [`STARTED`].
    waiter_script: &'a str,
    progress_line: &'a str,
}

/// Starts a holder and two waiters, lets the waiters wait `stand_by`, checks their queue places,
/// reports and CPU, SIGKILLs the holder's whole process tree and checks that the first waiter
/// takes over within the bound. Returns the waiters, first in line first.
async fn stand_by_then_kill_the_holder(
    db: &TestDb,
    scratch: &Scratch,
    scenario: &Scenario<'_>,
    progress_every: Option<&str>,
    stand_by: Duration,
) -> (Instance, Instance) {
    let every = match progress_every {
        Some(text) => parse_ms(text),
        None => Duration::from_secs(10),
    };
    let waiter_script = format!("echo '{STARTED}' >&2; {}", scenario.waiter_script);
    let waiter_command = ["sh", "-c", &waiter_script];
    let start = |command: &[&str], log: &str| {
        let mut args = vec![scenario.verb];
        if let Some(every) = progress_every {
            args.extend(["--progress-every", every]);
        }
        args.extend([scenario.name.as_str(), "--"]);
        args.extend(command);
        Instance::start(&args, scratch.path(log))
    };

    let holder = start(scenario.holder_command, "holder");
    wait_for_holder(db, scenario.key).await;
    let first_started = Instant::now();
    let first = start(&waiter_command, "first");
    wait_for_queue(db, scenario.key, 1).await;
    let second_started = Instant::now();
    let second = start(&waiter_command, "second");
    let queued = wait_for_queue(db, scenario.key, 2).await;
    let cpu_before = [cpu_time(first.pid()), cpu_time(second.pid())];
    let waited_from = Instant::now();

    tokio::time::sleep(stand_by).await;

    // Both still wait in the server's queue, each in the place it took (same backend, same wait
    // start): no wait was abandoned and queued again.
    assert_eq!(
        queue(db, scenario.key).await,
        queued,
        "the waiters kept their places"
    );
    let waited = waited_from.elapsed();
    for (waiter, started) in [(&first, first_started), (&second, second_started)] {
        let reports = waiter.lines_with(scenario.progress_line);
        // Each waiter's own wait, measured after its lines were read: an upper bound.
        let waited = started.elapsed();
        let most = (waited.as_secs_f64() / every.as_secs_f64()).floor() as usize + 2;
        assert!(
            (2..=most).contains(&reports),
            "one report per {every:?} over {waited:?} (2 to {most}), saw {reports}:\n{}",
            waiter.stderr()
        );
    }
    // Waiting costs the CPU of the reports and nothing else: under 1 % of the time waited, plus
    // 20 ms per report (a debug build's query and print; a release build needs far less).
    for (waiter, before) in [&first, &second].into_iter().zip(cpu_before) {
        let used = cpu_time(waiter.pid()) - before;
        let reports = waiter.lines_with(scenario.progress_line) as u32;
        let allowed = waited / 100 + Duration::from_millis(20) * reports;
        assert!(
            used <= allowed,
            "a waiter used {used:?} of CPU in {waited:?} (allowed {allowed:?})"
        );
    }

    // The holder's whole process tree dies at once. Its socket closes with it, the server ends
    // its session and grants the lock to the first in line, which starts its command: the
    // documented bound is a round trip plus the statements of taking over (a leader records its
    // term), milliseconds on loopback; 5 s leaves room for a loaded machine's scheduling and
    // the start of a shell.
    let killed = kill_tree(holder.pid());
    assert!(killed.len() >= 2, "pglock and its command: {killed:?}");
    let took = first.wait_for_line(STARTED, Duration::from_secs(5)).await;
    eprintln!("the first waiter took over {took:?} after the holder's tree was killed");
    assert_eq!(
        second.lines_with(STARTED),
        0,
        "only the first in line takes over:\n{}",
        second.stderr()
    );
    (first, second)
}

fn parse_ms(text: &str) -> Duration {
    Duration::from_millis(text.trim_end_matches("ms").parse().unwrap())
}

async fn leader_standbys(progress_every: Option<&str>, stand_by: Duration, test: &str) {
    let db = TestDb::new(test).await;
    let scratch = Scratch::new();
    let name = unique("standby");
    let scenario = Scenario {
        verb: "leader",
        key: leader_key(&name),
        name,
        holder_command: &["sh", "-c", "while :; do sleep 0.5; done"],
        waiter_script: "while :; do sleep 0.5; done",
        progress_line: "standing by for leadership",
    };
    let (first, second) =
        stand_by_then_kill_the_holder(&db, &scratch, &scenario, progress_every, stand_by).await;
    assert_eq!(wait_for_queue(&db, scenario.key, 1).await.len(), 1);

    // SIGTERM ends both: the leader's command dies of it (pglock exits with its status), the
    // standby gives up campaigning with 128 + 15.
    kill(second.pid(), "TERM");
    assert_eq!(second.exit_code().await, SIGTERM_EXIT);
    kill(first.pid(), "TERM");
    assert_eq!(first.exit_code().await, SIGTERM_EXIT);
    assert_key_free(&db, scenario.key).await;
    db.assert_no_locks().await;
}

#[tokio::test]
async fn leader_standbys_wait_many_short_progress_intervals_then_take_over() {
    leader_standbys(
        Some("200ms"),
        Duration::from_secs(3),
        "cli_standby_leader_short",
    )
    .await;
}

/// The default progress interval (10 s), waited past three times.
#[tokio::test]
async fn leader_standbys_wait_past_the_default_progress_interval_then_take_over() {
    leader_standbys(None, Duration::from_secs(32), "cli_standby_leader_default").await;
}

#[tokio::test]
async fn run_waiters_wait_many_short_progress_intervals_then_take_over() {
    let db = TestDb::new("cli_standby_run_short").await;
    let scratch = Scratch::new();
    let name = unique("waiter");
    let scenario = Scenario {
        verb: "run",
        key: AdvisoryKey::from_name(&name),
        name,
        holder_command: &["sleep", "1000"],
        waiter_script: "sleep 0.2",
        progress_line: "is busy",
    };
    let (first, second) = stand_by_then_kill_the_holder(
        &db,
        &scratch,
        &scenario,
        Some("200ms"),
        Duration::from_secs(3),
    )
    .await;
    // Each runs its command in turn, and exits with its status.
    assert_eq!(first.exit_code().await, 0);
    second.wait_for_line(STARTED, Duration::from_secs(5)).await;
    assert_eq!(second.exit_code().await, 0);
    assert_key_free(&db, scenario.key).await;
    db.assert_no_locks().await;
}

/// The connections open with `application_name` `app`, and the waiters queued for `key`, sampled
/// every 20 ms for `during`: (samples, samples with more than `allowed` connections, samples
/// with a waiter).
async fn sample_connections(
    db: &TestDb,
    app: &str,
    key: AdvisoryKey,
    allowed: i64,
    during: Duration,
) -> (usize, usize, usize) {
    let (mut samples, mut over, mut queued) = (0, 0, 0);
    let end = Instant::now() + during;
    while Instant::now() < end {
        let open: i64 = db
            .admin()
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
                &[&app],
            )
            .await
            .unwrap()
            .get(0);
        samples += 1;
        over += usize::from(open > allowed);
        queued += usize::from(!queue(db, key).await.is_empty());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (samples, over, queued)
}

/// The longest pause of a polling waiter (2 s) with its jitter (up to 1.5 times), plus a
/// connection, the attempt and the election: the documented take-over bound of `--wait-mode
/// poll`, with 2 s more for a loaded machine.
const POLL_TAKE_OVER: Duration = Duration::from_millis(3000 + 2000);

#[tokio::test]
async fn polling_standbys_hold_no_connection_and_take_over() {
    let db = TestDb::new("cli_standby_poll").await;
    let scratch = Scratch::new();
    let name = unique("poll");
    let key = leader_key(&name);
    let app = format!("pglock leader {name}");
    let script = format!("echo '{STARTED}' >&2; while :; do sleep 0.5; done");
    let start = |log: &str| {
        Instance::start(
            &[
                "leader",
                "--wait-mode",
                "poll",
                "--progress-every",
                "500ms",
                &name,
                "--",
                "sh",
                "-c",
                &script,
            ],
            scratch.path(log),
        )
    };
    let leader = start("leader");
    leader.wait_for_line(STARTED, Duration::from_secs(10)).await;
    let standbys = [start("a"), start("b")];
    for standby in &standbys {
        standby
            .wait_for_line("standing by", Duration::from_secs(10))
            .await;
    }

    // The leader holds one connection; a standby holds one only while it polls (a connection,
    // one statement, a close, every 0.25 to 2 s), and never waits in the server's queue.
    let (samples, over, queued) =
        sample_connections(&db, &app, key, 1, Duration::from_secs(3)).await;
    assert_eq!(queued, 0, "a polling standby never queues");
    assert!(
        over * 4 <= samples,
        "standbys held connections in {over} of {samples} samples"
    );
    let reports = standbys[0].lines_with("standing by");
    assert!((2..=10).contains(&reports), "{}", standbys[0].stderr());

    let killed = kill_tree(leader.pid());
    assert!(killed.len() >= 2, "{killed:?}");
    let start_wait = Instant::now();
    loop {
        let leading: Vec<&Instance> = standbys
            .iter()
            .filter(|s| s.stderr().contains(STARTED))
            .collect();
        if !leading.is_empty() {
            assert_eq!(leading.len(), 1, "one leader at a time");
            break;
        }
        assert!(
            start_wait.elapsed() < POLL_TAKE_OVER,
            "no standby took over within {POLL_TAKE_OVER:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!(
        "a polling standby took over after {:?}",
        start_wait.elapsed()
    );
    for standby in standbys {
        kill(standby.pid(), "TERM");
        assert_eq!(standby.exit_code().await, SIGTERM_EXIT);
    }
    assert_key_free(&db, key).await;
    db.assert_no_locks().await;
}

#[tokio::test]
async fn polling_run_waiters_hold_no_connection_and_run_in_turn() {
    let db = TestDb::new("cli_standby_run_poll").await;
    let scratch = Scratch::new();
    let name = unique("poll-run");
    let key = AdvisoryKey::from_name(&name);
    let app = format!("pglock run {name}");
    let pool = db.pool(1);
    let holder = pglock::AdvisoryLock::new(&pool, key).lock().await.unwrap();
    let script = format!("echo '{STARTED}' >&2; sleep 0.1");
    let waiters: Vec<Instance> = ["a", "b"]
        .iter()
        .map(|log| {
            Instance::start(
                &[
                    "run",
                    "--wait-mode",
                    "poll",
                    &name,
                    "--",
                    "sh",
                    "-c",
                    &script,
                ],
                scratch.path(log),
            )
        })
        .collect();
    for waiter in &waiters {
        waiter
            .wait_for_line("is busy", Duration::from_secs(10))
            .await;
    }
    let (samples, over, queued) =
        sample_connections(&db, &app, key, 0, Duration::from_secs(2)).await;
    assert_eq!(queued, 0, "a polling waiter never queues");
    assert!(
        over * 4 <= samples,
        "waiters held connections in {over} of {samples} samples"
    );
    drop(holder);
    for waiter in waiters {
        waiter.wait_for_line(STARTED, POLL_TAKE_OVER * 2).await;
        assert_eq!(waiter.exit_code().await, 0);
    }
    assert_key_free(&db, key).await;
    db.assert_no_locks().await;
}
