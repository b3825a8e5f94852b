//! `pglock run NAME -- COMMAND`: take the lock, run the command, release, exit with its status.

use pglock::{AdvisoryLock, AdvisoryLockGuard, Error, LockMode};
use tokio::time::Instant;

use crate::child::{self, ChildOptions, Running, Signals};
use crate::connect::{connect, AppName, Connection};
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
        "holding lock {} (key {}, {mode:?}) on backend pid {}",
        target.label,
        target.key,
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
    let outcome = supervise(&mut running, &connection, &mut signals, out).await;
    match outcome {
        Outcome::Exited(code) => {
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
        Outcome::Lost(status) => {
            out.error(format_args!(
                "lost lock {} while the command ran (the database session ended): stopped \
                 the command ({})",
                target.label, status
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
    /// On its own (or after a forwarded signal), with this exit code.
    Exited(i32),
    /// The lock was lost and pglock stopped it; how it ended.
    Lost(String),
    /// Waiting for it failed.
    WaitFailed(std::io::Error),
}

/// Runs until the command exits, forwarding signals, and stops it if the connection holding
/// the lock ends.
pub async fn supervise(
    running: &mut Running,
    connection: &Connection,
    signals: &mut Signals,
    out: &Output,
) -> Outcome {
    loop {
        tokio::select! {
            status = running.wait() => {
                return match status {
                    Ok(status) => Outcome::Exited(child::exit_code(status)),
                    Err(error) => Outcome::WaitFailed(error),
                };
            }
            signal = signals.recv() => {
                if running.forward(signal) {
                    out.verbose(format_args!(
                        "forwarded {} to the command",
                        signal_name(signal)
                    ));
                }
            }
            _ = connection.closed() => {
                return Outcome::Lost(match running.stop().await {
                    Ok(status) => describe_status(status),
                    Err(error) => format!("could not wait for it: {error}"),
                });
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
        (
            "PGLOCK_MODE",
            match mode {
                LockMode::Exclusive => "exclusive",
                LockMode::Shared => "shared",
            }
            .to_owned(),
        ),
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
        Error::Connect { .. } => exit::CANNOT_CONNECT,
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
