//! Taking one slot of a semaphore (`pglock run --slots N NAME`): at once, within a timeout, or
//! whenever one comes free. Waiters queue on the semaphore's gate key in the server, in arrival
//! order; only the one at the head of the queue looks for a free slot (see
//! `pglock::Semaphore`). A waiter has one connection open.

use pglock::{Error, Semaphore, SemaphorePermit};
use tokio::time::Instant;

use crate::child::Signals;
use crate::wait::{Acquired, Patience, Reports, Waiter};

impl Waiter<'_> {
    /// Takes one of the `permits` slots of the semaphore `name` within `patience`, reporting on
    /// stderr while they are all busy. A connection lost while waiting is replaced, within
    /// `patience`. `--wait-mode` does not apply: a slot's waiters always queue on the server.
    ///
    /// # Errors
    ///
    /// Connection errors that do not pass by themselves, and server errors.
    pub async fn acquire_slot(
        &mut self,
        name: &str,
        permits: u32,
        patience: Patience,
        signals: &mut Signals,
    ) -> Result<Acquired<SemaphorePermit>, Error> {
        let started = Instant::now();
        let mut reports = Reports::new(started, self.progress_every);
        loop {
            let connection = tokio::select! {
                connected = self.db.connect(self.app, patience.connect_deadline(), &mut self.refusals, self.out) => connected?,
                signal = signals.recv() => return Ok(self.interrupted(signal)),
            };
            let semaphore = Semaphore::new(connection.session.clone(), name, permits);
            let first = tokio::select! {
                first = semaphore.try_acquire() => first,
                signal = signals.recv() => return Ok(self.interrupted(signal)),
            };
            match first {
                Ok(Some(permit)) => return Ok(Acquired::Held(connection, permit)),
                Ok(None) => {}
                Err(error) if error.is_connection_lost() => {
                    self.lost_while_waiting(&error);
                    continue;
                }
                Err(error) => return Err(error),
            }
            self.state.waiting();
            if reports.is_due() && !self.out.quiet {
                self.report_busy(None, patience.plan(started.elapsed()));
                reports.done();
            }
            if patience.expired() {
                if !matches!(patience, Patience::NoWait) {
                    self.gave_up(started);
                }
                return Ok(Acquired::Busy);
            }
            let wait = async {
                match patience.deadline() {
                    Some(at) => semaphore.try_acquire_until(at).await,
                    None => semaphore.acquire().await.map(Some),
                }
            };
            let outcome = self.with_reports(wait, (started, patience), None, &mut reports, signals);
            let result = match outcome.await {
                Ok(result) => result,
                Err(signal) => {
                    // The wait was dropped above, which abandons it; this makes sure the server
                    // has ended it before pglock exits.
                    connection.abandon_wait().await;
                    return Ok(self.interrupted(signal));
                }
            };
            match result {
                Ok(Some(permit)) => {
                    self.acquired(started);
                    return Ok(Acquired::Held(connection, permit));
                }
                Ok(None) => {
                    self.gave_up(started);
                    return Ok(Acquired::Busy);
                }
                // Nothing is held on a connection that died while it waited: wait on a new one.
                Err(error) if error.is_connection_lost() => self.lost_while_waiting(&error),
                Err(error) => return Err(error),
            }
        }
    }
}
