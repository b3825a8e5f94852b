//! `pglock leader NAME -- COMMAND`: run the command only while this instance leads.

use std::ops::ControlFlow;
use std::time::Duration;

use deadpool_postgres::Pool;
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
    let election = election(&pool, &args);
    let mut retries = Retries::new(db.connect_timeout, args.restart_delay);
    loop {
        let started = Instant::now();
        let stood_by = stand_by(&election, &pool, &args.session, &mut signals, &state, out).await;
        let leadership = match stood_by {
            Ok(StoodBy::Leading(leadership)) => *leadership,
            Ok(StoodBy::Interrupted(signal)) => return exit::SIGNAL_BASE + signal,
            Err(error) if permanent(&error) => return out.report_error(&error),
            Err(error) => {
                let retry = retries.retry(&error);
                match after_failed_campaign(&error, retry, &name, &mut signals, &state, out).await {
                    ControlFlow::Continue(()) => continue,
                    ControlFlow::Break(code) => return code,
                }
            }
        };
        retries.won(args.restart_delay, out);
        let term = leadership.term();
        announce(&leadership, &name, started, &state, out);
        let led = lead(leadership, &args, &mut signals, &state, out).await;
        if let ControlFlow::Break(code) =
            after_term(led, term, &args, &mut signals, &state, out).await
        {
            return code;
        }
    }
}

/// The election for `NAME`, as the options say. pglock's connections have TCP keepalives and
/// a user timeout (see `connect`), which end a dead connection while a standby waits: the
/// standby can keep its place in the queue, without queue rounds.
fn election(pool: &Pool, args: &LeaderArgs) -> LeaderElection {
    let election = LeaderElection::new(pool, args.name.as_str())
        .identity(identity())
        .queue_round(None);
    match &args.term_table {
        Some(table) => election.term_table(table.clone()),
        None => election,
    }
}

/// Says for `--http`, and on stderr, that this instance leads: in which term, on which backend,
/// and how long after the campaign `started`.
fn announce(leadership: &Leadership, name: &str, started: Instant, state: &State, out: &Output) {
    let term = leadership.term();
    state.leading(term, leadership.backend_pid());
    out.info(format_args!(
        "leading {name} in term {term} (backend pid {}) after {}",
        leadership.backend_pid(),
        human_duration(started.elapsed())
    ));
}

/// After `term` ended as `led` says: continues to campaign again as `--restart` says (after
/// `--restart-delay` when the command exited); breaks with the exit code when it does not,
/// when pglock was asked to stop (`stopping`), or when a signal comes during the delay.
async fn after_term(
    led: Led,
    term: i64,
    args: &LeaderArgs,
    signals: &mut Signals,
    state: &State,
    out: &Output,
) -> ControlFlow<i32> {
    let code = match led {
        Led::Exited { code, stopping } => {
            let restart = match args.restart {
                Restart::Always => true,
                Restart::OnFailure => code != exit::OK,
                Restart::Never => false,
            };
            if stopping || !restart {
                return ControlFlow::Break(code);
            }
            code
        }
        Led::Lost => {
            if args.restart == Restart::Never {
                return ControlFlow::Break(exit::LOCK_LOST);
            }
            out.info(format_args!("campaigning again for {}", args.name));
            return ControlFlow::Continue(());
        }
        Led::Failed(code) => return ControlFlow::Break(code),
    };
    state.standing_by(None);
    out.info(format_args!(
        "the command exited with {code} in term {term}; campaigning again in {}",
        human_duration(args.restart_delay)
    ));
    match pause_or_signal(signals, args.restart_delay).await {
        Some(code) => ControlFlow::Break(code),
        None => ControlFlow::Continue(()),
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

/// What failed campaigns have come to so far, which sets how the next one is retried.
struct Retries {
    /// Connection attempts refused for a passing reason.
    refusals: Refusals,
    /// Until when refusals are waited out: connection failures at the start are waited out
    /// within the connect timeout, as `pglock run` does; once a campaign has reached the
    /// server (`None`), a standby retries forever.
    give_up: Option<Instant>,
    /// The pause before retrying any other failure.
    pause: Duration,
}

impl Retries {
    fn new(connect_timeout: Duration, restart_delay: Duration) -> Self {
        Retries {
            refusals: Refusals::default(),
            give_up: Some(Instant::now() + connect_timeout),
            pause: restart_delay,
        }
    }

    /// How to retry after `error`: a refusal for a passing reason is waited out with the
    /// fleet's backoff, anything else after the pause.
    fn retry(&mut self, error: &Error) -> Retry<'_> {
        if error.is_transient() {
            Retry::Refused(&mut self.refusals, &mut self.give_up)
        } else {
            Retry::Failed(&mut self.pause)
        }
    }

    /// A campaign won, so it reached the server: from now on refusals are waited out forever,
    /// and a failed campaign is retried after `--restart-delay` again.
    fn won(&mut self, restart_delay: Duration, out: &Output) {
        self.give_up = None;
        self.refusals.connected(out);
        self.pause = restart_delay;
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
