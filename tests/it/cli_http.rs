//! `pglock run/leader --http ADDR`, read the way orchestrators and Prometheus read it: with curl
//! (Debian's package), and the metrics with `promtool check metrics` (Debian's `prometheus`
//! package), Prometheus' own parser and linter of the text format. `.ci/setup-http-tools`
//! installs both; without them these tests skip, except under CI, where they fail.
//!
//! The answers must change within the loss detection bound of pglock's session
//! (`HealthCheck::default().detection_bound()`, which the command uses) when the leadership
//! moves or the session is lost; the tests allow twice that bound, for a loaded machine.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use pglock::{AdvisoryKey, AdvisoryLock, AdvisoryLockGuard, HealthCheck};
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::cli::{assert_key_free, kill, leader_key, unique, wait_for_holder, Scratch};
use crate::harness::{database_url, TestDb};

/// Whether curl and promtool are there; if not, says so and skips, or fails under CI.
fn tools_installed() -> bool {
    let missing: Vec<&str> = ["curl", "promtool"]
        .into_iter()
        .filter(|tool| {
            std::process::Command::new(tool)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_err()
        })
        .collect();
    if missing.is_empty() {
        return true;
    }
    let why = format!(
        "{} not installed (run .ci/setup-http-tools as root to install them)",
        missing.join(" and ")
    );
    if std::env::var_os("CI").is_some() {
        panic!("{why}: .ci/run should have installed them");
    }
    eprintln!("SKIPPED: {why}");
    false
}

/// How long an answer may take to change after the session is lost or the leadership moves.
fn change_bound() -> Duration {
    HealthCheck::default().detection_bound() * 2
}

/// A `pglock` process serving `--http` on a port of its choosing, read from its stderr.
struct Served {
    child: Child,
    stderr: PathBuf,
    base: String,
}

impl Served {
    /// Starts `pglock ARGS` (which include `--http 127.0.0.1:0`) and waits until it serves.
    async fn start(args: &[&str], stderr: PathBuf) -> Self {
        let file = std::fs::File::create(&stderr).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_pglock"))
            .args(args)
            .env("DATABASE_URL", database_url())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(file))
            .kill_on_drop(true)
            .spawn()
            .expect("start pglock");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(&stderr).unwrap_or_default();
            if let Some(base) = text
                .lines()
                .find_map(|line| line.split_once(" on http://").map(|(_, addr)| addr))
            {
                let base = format!("http://{}", base.trim());
                return Served {
                    child,
                    stderr,
                    base,
                };
            }
            assert!(Instant::now() < deadline, "pglock does not serve:\n{text}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// `curl -X METHOD` of `path` (`--head` for HEAD): the status and the body.
    async fn request(&self, method: &str, path: &str) -> (u16, String) {
        let method: Vec<&str> = match method {
            "HEAD" => vec!["--head"],
            other => vec!["-X", other],
        };
        let output = Command::new("curl")
            .args(["--silent", "--show-error", "--max-time", "5"])
            .args(method)
            .args(["--output", "-", "--write-out", "\n%{http_code}"])
            .arg(format!("{}{path}", self.base))
            .output()
            .await
            .expect("run curl");
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "curl {path}: {}\n{}",
            String::from_utf8_lossy(&output.stderr),
            self.stderr()
        );
        let (body, status) = text.rsplit_once('\n').expect("curl wrote the status");
        (status.parse().expect("a status code"), body.to_owned())
    }

    async fn get(&self, path: &str) -> (u16, String) {
        self.request("GET", path).await
    }

    /// A JSON endpoint: the status and the document.
    async fn json(&self, path: &str) -> (u16, Value) {
        let (status, body) = self.get(path).await;
        let value = serde_json::from_str(&body)
            .unwrap_or_else(|error| panic!("{path} answered {body:?}: {error}"));
        (status, value)
    }

    /// `/metrics`, after `promtool check metrics` has accepted it.
    async fn metrics(&self) -> String {
        let (status, text) = self.get("/metrics").await;
        assert_eq!(status, 200, "{text}");
        promtool_accepts(&text).await;
        text
    }

