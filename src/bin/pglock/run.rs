//! `pglock run NAME -- COMMAND`: take the lock, run the command, release, exit with its status.

use std::time::Duration;

use pglock::{AdvisoryLockGuard, LockMode, SemaphorePermit};
use tokio::time::Instant;

use crate::args::{Resolved, RunArgs};
use crate::child::{self, ChildOptions};
use crate::connect::{Database, Refusals};
use crate::exit;
use crate::format::{human_duration, key_arg, signal_name};
use crate::http::Role;
use crate::instance::Instance;
use crate::output::Output;
use crate::slots;
use crate::supervise::{supervise, Outcome};
use crate::wait::{Acquired, Patience, Waiter};

/// A holder that got the lock this soon after it started may be one of a fleet started at once.
const JUST_STARTED: Duration = Duration::from_secs(3);

pub async fn run(db: &Database, args: RunArgs, out: &Output) -> i32 {
    let began = Instant::now();
    let mut target = args.target.resolve();
    // A semaphore's instances are named `pglock run/N NAME`, which `pglock status` reads to
    // show their slots.
    let command = match args.slots {
        Some(n) => format!("run/{n}"),
        None => "run".to_owned(),
    };
    let Instance {
        session_name,
        state,
        mut signals,
    } = match Instance::start(&command, &target.label, args.serve.http, Role::Run, out).await {
        Ok(instance) => instance,
        Err(code) => return code,
    };
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
    let mut waiter = Waiter {
        db,
        app: session_name.app(args.session.application_name.as_deref()),
        out,
        label: &target.label,
        progress_every: args.session.progress_every,
        mode: args.session.wait_mode,
        refusals: Refusals::default(),
        state: &state,
    };
    let acquired = match (args.slots, target.name.clone()) {
        (Some(permits), Some(name)) => {
            let label = format!("{name} [{permits} slots]");
            waiter.label = &label;
            waiter
                .acquire_slot(&name, permits, patience, &mut signals)
                .await
                .map(|acquired| match acquired {
                    Acquired::Held(connection, permit) => {
                        Acquired::Held(connection, Held::Slot(permit))
                    }
                    Acquired::Busy => Acquired::Busy,
                    Acquired::Interrupted(signal) => Acquired::Interrupted(signal),
                })
        }
        _ => waiter
            .acquire(target.key, mode, patience, &mut signals)
            .await
            .map(|acquired| match acquired {
                Acquired::Held(connection, guard) => Acquired::Held(connection, Held::Lock(guard)),
                Acquired::Busy => Acquired::Busy,
                Acquired::Interrupted(signal) => Acquired::Interrupted(signal),
            }),
    };
    let (connection, guard) = match acquired {
        Ok(Acquired::Held(connection, guard)) => (connection, guard),
        Ok(Acquired::Busy) => return i32::from(args.conflict_exit_code),
        Ok(Acquired::Interrupted(signal)) => return exit::SIGNAL_BASE + signal,
        Err(error) => return out.report_error(&error),
    };
    if let Held::Slot(permit) = &guard {
        target.key = AdvisoryLockGuard::key(permit);
        target.label = format!(
            "{} [slot {} of {}]",
            permit.name(),
            permit.slot(),
            permit.permits()
        );
    }
    state.holding(AdvisoryLockGuard::backend_pid(guard.guard()));
    out.verbose(format_args!(
        "holding lock {} (key {}, {}) on backend pid {}",
        target.label,
        target.key,
        mode_name(mode),
        AdvisoryLockGuard::backend_pid(guard.guard())
    ));
    // At a fleet's start the server may be out of connection slots for a moment; the command
    // may need some of its own.
    tokio::select! {
        () = slots::room_for_the_command(
            connection.session.client(),
            began.elapsed() < JUST_STARTED,
            out,
        ) => {}
        signal = signals.recv() => {
            out.info(format_args!("{} before the command started: giving up", signal_name(signal)));
            let _ = guard.release().await;
            return exit::SIGNAL_BASE + signal;
        }
    }
    let mut env = child_env(&target, mode);
    if let Held::Slot(permit) = &guard {
        env.push(("PGLOCK_SLOT", permit.slot().to_string()));
        env.push(("PGLOCK_SLOTS", permit.permits().to_string()));
    }
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
    // pglock's loss detection probes the lock (a dead network path is noticed within its
    // detection bound); the connection task's end reports a closed connection at once.
    let mut loss = AdvisoryLockGuard::loss_signal(guard.guard());
    let lost = async {
        let reason = tokio::select! {
            reason = loss.lost() => reason.to_string(),
            () = connection.closed() => {
                "the database session holding it ended (the server closed the connection)"
                    .to_owned()
            }
        };
        state.lost(&reason);
        reason
    };
    let outcome = supervise(&mut running, lost, &mut signals, out).await;
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
