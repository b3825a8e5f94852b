//! Standing by for a leadership: one campaign for the whole wait (in the server's queue, where
//! it keeps its place), or polling without a connection, telling on stderr who leads.

use deadpool_postgres::Pool;
use pglock::{Error, LeaderElection, Leadership};
use tokio::time::Instant;

use crate::args::{SessionArgs, WaitMode};
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

/// Waits until `election` makes this instance the leader, on connections from `pool`, waiting
/// and reporting as `session` says.
///
/// # Errors
///
/// As [`LeaderElection::campaign`].
pub async fn stand_by(
    election: &LeaderElection,
    pool: &Pool,
    session: &SessionArgs,
    signals: &mut Signals,
    state: &State,
    out: &Output,
) -> Result<StoodBy, Error> {
    let started = Instant::now();
    let mut standby = Standby {
        election,
        pool,
        state,
        out,
        started,
        reports: Reports::new(started, session.progress_every),
    };
    if let Some(ended) = standby.try_campaign(signals).await? {
        return Ok(ended);
    }
    let (led_by, waiting) = standby.who_leads_and_how_to_wait(session.wait_mode).await;
    state.standing_by(led_by.clone());
    if !out.quiet {
        standby.report(led_by.as_deref(), "");
        standby.reports.done();
    }
    match waiting {
        Waiting::Queue => standby.in_queue(led_by.as_deref(), signals).await,
        Waiting::Poll => standby.polling(signals).await,
    }
}

/// One stand-by: the election, where it connects, and what it tells.
struct Standby<'a> {
    election: &'a LeaderElection,
    pool: &'a Pool,
    state: &'a State,
    out: &'a Output,
    started: Instant,
    reports: Reports,
}

impl Standby<'_> {
    /// One campaign that does not wait: `Some` when it ends the stand-by, because this instance
    /// leads or because a signal came first.
    async fn try_campaign(&self, signals: &mut Signals) -> Result<Option<StoodBy>, Error> {
        let attempt = tokio::select! {
            attempt = self.election.try_campaign() => attempt?,
            signal = signals.recv() => return Ok(Some(self.interrupted(signal))),
        };
        Ok(attempt.map(|leadership| StoodBy::Leading(Box::new(leadership))))
    }

    /// Someone leads: who, and how to wait, are asked on the pool's idle connection, which
    /// the campaign then uses: a standby holds one connection at most.
    async fn who_leads_and_how_to_wait(&self, mode: WaitMode) -> (Option<String>, Waiting) {
        let name = self.election.name();
        match self.pool.get().await {
            Ok(client) => (
                who_holds(&client, self.election.lock_key()).await,
                slots::choose(mode, &client, &format!("leadership {name}"), self.out).await,
            ),
            Err(_) => (None, slots::choose_without_asking(mode)),
        }
    }

    /// One campaign for the whole wait, in the server's queue, where it keeps its place;
    /// the reports meanwhile name `led_by`, the leader when the wait began.
    ///
    /// # Errors
    ///
    /// As [`LeaderElection::campaign`].
    async fn in_queue(
        &mut self,
        led_by: Option<&str>,
        signals: &mut Signals,
    ) -> Result<StoodBy, Error> {
        let campaign = self.election.campaign();
        let mut campaign = std::pin::pin!(campaign);
        loop {
            tokio::select! {
                result = &mut campaign => return result.map(|l| StoodBy::Leading(Box::new(l))),
                signal = signals.recv() => return Ok(self.interrupted(signal)),
                () = self.reports.due(), if !self.out.quiet => {
                    self.report(led_by, " when the wait began");
                    self.reports.done();
                }
            }
        }
    }

    /// Campaigns without waiting, again and again after a growing pause, without a
    /// connection in between; reports who leads as the reports fall due.
    ///
    /// # Errors
    ///
    /// As [`LeaderElection::try_campaign`].
    async fn polling(&mut self, signals: &mut Signals) -> Result<StoodBy, Error> {
        let mut pause = FIRST_POLL;
        loop {
            // Closes the idle connection: a polling standby holds none between attempts.
            self.pool.retain(|_, _| false);
            let wake = Instant::now() + jitter(pause);
            pause = next_poll(pause);
            tokio::select! {
                () = tokio::time::sleep_until(wake) => {}
                signal = signals.recv() => return Ok(self.interrupted(signal)),
            }
            if let Some(ended) = self.try_campaign(signals).await? {
                return Ok(ended);
            }
            if self.reports.is_due() && !self.out.quiet {
                self.report_leader().await;
            }
        }
    }

    /// Asks who leads now (on a connection of its own, which the next attempt uses) and
    /// reports it, for `--http` and on stderr.
    async fn report_leader(&mut self) {
        let led_by = match self.pool.get().await {
            Ok(client) => who_holds(&client, self.election.lock_key()).await,
            Err(_) => None,
        };
        self.state.standing_by(led_by.clone());
        self.report(led_by.as_deref(), "");
        self.reports.done();
    }

    fn interrupted(&self, signal: i32) -> StoodBy {
        self.out.info(format_args!(
            "{} while campaigning for {}: giving up",
            signal_name(signal),
            self.election.name()
        ));
        StoodBy::Interrupted(signal)
    }

    /// A progress report on stderr: who leads (`led_by`, with `note` on when that was seen),
    /// and how long this instance has stood by.
    fn report(&self, led_by: Option<&str>, note: &str) {
        let name = self.election.name();
        let waited = human_duration(self.started.elapsed());
        match led_by {
            Some(led_by) => self.out.info(format_args!(
                "standing by for leadership {name}: led by {led_by}{note}; waited {waited} so far"
            )),
            None => self.out.info(format_args!(
                "standing by for leadership {name}; waited {waited} so far"
            )),
        }
    }
}
