//! `pglock leader NAME -- COMMAND`: run the command only while this instance leads.

use std::time::Duration;

use pglock::{Error, LeaderElection, Leadership};
use tokio::time::Instant;

use crate::child::{self, Signals};
use crate::connect::{connect, pool, AppName};
use crate::format::{human_duration, signal_name};
use crate::run::{report_error, supervise, with_causes, Outcome};
use crate::wait::{Monitor, Progress, Reports};
use crate::{exit, Global, LeaderArgs, Output, Restart};

pub async fn leader(global: &Global, args: LeaderArgs, out: &Output) -> i32 {
    let url = match global.database_url() {
        Ok(url) => url,
        Err(code) => return code,
    };
    let name = args.name.clone();
    let default_app = pglock::introspect::application_name("leader", &name);
    let app = match &args.child.application_name {
        Some(app) => AppName::Forced(app),
        None => AppName::Default(&default_app),
    };
    let mut signals = match Signals::install() {
        Ok(signals) => signals,
        Err(error) => {
            out.error(format_args!("cannot install signal handlers: {error}"));
            return exit::SOFTWARE;
        }
    };
    // Fail fast on a wrong URL or password; later connection failures are retried.
    tokio::select! {
        checked = connect(&url, app) => if let Err(error) = checked {
            return report_error(out, &error);
        },
        signal = signals.recv() => return exit::SIGNAL_BASE + signal,
    }
    let pool = match pool(&url, app) {
        Ok(pool) => pool,
        Err(error) => return report_error(out, &error),
    };
    // pglock's connections have TCP keepalives and a user timeout (see `connect`), which end a
    // dead connection while a standby waits: the standby can keep its place in the queue.
    let mut election = LeaderElection::new(&pool, name.as_str())
        .identity(identity())
        .queue_round(None);
    if let Some(table) = &args.term_table {
        election = election.term_table(table.clone());
    }
    let monitor_app = pglock::introspect::application_name("monitor", &name);
    let label = format!("leadership {name}");
    let progress = Progress {
        out,
        url: &url,
        label: &label,
        monitor_app: &monitor_app,
        every: args.child.progress_every,
    };
    let mut monitor = Monitor::new(&progress);
    let mut pause = args.restart_delay;
    loop {
        // Campaign, reporting who leads meanwhile. The campaign is one future for the whole
        // wait: dropping it would leave the server's lock queue, and a new one would join at
        // its end.
        let started = Instant::now();
        let campaign = election.campaign();
        let mut campaign = std::pin::pin!(campaign);
        let mut reports = Reports::new(
            started + Duration::from_millis(500),
            args.child.progress_every,
        );
        let leadership = loop {
            tokio::select! {
                result = &mut campaign => break result,
                signal = signals.recv() => {
                    out.info(format_args!(
                        "{} while campaigning for {name}: giving up",
                        signal_name(signal)
                    ));
                    return exit::SIGNAL_BASE + signal;
                }
                () = reports.due(), if !out.quiet => {
                    monitor
                        .report_leader(election.lock_key(), started)
                        .await;
                    reports.done();
                }
            }
        };
        let leadership = match leadership {
            Ok(leadership) => leadership,
            Err(error) if permanent(&error) => return report_error(out, &error),
            Err(error) => {
                out.info(format_args!(
                    "campaign for {name} failed: {}; retrying in {}",
                    with_causes(&error),
                    human_duration(pause)
                ));
                if let Some(code) = pause_or_signal(&mut signals, pause).await {
                    return code;
                }
                pause = (pause * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        pause = args.restart_delay;
        let term = leadership.term();
        out.info(format_args!(
            "leading {name} in term {term} (backend pid {}) after {}",
            leadership.backend_pid(),
            human_duration(started.elapsed())
        ));
        match lead(leadership, &args, &mut signals, out).await {
            Led::Exited { code, stopping } => {
                let restart = match args.restart {
                    Restart::Always => true,
                    Restart::OnFailure => code != exit::OK,
                    Restart::Never => false,
                };
                if stopping || !restart {
                    return code;
                }
                out.info(format_args!(
                    "the command exited with {code} in term {term}; campaigning again in {}",
                    human_duration(args.restart_delay)
                ));
                if let Some(code) = pause_or_signal(&mut signals, args.restart_delay).await {
                    return code;
                }
            }
            Led::Lost => {
                if args.restart == Restart::Never {
                    return exit::LOCK_LOST;
                }
                out.info(format_args!("campaigning again for {name}"));
            }
            Led::Failed(code) => return code,
        }
    }
}

/// How one term ended.
enum Led {
    /// The command exited (on its own, or after a forwarded signal: `stopping`).
    Exited { code: i32, stopping: bool },
    /// The leadership was lost; the command was stopped.
    Lost,
    /// The command could not run; exit with this code.
    Failed(i32),
}

/// Runs the command for one term.
async fn lead(
    leadership: Leadership,
    args: &LeaderArgs,
    signals: &mut Signals,
    out: &Output,
) -> Led {
    let term = leadership.term();
    let env = vec![
        ("PGLOCK_NAME", args.name.clone()),
        ("PGLOCK_TERM", term.to_string()),
        (
            "PGLOCK_KEY",
            crate::format::key_arg(pglock::AdvisoryKey::from_name(&format!(
                "leader:{}",
                args.name
            ))),
        ),
    ];
    let mut running = match child::spawn(&args.command, &env, &args.child.options()) {
        Ok(running) => running,
        Err((code, message)) => {
            out.error(format_args!("{message}"));
            let _ = leadership.step_down().await;
            return Led::Failed(code);
        }
    };
    out.verbose(format_args!("started pid {} in term {term}", running.pid()));
    let mut loss = leadership.loss_signal();
    let lost = async move { loss.lost().await.to_string() };
    match supervise(&mut running, lost, signals, out).await {
        Outcome::Exited { code, stopping } => {
            // Step down at once, so that a standby takes over without waiting for a timeout.
            let _ = leadership.step_down().await;
            Led::Exited { code, stopping }
        }
        Outcome::Lost { reason, stopped } => {
            out.error(format_args!(
                "lost the leadership of {} (term {term}): {reason}; stopped the command ({stopped})",
                args.name
            ));
            drop(leadership);
            Led::Lost
        }
        Outcome::WaitFailed(error) => {
            out.error(format_args!("cannot wait for the command: {error}"));
            let _ = leadership.step_down().await;
            Led::Failed(exit::SOFTWARE)
        }
    }
}

/// Sleeps `pause`; a signal meanwhile ends pglock with 128 + N.
async fn pause_or_signal(signals: &mut Signals, pause: Duration) -> Option<i32> {
    tokio::select! {
        _ = tokio::time::sleep(pause) => None,
        signal = signals.recv() => Some(exit::SIGNAL_BASE + signal),
    }
}

/// Errors that campaigning again cannot fix.
fn permanent(error: &Error) -> bool {
    matches!(
        error,
        Error::Config(_) | Error::TermTable { .. } | Error::ReadOnlyStandby | Error::Tls { .. }
    )
}

/// What this instance records as the leader in the term table: `host pid N`.
fn identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown-host".to_owned());
    format!("{host} pid {}", std::process::id())
}
