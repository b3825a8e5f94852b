//! `pglock run NAME -- COMMAND`: take the lock, run the command, release, exit with its status.

use std::time::Duration;

use pglock::{AdvisoryKey, AdvisoryLockGuard, LockMode, LossSignal, SemaphorePermit};
use tokio::time::Instant;

use crate::args::{Resolved, RunArgs};
use crate::child::{self, ChildOptions, Signals};
use crate::connect::{Connection, Database, Refusals};
use crate::exit;
use crate::format::{human_duration, key_arg, signal_name};
use crate::http::{Role, State};
use crate::instance::{Instance, SessionName};
use crate::output::Output;
use crate::slots;
use crate::supervise::{supervise, Outcome};
use crate::wait::{Acquired, Patience, Waiter};

/// A holder that got the lock this soon after it started may be one of a fleet started at once.
const JUST_STARTED: Duration = Duration::from_secs(3);

pub async fn run(db: &Database, args: RunArgs, out: &Output) -> i32 {
    let began = Instant::now();
    let mut target = args.target.resolve();
    let command = instance_command(args.slots);
    let Instance {
        session_name,
        state,
        mut signals,
    } = match Instance::start(&command, &target.label, args.serve.http, Role::Run, out).await {
        Ok(instance) => instance,
        Err(code) => return code,
    };
    let mode = lock_mode(&args);
    let patience = patience(&args);
    let wanted = Wanted::new(&args, &target, mode);
    let label = wanted.label(&target);
    let mut waiter = waiter(db, &args, &session_name, &label, &state, out);
    let taken = wanted.take(&mut waiter, patience, &mut signals);
    let (connection, guard) = match taken.await {
        Ok(Acquired::Held(connection, guard)) => (connection, guard),
        Ok(Acquired::Busy) => return i32::from(args.conflict_exit_code),
        Ok(Acquired::Interrupted(signal)) => return exit::SIGNAL_BASE + signal,
        Err(error) => return out.report_error(&error),
    };
    guard.retarget(&mut target);
    holding(&guard, &target, mode, &state, out);
    if let Some(signal) = room_for_the_command(&connection, began, &mut signals, out).await {
        let _ = guard.release().await;
        return exit::SIGNAL_BASE + signal;
    }
    let env = guard.env(&target, mode);
    let mut running = match child::spawn(&args.command, &env, &ChildOptions::from(&args.child)) {
        Ok(running) => running,
        Err((code, message)) => {
            out.error(format_args!("{message}"));
            let _ = guard.release().await;
            return code;
        }
    };
    let started = Instant::now();
    out.verbose(format_args!("started pid {}", running.pid()));
    let mut loss = AdvisoryLockGuard::loss_signal(guard.guard());
    let lost = lost(&mut loss, &connection, &state);
    let outcome = supervise(&mut running, lost, &mut signals, out).await;
    finish(outcome, guard, started, &target, out).await
}

/// The command in the name of the instance's sessions: a semaphore's instances are named
/// `pglock run/N NAME`, which `pglock status` reads to show their slots.
fn instance_command(slots: Option<u32>) -> String {
    match slots {
        Some(n) => format!("run/{n}"),
        None => "run".to_owned(),
    }
}

/// The lock mode: shared with `--shared`, else exclusive.
fn lock_mode(args: &RunArgs) -> LockMode {
    if args.shared {
        LockMode::Shared
    } else {
        LockMode::Exclusive
    }
}

/// How long to wait, as `-n` and `--timeout` say, from now.
fn patience(args: &RunArgs) -> Patience {
    match (args.nonblock, args.timeout) {
        (true, _) => Patience::NoWait,
        (false, Some(timeout)) if timeout.is_zero() => Patience::NoWait,
        (false, Some(timeout)) => Patience::Until(Instant::now() + timeout),
        (false, None) => Patience::Forever,
    }
}

/// The waiter of a `pglock run`, as its options say: its sessions named after the instance
/// (or `--application-name`), waiting as `--wait-mode` says, reporting every
/// `--progress-every`.
fn waiter<'a>(
    db: &'a Database,
    args: &'a RunArgs,
    session_name: &'a SessionName,
    label: &'a str,
    state: &'a State,
    out: &'a Output,
) -> Waiter<'a> {
    Waiter {
        db,
        app: session_name.app(args.session.application_name.as_deref()),
        out,
        label,
        progress_every: args.session.progress_every,
        mode: args.session.wait_mode,
        refusals: Refusals::default(),
        state,
    }
}

/// What `pglock run` waits for: the lock, or with `--slots N NAME` one of the `N` slots of
/// the semaphore `NAME`.
enum Wanted {
    Lock(AdvisoryKey, LockMode),
    Slot { name: String, permits: u32 },
}

impl Wanted {
    fn new(args: &RunArgs, target: &Resolved, mode: LockMode) -> Self {
        match (args.slots, target.name.clone()) {
            (Some(permits), Some(name)) => Wanted::Slot { name, permits },
            _ => Wanted::Lock(target.key, mode),
        }
    }

