//! `pglock leader NAME -- COMMAND`: run the command only while this instance leads.

use std::ops::ControlFlow;
use std::time::Duration;

use pglock::{AdvisoryKey, Error, LeaderElection, Leadership};
use tokio::time::Instant;

use crate::args::{LeaderArgs, Restart};
use crate::child::{self, ChildOptions, Signals};
use crate::connect::{jitter, Database, Refusals};
use crate::exit;
use crate::format::{human_duration, key_arg};
use crate::http::{Role, State};
use crate::instance::Instance;
use crate::output::{with_causes, Output};
use crate::standby::{stand_by, StoodBy};
use crate::supervise::{supervise, Outcome};

/// The longest pause between two failed campaigns.
const LONGEST_RETRY: Duration = Duration::from_secs(30);

pub async fn leader(db: &Database, args: LeaderArgs, out: &Output) -> i32 {
    let name = args.name.clone();
    let role = Role::Leader { name: name.clone() };
    let Instance {
        session_name,
        state,
        mut signals,
    } = match Instance::start("leader", &name, args.serve.http, role, out).await {
        Ok(instance) => instance,
        Err(code) => return code,
    };
    let app = session_name.app(args.session.application_name.as_deref());
    let pool = match db.pool(app) {
        Ok(pool) => pool,
        Err(error) => return out.report_error(&error),
    };
    // pglock's connections have TCP keepalives and a user timeout (see `connect`), which end a
    // dead connection while a standby waits: the standby can keep its place in the queue.
    let mut election = LeaderElection::new(&pool, name.as_str())
        .identity(identity())
        .queue_round(None);
    if let Some(table) = &args.term_table {
        election = election.term_table(table.clone());
    }
    let mut refusals = Refusals::default();
    let mut pause = args.restart_delay;
    // Connection failures at the start are waited out within the connect timeout, as `pglock
    // run` does; once the first campaign has reached the server, a standby retries forever.
    let mut give_up = Some(Instant::now() + db.connect_timeout);
    loop {
        let started = Instant::now();
        let stood_by = stand_by(
            &election,
            &pool,
            args.session.wait_mode,
            args.session.progress_every,
            &mut signals,
            &state,
            out,
        )
        .await;
        let leadership = match stood_by {
            Ok(StoodBy::Leading(leadership)) => *leadership,
            Ok(StoodBy::Interrupted(signal)) => return exit::SIGNAL_BASE + signal,
            Err(error) if permanent(&error) => return out.report_error(&error),
            Err(error) => {
                let retry = if error.is_transient() {
                    Retry::Refused(&mut refusals, &mut give_up)
                } else {
                    Retry::Failed(&mut pause)
                };
                match after_failed_campaign(&error, retry, &name, &mut signals, &state, out).await {
                    ControlFlow::Continue(()) => continue,
                    ControlFlow::Break(code) => return code,
                }
            }
        };
        give_up = None;
        refusals.connected(out);
        pause = args.restart_delay;
        let term = leadership.term();
        state.leading(term, leadership.backend_pid());
        out.info(format_args!(
            "leading {name} in term {term} (backend pid {}) after {}",
            leadership.backend_pid(),
            human_duration(started.elapsed())
        ));
        match lead(leadership, &args, &mut signals, &state, out).await {
            Led::Exited { code, stopping } => {
                let restart = match args.restart {
                    Restart::Always => true,
                    Restart::OnFailure => code != exit::OK,
                    Restart::Never => false,
                };
                if stopping || !restart {
                    return code;
                }
                state.standing_by(None);
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
    state: &State,
    out: &Output,
) -> Led {
    let term = leadership.term();
    let env = vec![
        ("PGLOCK_NAME", args.name.clone()),
        ("PGLOCK_TERM", term.to_string()),
        (
            "PGLOCK_KEY",
            key_arg(AdvisoryKey::from_name(&format!("leader:{}", args.name))),
        ),
    ];
    let mut running = match child::spawn(&args.command, &env, &ChildOptions::from(&args.child)) {
        Ok(running) => running,
        Err((code, message)) => {
            out.error(format_args!("{message}"));
            let _ = leadership.step_down().await;
            return Led::Failed(code);
        }
    };
    out.verbose(format_args!("started pid {} in term {term}", running.pid()));
    let mut loss = leadership.loss_signal();
    let lost = async move {
        let reason = loss.lost().await.to_string();
        state.lost(&reason);
        reason
    };
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

/// How to campaign again after a failed campaign.
enum Retry<'a> {
    /// The server refused the connection for a passing reason (see [`Error::is_transient`]):
    /// waited out with the fleet's backoff, within `--connect-timeout` until the first contact
    /// (the deadline, `None` after it).
    Refused(&'a mut Refusals, &'a mut Option<Instant>),
    /// Anything else: retried after this pause, which doubles up to [`LONGEST_RETRY`].
    Failed(&'a mut Duration),
}

/// Waits before the next campaign, as `retry` says; breaks with the exit code when pglock gives
/// up or a signal comes.
async fn after_failed_campaign(
    error: &Error,
    retry: Retry<'_>,
    name: &str,
    signals: &mut Signals,
    state: &State,
    out: &Output,
) -> ControlFlow<i32> {
    let wait = match retry {
        Retry::Refused(refusals, give_up) => {
            // Before the first contact, pglock is still connecting.
            if give_up.is_none() {
                state.lost(&with_causes(error));
            }
            let now = Instant::now();
            if give_up.is_some_and(|at| now >= at) {
                return ControlFlow::Break(out.report_error(error));
            }
            let bound = give_up.map(|at| (at, "--connect-timeout"));
            let wait = refusals.refused(error, bound, out);
            give_up.map_or(wait, |at| wait.min(at - now))
        }
        Retry::Failed(pause) => {
            state.lost(&with_causes(error));
            out.info(format_args!(
                "campaign for {name} failed: {}; retrying in {}",
                with_causes(error),
                human_duration(*pause)
            ));
            let wait = jitter(*pause);
            *pause = (*pause * 2).min(LONGEST_RETRY);
            wait
        }
    };
    match pause_or_signal(signals, wait).await {
        Some(code) => ControlFlow::Break(code),
        None => ControlFlow::Continue(()),
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
    match error {
        Error::Config(_) | Error::TermTable { .. } | Error::ReadOnlyStandby | Error::Tls { .. } => {
            true
        }
        // Refused logins, unknown databases and the like: the server answered, and will again.
        Error::Connect { .. } | Error::Pool(_) => !error.is_transient(),
        _ => false,
    }
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
