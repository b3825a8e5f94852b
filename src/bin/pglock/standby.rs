//! Standing by for a leadership: one campaign for the whole wait (in the server's queue, where
//! it keeps its place), or polling without a connection, telling on stderr who leads.

use deadpool_postgres::Pool;
use pglock::{Error, LeaderElection, Leadership};
use tokio::time::Instant;

use crate::args::WaitMode;
use crate::child::Signals;
use crate::connect::jitter;
use crate::format::{human_duration, signal_name};
use crate::holders::who_holds;
use crate::http::State;
use crate::output::Output;
use crate::slots::{self, Waiting};
use crate::wait::{next_poll, Reports, FIRST_POLL};

/// How a stand-by ended.
pub enum StoodBy {
    /// This instance leads.
    Leading(Box<Leadership>),
    /// A signal came while campaigning: the campaign is abandoned.
    Interrupted(i32),
}

/// Waits until `election` makes this instance the leader, on connections from `pool`.
///
/// # Errors
///
/// As [`LeaderElection::campaign`].
pub async fn stand_by(
    election: &LeaderElection,
    pool: &Pool,
    mode: WaitMode,
    progress_every: std::time::Duration,
    signals: &mut Signals,
    state: &State,
    out: &Output,
) -> Result<StoodBy, Error> {
    let name = election.name();
    let started = Instant::now();
    let interrupted = |signal: i32| {
        out.info(format_args!(
            "{} while campaigning for {name}: giving up",
            signal_name(signal)
        ));
        StoodBy::Interrupted(signal)
    };
    let first = tokio::select! {
        first = election.try_campaign() => first?,
        signal = signals.recv() => return Ok(interrupted(signal)),
    };
    if let Some(leadership) = first {
        return Ok(StoodBy::Leading(Box::new(leadership)));
    }
    // Someone leads. Who, and how to wait, are asked on the pool's idle connection, which the
    // campaign then uses: a standby holds one connection at most.
    let mut reports = Reports::new(started, progress_every);
    let (led_by, waiting) = match pool.get().await {
        Ok(client) => (
            who_holds(&client, election.lock_key()).await,
            slots::choose(mode, &client, &format!("leadership {name}"), out).await,
        ),
        Err(_) => (None, slots::choose_without_asking(mode)),
    };
    state.standing_by(led_by.clone());
    let report = |led_by: Option<&str>, note: &str| {
        let waited = human_duration(started.elapsed());
        match led_by {
            Some(led_by) => out.info(format_args!(
                "standing by for leadership {name}: led by {led_by}{note}; waited {waited} so far"
            )),
            None => out.info(format_args!(
                "standing by for leadership {name}; waited {waited} so far"
            )),
        }
    };
    if !out.quiet {
        report(led_by.as_deref(), "");
        reports.done();
    }
    match waiting {
        Waiting::Queue => {
            let campaign = election.campaign();
            let mut campaign = std::pin::pin!(campaign);
            loop {
                tokio::select! {
                    result = &mut campaign => return result.map(|l| StoodBy::Leading(Box::new(l))),
                    signal = signals.recv() => return Ok(interrupted(signal)),
                    () = reports.due(), if !out.quiet => {
                        report(led_by.as_deref(), " when the wait began");
                        reports.done();
                    }
                }
            }
        }
        Waiting::Poll => {
            let mut pause = FIRST_POLL;
            loop {
                // Closes the idle connection: a polling standby holds none between attempts.
                pool.retain(|_, _| false);
                let wake = Instant::now() + jitter(pause);
                pause = next_poll(pause);
                tokio::select! {
                    () = tokio::time::sleep_until(wake) => {}
                    signal = signals.recv() => return Ok(interrupted(signal)),
                }
                let attempt = tokio::select! {
                    attempt = election.try_campaign() => attempt?,
                    signal = signals.recv() => return Ok(interrupted(signal)),
                };
                if let Some(leadership) = attempt {
                    return Ok(StoodBy::Leading(Box::new(leadership)));
                }
                if reports.is_due() && !out.quiet {
                    let led_by = match pool.get().await {
                        Ok(client) => who_holds(&client, election.lock_key()).await,
                        Err(_) => None,
                    };
                    state.standing_by(led_by.clone());
                    report(led_by.as_deref(), "");
                    reports.done();
                }
            }
        }
    }
}