    /// Polls `path` until `done` holds for its answer, within `bound`; how long that took.
    async fn until(
        &self,
        path: &str,
        bound: Duration,
        done: impl Fn(u16, &Value) -> bool,
    ) -> (Duration, Value) {
        let start = Instant::now();
        loop {
            let (status, value) = self.json(path).await;
            if done(status, &value) {
                return (start.elapsed(), value);
            }
            assert!(
                start.elapsed() < bound,
                "{path} still answers {status} {value} after {bound:?}:\n{}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(mut self) {
        kill(self.child.id().expect("running"), "TERM");
        tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .expect("pglock exits on SIGTERM")
            .unwrap();
    }
}

/// Prometheus' own parser and linter accept `text`.
async fn promtool_accepts(text: &str) {
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    let mut stdin = promtool.stdin.take().unwrap();
    stdin.write_all(text.as_bytes()).await.unwrap();
    drop(stdin);
    let output = promtool.wait_with_output().await.unwrap();
    assert!(
        output.status.success(),
        "promtool check metrics: {}{}\n--- the exposition:\n{text}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The value of the sample `series` in an exposition.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let (name, value) = line.rsplit_once(' ')?;
        (name == series).then(|| value.parse().unwrap())
    })
}

/// The Kubernetes example that docs/cli.md shows (examples/kubernetes/beat.yaml): pglock's
/// arguments up to the leadership's name, and the paths of its readiness and liveness probes.
struct Manifest {
    args: Vec<String>,
    readiness: String,
    liveness: String,
}

impl Manifest {
    fn read() -> Self {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/kubernetes/beat.yaml");
        let text = std::fs::read_to_string(&path).unwrap();
        // A YAML flow sequence of double-quoted strings is a JSON array.
        let command = text
            .lines()
            .find_map(|line| line.trim().strip_prefix("command: "))
            .expect("a command");
        let command: Vec<String> = serde_json::from_str(command).expect("a flow sequence");
        let end = command.iter().position(|arg| arg == "--").expect("--");
        assert_eq!(command[0], "pglock", "{command:?}");
        let probe_path = |probe: &str| -> String {
            let mut lines = text.lines().skip_while(|line| line.trim() != probe);
            let http_get = lines.nth(1).expect("the probe's httpGet");
            let path = http_get.split("path: ").nth(1).expect("a path");
            path.split(',').next().unwrap().trim().to_owned()
        };
        Manifest {
            args: command[1..end].to_vec(),
            readiness: probe_path("readinessProbe:"),
            liveness: probe_path("livenessProbe:"),
        }
    }

    /// The manifest's arguments with `name` for its leadership and `addr` for its address, and
    /// `command` after `--`.
    fn args(&self, name: &str, addr: &str, command: &[&str]) -> Vec<String> {
        let mut args = self.args.clone();
        let at = args.iter().position(|arg| arg == "--http").expect("--http") + 1;
        assert!(
            args[at].starts_with(':'),
            "the manifest serves on every interface: {}",
            args[at]
        );
        args[at] = addr.to_owned();
        *args.last_mut().unwrap() = name.to_owned();
        args.push("--".to_owned());
        args.extend(command.iter().map(|word| (*word).to_owned()));
        args
    }
}

#[tokio::test]
async fn leader_endpoints_follow_the_leadership() {
    if !tools_installed() {
        return;
    }
    let db = TestDb::new("cli_http_leader").await;
    let name = unique("http-leader");
    let key = leader_key(&name);
    let scratch = Scratch::new();
    // As the example manifest runs it, with the probes it sets.
    let manifest = Manifest::read();
    let args = manifest.args(&name, "127.0.0.1:0", &["sleep", "60"]);
    assert_eq!(args[0], "leader");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ready, live) = (manifest.readiness.as_str(), manifest.liveness.as_str());
    let first = Served::start(&args, scratch.path("first")).await;
    let first_pid = wait_for_holder(&db, key).await;
    let second = Served::start(&args, scratch.path("second")).await;

    // The leader: ready (200) with its term and backend, and alive.
    let (_, leading) = first
        .until(ready, Duration::from_secs(10), |status, _| status == 200)
        .await;
    assert_eq!(leading["name"], name.as_str());
    assert_eq!(leading["leader"], true);
    assert_eq!(leading["backend_pid"], first_pid);
    assert!(leading["since"].as_str().unwrap().ends_with('Z'));
    let first_term = leading["term"].as_i64().expect("a term");
    let (status, health) = first.json(live).await;
    assert_eq!((status, &health["state"]), (200, &Value::from("leading")));

    // The standby: not ready (503), naming the leader's backend, and alive.
    let (_, standing_by) = second
        .until(ready, Duration::from_secs(10), |_, value| {
            value["state"] == "standing_by"
        })
        .await;
    let (status, _) = second.get(ready).await;
    assert_eq!(status, 503);
    assert_eq!(standing_by["leader"], false);
    assert!(
        standing_by["led_by"]
            .as_str()
            .unwrap()
            .contains(&format!("pid {first_pid} ")),
        "{standing_by}"
    );
    let (status, health) = second.json(live).await;
    assert_eq!((status, health["healthy"].as_bool()), (200, Some(true)));

