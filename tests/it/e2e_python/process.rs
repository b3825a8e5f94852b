//! The processes of an end-to-end test: their output as timestamped lines, their process
//! trees, their CPU time, and a cleanup that leaves none of them behind.

use std::fmt;
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt as _, AsyncRead, BufReader};
use tokio::process::{Child, Command};

/// Every line a process wrote, stdout and stderr interleaved, with when the test read it.
type Lines = Arc<Mutex<Vec<(Instant, String)>>>;

/// A started process whose output is being read; its whole tree is killed on drop.
pub struct Process {
    pub label: String,
    child: Child,
    pid: u32,
    lines: Lines,
    readers: Vec<tokio::task::JoinHandle<()>>,
}

impl Process {
    /// Starts `command` (stdout and stderr piped).
    pub fn spawn(label: impl Into<String>, mut command: Command) -> Process {
        let label = label.into();
        let mut child = command
            .spawn()
            .unwrap_or_else(|error| panic!("start {label}: {error}"));
        let pid = child.id().expect("a running child has a pid");
        let lines = Lines::default();
        let mut readers = Vec::new();
        if let Some(stdout) = child.stdout.take() {
            readers.push(tokio::spawn(read_lines(stdout, lines.clone())));
        }
        if let Some(stderr) = child.stderr.take() {
            readers.push(tokio::spawn(read_lines(stderr, lines.clone())));
        }
        Process {
            label,
            child,
            pid,
            lines,
            readers,
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The lines so far.
    pub fn lines(&self) -> Vec<(Instant, String)> {
        self.lines.lock().unwrap().clone()
    }

    /// The lines so far that contain `text`.
    pub fn lines_with(&self, text: &str) -> Vec<(Instant, String)> {
        let mut lines = self.lines();
        lines.retain(|(_, line)| line.contains(text));
        lines
    }

    /// The output so far, for failure messages: its first and last lines, if it is long (a
    /// process that writes in a loop must not bury the failure).
    pub fn output(&self) -> String {
        const HEAD: usize = 20;
        const TAIL: usize = 40;
        let lines = self.lines();
        let mut text = String::new();
        for (index, (_, line)) in lines.iter().enumerate() {
            if index == HEAD && lines.len() > HEAD + TAIL {
                text.push_str(&format!(
                    "  [... {} lines ...]\n",
                    lines.len() - HEAD - TAIL
                ));
            }
            if index < HEAD || index + TAIL >= lines.len() {
                text.push_str(&format!("  {line}\n"));
            }
        }
        text
    }

    /// Waits until the process exits, at most `within`, and until its output is read.
    pub async fn exit(&mut self, within: Duration) -> ExitStatus {
        let status = tokio::time::timeout(within, self.child.wait())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{} still runs after {within:?}; its output:\n{}",
                    self.label,
                    self.output()
                )
            })
            .expect("wait for the child");
        for reader in self.readers.drain(..) {
            // A grandchild that kept the pipe open would keep the reader waiting; our own
            // processes close it when they exit.
            let _ = tokio::time::timeout(Duration::from_secs(5), reader).await;
        }
        status
    }

    /// The process and all its descendants, the process first.
    pub fn tree(&self) -> Vec<u32> {
        let mut tree = vec![self.pid];
        tree.extend(descendants(self.pid));
        tree
    }

    /// Sends `signal` to the process only.
    pub fn signal(&self, signal: &str) {
        send(signal, &[self.pid.to_string()]);
    }

    /// SIGKILLs the whole tree at once: the process, its descendants, and the process groups
    /// that any of them lead (pglock's command leads one), so that nothing of it goes on.
    pub fn kill_tree(&self) {
        let tree = self.tree();
        let mut targets: Vec<String> = tree.iter().map(u32::to_string).collect();
        let own_group = process_group(std::process::id());
        for pid in &tree {
            if let Some(group) = process_group(*pid).filter(|g| Some(*g) != own_group) {
                targets.push(format!("-{group}"));
            }
        }
        targets.sort();
        targets.dedup();
        send("KILL", &targets);
    }
}

impl fmt::Debug for Process {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (pid {}):\n{}", self.label, self.pid, self.output())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.kill_tree();
        }
    }
}

async fn read_lines(stream: impl AsyncRead + Unpin, lines: Lines) {
    let mut reader = BufReader::new(stream).lines();
    while let Ok(Some(line)) = reader.next_line().await {
        lines.lock().unwrap().push((Instant::now(), line));
    }
}

/// `kill -s SIGNAL -- TARGETS` (pids, and `-PGID` for process groups); targets already gone
/// are no error.
fn send(signal: &str, targets: &[String]) {
    let _ = std::process::Command::new("kill")
        .args(["-s", signal, "--"])
        .args(targets)
        .stderr(std::process::Stdio::null())
        .status();
}

/// The fields of `/proc/PID/stat` after the command name (field 3, the state, first).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(") ")?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

fn process_group(pid: u32) -> Option<u32> {
    stat_fields(pid)?.get(2)?.parse().ok()
}

/// Whether `pid` runs (a zombie, dead but not yet reaped, does not count).
pub fn alive(pid: u32) -> bool {
    stat_fields(pid).is_some_and(|fields| fields[0] != "Z")
}

/// The children of `pid` that are alive, from `/proc`.
pub fn children(pid: u32) -> Vec<u32> {
    let tree = descendants(pid);
    tree.into_iter()
        .filter(|child| {
            stat_fields(*child).and_then(|f| f.get(1)?.parse::<u32>().ok()) == Some(pid)
        })
        .collect()
}

/// All descendants of `pid` that are alive, from `/proc`.
pub fn descendants(pid: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
                .filter_map(|child| {
                    let fields = stat_fields(child)?;
                    (fields[0] != "Z").then_some((child, fields.get(1)?.parse().ok()?))
                })
                .collect()
        })
        .unwrap_or_default();
    let mut found = Vec::new();
    let mut frontier = vec![pid];
    while let Some(parent) = frontier.pop() {
        for &(child, _) in parents.iter().filter(|(_, p)| *p == parent) {
            found.push(child);
            frontier.push(child);
        }
    }
    found
}

/// The CPU time (user + system) `pid` has used so far.
pub fn cpu_time(pid: u32) -> Duration {
    let fields = stat_fields(pid).unwrap_or_else(|| panic!("process {pid} is gone"));
    // utime and stime are fields 14 and 15, in clock ticks; Linux reports them at 100 a second
    // (USER_HZ) whatever the kernel's own tick rate.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}
