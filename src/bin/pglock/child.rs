//! The command pglock runs: spawning it, forwarding signals to it, stopping it.
//!
//! The child gets a process group of its own (unless `--foreground`), so that a forwarded
//! signal, and the stop when the lock is lost, reach every process the command started (the
//! script behind `sh -c`, its workers), each exactly once: a terminal's Ctrl-C reaches pglock
//! only, and pglock passes it on. With `--foreground` the child stays in pglock's group, and so
//! in the terminal's foreground, for interactive commands: the terminal then delivers SIGINT,
//! SIGQUIT and SIGHUP to the child itself, and pglock forwards only the other signals.
//!
//! On Linux the child is also killed (SIGKILL) if pglock dies without stopping it (say
//! `kill -9` or the OOM killer): pglock's connection, and with it the lock, are gone then, and
//! the command must not go on unprotected. This covers the child itself, not processes it
//! started in turn.

use std::ffi::OsString;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::exit;

/// The signals pglock forwards to the command.
pub const FORWARDED: [i32; 6] = [
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

/// The signals a terminal sends to its whole foreground process group.
const FROM_TERMINAL: [i32; 3] = [libc::SIGINT, libc::SIGQUIT, libc::SIGHUP];

/// How the child runs and stops.
#[derive(Clone, Debug)]
pub struct ChildOptions {
    /// Keep the child in pglock's process group (for interactive commands).
    pub foreground: bool,
    /// The signal that asks the child to stop when the lock is lost.
    pub stop_signal: i32,
    /// How long the child has to exit after `stop_signal` before SIGKILL.
    pub kill_after: Duration,
}

impl From<&crate::args::ChildArgs> for ChildOptions {
    fn from(args: &crate::args::ChildArgs) -> Self {
        ChildOptions {
            foreground: args.foreground,
            stop_signal: args.stop_signal,
            kill_after: args.kill_after,
        }
    }
}

/// A running command.
pub struct Running {
    child: Child,
    pid: i32,
    options: ChildOptions,
}

/// Spawns `command` with `env` added to pglock's environment.
///
/// # Errors
///
/// The exit code to report when the command cannot be started (126, 127), with a message.
pub fn spawn(
    command: &[OsString],
    env: &[(&str, String)],
    options: &ChildOptions,
) -> Result<Running, (i32, String)> {
    let (program, args) = command
        .split_first()
        .ok_or((exit::USAGE, "no command given after --".to_owned()))?;
    let mut cmd = Command::new(program);
    cmd.args(args);
    for (name, value) in env {
        cmd.env(name, value);
    }
    if !options.foreground {
        cmd.process_group(0);
    }
    die_with_parent(&mut cmd);
    match cmd.spawn() {
        Ok(child) => {
            let pid = child.id().expect("a child that was just spawned has a pid") as i32;
            Ok(Running {
                child,
                pid,
                options: options.clone(),
            })
        }
        Err(error) => {
            let program = program.to_string_lossy();
            Err(match error.kind() {
                io::ErrorKind::NotFound => {
                    (exit::NOT_FOUND, format!("command not found: {program}"))
                }
                _ => (
                    exit::CANNOT_EXECUTE,
                    format!("cannot execute {program}: {error}"),
                ),
            })
        }
    }
}

#[cfg(target_os = "linux")]
fn die_with_parent(cmd: &mut Command) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: prctl, getppid and _exit are async-signal-safe, and the closure touches no
    // memory but its captured integer: allowed between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // pglock died between fork and prctl: the signal will never come, so stop now.
            if libc::getppid() != parent {
                libc::_exit(exit::LOCK_LOST);
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_cmd: &mut Command) {}

/// Sends `signal` to `pid` (a process group when negative).
fn kill(pid: i32, signal: i32) -> io::Result<()> {
    // SAFETY: kill(2) has no memory-safety preconditions.
    if unsafe { libc::kill(pid, signal) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl Running {
    /// The child's pid.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The signal [`stop`](Self::stop) sends first.
    pub fn stop_signal(&self) -> i32 {
        self.options.stop_signal
    }

    /// How long [`stop`](Self::stop) waits before SIGKILL.
    pub fn kill_after(&self) -> Duration {
        self.options.kill_after
    }

    /// Waits for the child to exit.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe (tokio's `Child::wait`).
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        self.child.wait().await
    }

    /// Passes a signal pglock received on to the command. Returns whether it was sent.
    pub fn forward(&self, signal: i32) -> bool {
        if self.options.foreground && FROM_TERMINAL.contains(&signal) {
            // The terminal delivered it to the child already (same process group).
            return false;
        }
        self.signal(signal);
        true
    }

    fn signal(&self, signal: i32) {
        let target = if self.options.foreground {
            self.pid
        } else {
            -self.pid
        };
        // ESRCH: everyone exited already. Nothing else can fail for our own child.
        let _ = kill(target, signal);
    }

    /// Stops the child: the stop signal, then SIGKILL after the grace period. Afterwards any
    /// process left in the child's group is killed too.
    pub async fn stop(&mut self) -> io::Result<ExitStatus> {
        self.signal(self.options.stop_signal);
        let status = match tokio::time::timeout(self.options.kill_after, self.child.wait()).await {
            Ok(status) => status,
            Err(_) => {
                self.signal(libc::SIGKILL);
                self.child.wait().await
            }
        };
        if !self.options.foreground {
            // The group outlives its leader while members remain; its id is not reused then.
            let _ = kill(-self.pid, libc::SIGKILL);
        }
        status
    }
}

/// The exit code that reports `status`: the code, or 128 + the signal that ended the child.
pub fn exit_code(status: ExitStatus) -> i32 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(signal)) => exit::SIGNAL_BASE + signal,
        (None, None) => exit::SOFTWARE,
    }
}

/// The signals pglock handles while it runs, forwards or not.
pub struct Signals {
    streams: Vec<(i32, Signal)>,
}

impl Signals {
    /// Installs the handlers. From now on these signals no longer end pglock by default.
    pub fn install() -> io::Result<Self> {
        let streams = FORWARDED
            .iter()
            .map(|&number| Ok((number, signal(SignalKind::from_raw(number))?)))
            .collect::<io::Result<_>>()?;
        Ok(Signals { streams })
    }

    /// The next signal received.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: a signal that arrives after cancellation is kept for the next call.
    pub async fn recv(&mut self) -> i32 {
        std::future::poll_fn(|cx| {
            for (number, stream) in &mut self.streams {
                if stream.poll_recv(cx).is_ready() {
                    return std::task::Poll::Ready(*number);
                }
            }
            std::task::Poll::Pending
        })
        .await
    }
}