    let metrics = first.metrics().await;
    let leader_series = format!("pglock_leader{{name=\"{name}\"}}");
    assert_eq!(sample(&metrics, &leader_series), Some(1.0), "{metrics}");
    let term_series = format!("pglock_leader_term{{name=\"{name}\"}}");
    assert_eq!(sample(&metrics, &term_series), Some(first_term as f64));
    assert_eq!(sample(&metrics, "pglock_locks_held"), Some(1.0));
    let metrics = second.metrics().await;
    assert_eq!(sample(&metrics, "pglock_locks_waiting"), Some(1.0));

    // What is not served.
    assert_eq!(first.get("/nothing-here").await.0, 404);
    assert_eq!(first.request("POST", "/leader").await.0, 405);

    // The leader's session ends: the leadership moves within the bound, and both instances
    // say so.
    db.terminate(first_pid).await;
    let bound = change_bound();
    let (moved_after, now_leading) = second.until(ready, bound, |status, _| status == 200).await;
    assert!(now_leading["term"].as_i64().unwrap() > first_term);
    let (demoted_after, _) = first
        .until(ready, bound, |status, value| {
            status == 503 && value["leader"] == false
        })
        .await;
    eprintln!(
        "after pg_terminate_backend: the standby answered 200 within {moved_after:?}, the old \
         leader 503 within {demoted_after:?} (bound {bound:?})"
    );
    let metrics = first.metrics().await;
    assert_eq!(sample(&metrics, &leader_series), Some(0.0), "{metrics}");
    assert!(
        metrics.contains("\npglock_lock_losses_total{reason=\""),
        "{metrics}"
    );

    first.stop().await;
    second.stop().await;
    assert_key_free(&db, key).await;
    db.assert_no_locks().await;
}

#[tokio::test]
async fn run_health_follows_the_session() {
    if !tools_installed() {
        return;
    }
    let db = TestDb::new("cli_http_run").await;
    let name = unique("http-run");
    let key = AdvisoryKey::from_name(&name);
    let scratch = Scratch::new();
    // The test holds the lock first, so that pglock waits.
    let held = AdvisoryLock::new(db.session().await, key)
        .lock()
        .await
        .unwrap();
    // A command that ignores SIGTERM, so that pglock stays, unhealthy, after the loss.
    let served = Served::start(
        &[
            "run",
            "--http",
            "127.0.0.1:0",
            "--kill-after",
            "60s",
            &name,
            "--",
            "sh",
            "-c",
            "trap '' TERM; while :; do sleep 0.1; done",
        ],
        scratch.path("run"),
    )
    .await;
    let (_, waiting) = served
        .until("/healthz", Duration::from_secs(10), |status, value| {
            status == 200 && value["state"] == "waiting"
        })
        .await;
    assert_eq!(waiting["healthy"], true);
    assert_eq!(served.get("/leader").await.0, 404, "no /leader for run");
    served.metrics().await;

    AdvisoryLockGuard::unlock(held).await.unwrap();
    let (_, holding) = served
        .until("/healthz", Duration::from_secs(10), |status, value| {
            status == 200 && value["state"] == "holding"
        })
        .await;
    let backend_pid = wait_for_holder(&db, key).await;
    assert_eq!(holding["backend_pid"], backend_pid);
    let (status, head) = served.request("HEAD", "/healthz").await;
    assert_eq!(status, 200);
    assert!(head.contains("content-type: application/json"), "{head}");

    // The session is lost: 503 within the bound, for as long as pglock stays.
    db.terminate(backend_pid).await;
    let bound = change_bound();
    let (lost_after, lost) = served
        .until("/healthz", bound, |status, _| status == 503)
        .await;
    eprintln!(
        "after pg_terminate_backend: /healthz answered 503 within {lost_after:?} (bound {bound:?})"
    );
    assert_eq!(lost["healthy"], false);
    assert_eq!(lost["state"], "lost");
    assert!(!lost["reason"].as_str().unwrap().is_empty());
    let start = Instant::now();
    loop {
        let metrics = served.metrics().await;
        if metrics.contains("\npglock_lock_losses_total{reason=\"") {
            break;
        }
        assert!(start.elapsed() < bound, "no loss counted:\n{metrics}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(served.json("/healthz").await.0, 503, "still lost");

    // SIGKILL: the command, which ignores SIGTERM, dies with pglock (its parent-death signal).
    let mut child = served.child;
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    assert_key_free(&db, key).await;
    db.assert_no_locks().await;
}