    /// What the messages of the wait call it: the target's label, or `NAME [N slots]`.
    fn label(&self, target: &Resolved) -> String {
        match self {
            Wanted::Lock(..) => target.label.clone(),
            Wanted::Slot { name, permits } => format!("{name} [{permits} slots]"),
        }
    }

    /// Takes it, as [`Waiter::acquire`] or [`Waiter::acquire_slot`] does.
    ///
    /// # Errors
    ///
    /// As those.
    async fn take(
        self,
        waiter: &mut Waiter<'_>,
        patience: Patience,
        signals: &mut Signals,
    ) -> pglock::Result<Acquired<Held>> {
        match self {
            Wanted::Lock(key, mode) => {
                let acquired = waiter.acquire(key, mode, patience, signals).await;
                acquired.map(|acquired| acquired.map(Held::Lock))
            }
            Wanted::Slot { name, permits } => {
                let acquired = waiter.acquire_slot(&name, permits, patience, signals).await;
                acquired.map(|acquired| acquired.map(Held::Slot))
            }
        }
    }
}

/// Says for `--http`, and with `-v` on stderr, that the lock is held, and on which backend.
fn holding(guard: &Held, target: &Resolved, mode: LockMode, state: &State, out: &Output) {
    state.holding(AdvisoryLockGuard::backend_pid(guard.guard()));
    out.verbose(format_args!(
        "holding lock {} (key {}, {}) on backend pid {}",
        target.label,
        target.key,
        mode_name(mode),
        AdvisoryLockGuard::backend_pid(guard.guard())
    ));
}

/// Waits for room for the command: at a fleet's start the server may be out of connection
/// slots for a moment, and the command may need some of its own. A signal meanwhile gives up
/// before the command starts: it is returned.
async fn room_for_the_command(
    connection: &Connection,
    began: Instant,
    signals: &mut Signals,
    out: &Output,
) -> Option<i32> {
    tokio::select! {
        () = slots::room_for_the_command(
            connection.session.client(),
            began.elapsed() < JUST_STARTED,
            out,
        ) => None,
        signal = signals.recv() => {
            out.info(format_args!("{} before the command started: giving up", signal_name(signal)));
            Some(signal)
        }
    }
}

/// Completes with the reason once the lock is lost, which it also gives to `--http`. pglock's
/// loss detection probes the lock (a dead network path is noticed within its detection bound);
/// the connection task's end reports a closed connection at once.
async fn lost(loss: &mut LossSignal, connection: &Connection, state: &State) -> String {
    let reason = tokio::select! {
        reason = loss.lost() => reason.to_string(),
        () = connection.closed() => {
            "the database session holding it ended (the server closed the connection)"
                .to_owned()
        }
    };
    state.lost(&reason);
    reason
}

/// pglock's exit code once the command has ended: the command's own once the lock is
/// released, unless the lock was not held to the end.
async fn finish(
    outcome: Outcome,
    guard: Held,
    started: Instant,
    target: &Resolved,
    out: &Output,
) -> i32 {
    match outcome {
        Outcome::Exited { code, .. } => {
            out.verbose(format_args!(
                "command exited with {code} after {}",
                human_duration(started.elapsed())
            ));
            match guard.release().await {
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

/// What `pglock run` holds while its command runs: a lock, or one slot of a semaphore.
enum Held {
    Lock(AdvisoryLockGuard),
    Slot(SemaphorePermit),
}

impl Held {
    fn guard(&self) -> &AdvisoryLockGuard {
        match self {
            Held::Lock(guard) => guard,
            Held::Slot(permit) => permit,
        }
    }

    async fn release(self) -> pglock::Result<()> {
        match self {
            Held::Lock(guard) => AdvisoryLockGuard::unlock(guard).await,
            Held::Slot(permit) => permit.release().await,
        }
    }
    /// A slot is a lock of its own: from now on the messages and the command's environment
    /// name the slot's key and the slot, not the semaphore.
    fn retarget(&self, target: &mut Resolved) {
        if let Held::Slot(permit) = self {
            target.key = AdvisoryLockGuard::key(permit);
            target.label = format!(
                "{} [slot {} of {}]",
                permit.name(),
                permit.slot(),
                permit.permits()
            );
        }
    }

    /// The environment the command gets on top of pglock's: [`child_env`], and for a slot
    /// which one it holds.
    fn env(&self, target: &Resolved, mode: LockMode) -> Vec<(&'static str, String)> {
        let mut env = child_env(target, mode);
        if let Held::Slot(permit) = self {
            env.push(("PGLOCK_SLOT", permit.slot().to_string()));
            env.push(("PGLOCK_SLOTS", permit.permits().to_string()));
        }
        env
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

/// `exclusive` or `shared`.
pub fn mode_name(mode: LockMode) -> &'static str {
    match mode {
        LockMode::Exclusive => "exclusive",
        LockMode::Shared => "shared",
    }
}
