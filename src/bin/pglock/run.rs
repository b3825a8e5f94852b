//! `pglock run NAME -- COMMAND`: take the lock, run the command, release, exit with its status.

use std::future::Future;

use pglock::{AdvisoryLock, AdvisoryLockGuard, Error, LockMode};
use tokio::time::Instant;

use crate::child::{self, ChildOptions, Running, Signals};
use crate::connect::{connect, AppName};
use crate::format::{human_duration, key_arg, signal_name};
use crate::wait::{acquire, Patience, Progress};
use crate::{exit, Global, Output, Resolved, RunArgs};

pub async fn run(global: &Global, args: RunArgs, out: &Output) -> i32 {
    let url = match global.database_url() {
        Ok(url) => url,
        Err(code) => return code,
    };
    let target = args.target.resolve();
    let default_app = pglock::introspect::application_name("run", &target.label);
    let app = match &args.child.application_name {
        Some(name) => AppName::Forced(name),
        None => AppName::Default(&default_app),
    };
    let mut signals = match Signals::install() {
        Ok(signals) => signals,
        Err(error) => {
            out.error(format_args!("cannot install signal handlers: {error}"));
            return exit::SOFTWARE;
        }
    };
    let connection = tokio::select! {
        connected = connect(&url, app) => match connected {
            Ok(connection) => connection,
            Err(error) => return report_error(out, &error),
        },
        signal = signals.recv() => return exit::SIGNAL_BASE + signal,
    };
    out.verbose(format_args!("connected to {}", pglock::redact_url(&url)));
    let mode = if args.shared {
        LockMode::Shared
    } else {
        LockMode::Exclusive
    };
    let patience = match (args.nonblock, args.timeout) {
        (true, _) => Patience::NoWait,
        (false, Some(timeout)) if timeout.is_zero() => Patience::NoWait,
        (false, Some(timeout)) => Patience::Until(Instant::now() + timeout),
        (false, None) => Patience::Forever,
    };
    let lock = AdvisoryLock::new(connection.session.clone(), target.key);
    let monitor_app = pglock::introspect::application_name("monitor", &target.label);
    let progress = Progress {
        out,
        url: &url,
        label: &target.label,
        monitor_app: &monitor_app,
        every: args.child.progress_every,
    };
    let guard = tokio::select! {
        acquired = acquire(&lock, mode, patience, &progress) => match acquired {
            Ok(Some(guard)) => guard,
            Ok(None) => return i32::from(args.conflict_exit_code),
            Err(error) => return report_error(out, &error),
        },
        signal = signals.recv() => {
            out.info(format_args!(
                "{} while waiting for lock {}: giving up",
                signal_name(signal),
                target.label
            ));
            connection.abandon_wait().await;
            return exit::SIGNAL_BASE + signal;
        }
    };
    out.verbose(format_args!(
        "holding lock {} (key {}, {}) on backend pid {}",
        target.label,
        target.key,
        mode_name(mode),
        AdvisoryLockGuard::backend_pid(&guard)
    ));
    let env = child_env(&target, mode);
    let mut running = match child::spawn(&args.command, &env, &args.child.options()) {
        Ok(running) => running,
        Err((code, message)) => {
            out.error(format_args!("{message}"));
            let _ = AdvisoryLockGuard::unlock(guard).await;
            return code;
        }
    };
    let started = Instant::now();
    out.verbose(format_args!("started pid {}", running.pid()));
    // pglock's loss detection probes the lock (a dead network path is noticed within its
    // detection bound); the connection task's end reports a closed connection at once.
    let mut loss = AdvisoryLockGuard::loss_signal(&guard);
    let lost = async {
        tokio::select! {
            reason = loss.lost() => reason.to_string(),
            () = connection.closed() => {
                "the database session holding it ended (the server closed the connection)"
                    .to_owned()
            }
        }
    };
    let outcome = supervise(&mut running, lost, &mut signals, out).await;
    match outcome {
        Outcome::Exited { code, .. } => {
            out.verbose(format_args!(
                "command exited with {code} after {}",
                human_duration(started.elapsed())
            ));
            match AdvisoryLockGuard::unlock(guard).await {
                Ok(()) => code,
                Err(error) => {
                    out.error(format_args!(
                        "the command finished (status {code}) but the lock was not held to \
                         the end: {error}"
                    ));
                    exit::LOCK_LOST
                }
            }
        }
        Outcome::Lost { reason, stopped } => {
            out.error(format_args!(
                "lost lock {} while the command ran: {reason}; stopped the command ({stopped})",
                target.label
            ));
            drop(guard);
            exit::LOCK_LOST
        }
        Outcome::WaitFailed(error) => {
            out.error(format_args!("cannot wait for the command: {error}"));
            drop(guard);
            exit::SOFTWARE
        }
    }
}

/// How the supervised command ended.
pub enum Outcome {
    /// On its own, or after a forwarded signal, with this exit code. `stopping` when pglock
    /// was asked to stop (SIGINT, SIGTERM or SIGQUIT forwarded) meanwhile.
    Exited { code: i32, stopping: bool },
    /// The lock was lost (for `reason`) and pglock stopped the command (as `stopped` says).
    Lost { reason: String, stopped: String },
    /// Waiting for it failed.
    WaitFailed(std::io::Error),
}

/// Runs until the command exits, forwarding signals, and stops it when `lost` resolves (with
/// the reason the lock was lost).
pub async fn supervise(
    running: &mut Running,
    lost: impl Future<Output = String>,
    signals: &mut Signals,
    out: &Output,
) -> Outcome {
    let mut lost = std::pin::pin!(lost);
    let mut stopping = false;
    loop {
        tokio::select! {
            status = running.wait() => {
                return match status {
                    Ok(status) => Outcome::Exited { code: child::exit_code(status), stopping },
                    Err(error) => Outcome::WaitFailed(error),
                };
            }
            signal = signals.recv() => {
                stopping |= matches!(signal, libc::SIGINT | libc::SIGTERM | libc::SIGQUIT);
                if running.forward(signal) {
                    out.verbose(format_args!(
                        "forwarded {} to the command",
                        signal_name(signal)
                    ));
                }
            }
            reason = &mut lost => {
                out.error(format_args!(
                    "the lock is lost: stopping the command ({} now, SIGKILL after {})",
                    signal_name(running.stop_signal()),
                    human_duration(running.kill_after())
                ));
                let stopped = match running.stop().await {
                    Ok(status) => describe_status(status),
                    Err(error) => format!("could not wait for it: {error}"),
                };
                return Outcome::Lost { reason, stopped };
            }
        }
    }
}

fn describe_status(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("it exited with status {code}"),
        (None, Some(signal)) => format!("it died of {}", signal_name(signal)),
        _ => status.to_string(),
    }
}

/// The environment the command gets on top of pglock's.
pub fn child_env(target: &Resolved, mode: LockMode) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("PGLOCK_KEY", key_arg(target.key)),
        ("PGLOCK_MODE", mode_name(mode).to_owned()),
    ];
    if let Some(name) = &target.name {
        env.push(("PGLOCK_NAME", name.clone()));
    }
    env
}

/// Prints `error` and returns the exit code that classifies it.
pub fn report_error(out: &Output, error: &Error) -> i32 {
    out.error(format_args!("{}", with_causes(error)));
    match error {
        Error::Connect { .. } | Error::Tls { .. } => exit::CANNOT_CONNECT,
        Error::Config(_) => exit::USAGE,
        _ => exit::SOFTWARE,
    }
}

impl crate::ChildArgs {
    pub fn options(&self) -> ChildOptions {
        ChildOptions {
            foreground: self.foreground,
            stop_signal: self.stop_signal,
            kill_after: self.kill_after,
        }
    }
}

/// `error` followed by the causes its message does not already include ("error connecting to
/// server: Connection refused (os error 111)").
pub fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// `exclusive` or `shared`.
pub fn mode_name(mode: LockMode) -> &'static str {
    match mode {
        LockMode::Exclusive => "exclusive",
        LockMode::Shared => "shared",
    }
}
