//! Taking the lock the way the command line asked: at once, within a timeout, or whenever it
//! comes, telling on stderr who holds it meanwhile.

use std::time::{Duration, SystemTime};

use pglock::introspect::{Introspect, LockInfo};
use pglock::{AdvisoryKey, AdvisoryLock, AdvisoryLockGuard, Error, LockMode};
use tokio::time::Instant;

use crate::connect::{connect, AppName, Connection};
use crate::format::{ago, human_duration, rfc3339};
use crate::Output;

/// How long to wait.
#[derive(Clone, Copy, Debug)]
pub enum Patience {
    /// One attempt (`-n`, `--timeout 0`).
    NoWait,
    /// Until the deadline (`--timeout`).
    Until(Instant),
    /// As long as it takes (the default).
    Forever,
}

/// What the progress reports need to know.
pub struct Progress<'a> {
    pub out: &'a Output,
    pub url: &'a str,
    pub label: &'a str,
    pub monitor_app: &'a str,
    pub every: Duration,
}

/// Takes `lock` in `mode` within `patience`, reporting the holders on stderr while it waits.
/// `Ok(None)` when it stayed busy (`-n`, or the deadline passed).
///
/// # Cancel safety
///
/// Cancel-safe: dropping the future abandons the wait on the server (pglock's acquisition is
/// cancel-safe) and closes the monitoring connection.
pub async fn acquire(
    lock: &AdvisoryLock,
    mode: LockMode,
    patience: Patience,
    progress: &Progress<'_>,
) -> Result<Option<AdvisoryLockGuard>, Error> {
    let first = match mode {
        LockMode::Exclusive => lock.try_lock().await?,
        LockMode::Shared => lock.try_lock_shared().await?,
    };
    if let Some(guard) = first {
        return Ok(Some(guard));
    }
    let started = Instant::now();
    let mut monitor = Monitor::new(progress);
    monitor.report(lock, started, patience).await;
    if let Patience::NoWait = patience {
        return Ok(None);
    }
    let wait = async {
        match (mode, patience) {
            (LockMode::Exclusive, Patience::Until(deadline)) => lock.try_lock_until(deadline).await,
            (LockMode::Shared, Patience::Until(deadline)) => {
                lock.try_lock_shared_until(deadline).await
            }
            (LockMode::Exclusive, _) => lock.lock().await.map(Some),
            (LockMode::Shared, _) => lock.lock_shared().await.map(Some),
        }
    };
    let mut wait = std::pin::pin!(wait);
    let mut reports = Reports::new(Instant::now() + progress.every, progress.every);
    if progress.every.is_zero() {
        reports.done();
    }
    loop {
        tokio::select! {
            result = &mut wait => {
                return Ok(match result? {
                    Some(guard) => {
                        progress.out.verbose(format_args!(
                            "acquired lock {} after {}",
                            progress.label,
                            human_duration(started.elapsed())
                        ));
                        Some(guard)
                    }
                    None => {
                        progress.out.info(format_args!(
                            "gave up on lock {} after {}: still busy",
                            progress.label,
                            human_duration(started.elapsed())
                        ));
                        None
                    }
                });
            }
            () = reports.due() => {
                monitor.report(lock, started, patience).await;
                reports.done();
            }
        }
    }
}

/// When the progress reports of a wait are due: the first at a given time, then one every
/// `every`. The schedule moves on after each report, so that a report that ran late is not
/// followed by a burst of catch-up reports, and a zero interval means no further reports.
pub struct Reports {
    next: Option<Instant>,
    every: Duration,
}

impl Reports {
    pub fn new(first: Instant, every: Duration) -> Self {
        Reports {
            next: Some(first),
            every,
        }
    }

    /// When the next report is due; never, once reports have stopped.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: the schedule changes only in [`done`](Self::done).
    pub async fn due(&self) {
        match self.next {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    }

    /// Records that the report due was made.
    pub fn done(&mut self) {
        let Some(at) = self.next else { return };
        if self.every.is_zero() {
            self.next = None;
            return;
        }
        let now = Instant::now();
        let next = at + self.every;
        self.next = Some(if next > now { next } else { now + self.every });
    }
}

/// A second connection that looks at who holds the lock, opened on the first report.
pub struct Monitor<'a> {
    progress: &'a Progress<'a>,
    connection: Option<Connection>,
    failed: bool,
}

impl<'a> Monitor<'a> {
    pub fn new(progress: &'a Progress<'a>) -> Self {
        Monitor {
            progress,
            connection: None,
            failed: false,
        }
    }

    /// Reports who holds the lock `pglock run` waits for.
    async fn report(&mut self, lock: &AdvisoryLock, started: Instant, patience: Patience) {
        let out = self.progress.out;
        if out.quiet {
            return;
        }
        let label = self.progress.label;
        let waited = human_duration(started.elapsed());
        let plan = match patience {
            Patience::NoWait => "not waiting (-n)".to_owned(),
            Patience::Until(deadline) => format!(
                "waiting up to {} more",
                human_duration(deadline.saturating_duration_since(Instant::now()))
            ),
            Patience::Forever if started.elapsed() < Duration::from_secs(1) => "waiting".to_owned(),
            Patience::Forever => format!("waited {waited} so far"),
        };
        match self.holders(lock.key()).await {
            Some(held_by) => out.info(format_args!("lock {label} is busy: {held_by}; {plan}")),
            None => out.info(format_args!("lock {label} is busy; {plan}")),
        }
    }

    /// Reports who leads while `pglock leader` campaigns for the leadership lock `key`.
    pub async fn report_leader(&mut self, key: AdvisoryKey, started: Instant) {
        let out = self.progress.out;
        if out.quiet {
            return;
        }
        let label = self.progress.label;
        let waited = human_duration(started.elapsed());
        match self.holders(key).await {
            Some(held_by) => out.info(format_args!(
                "standing by for {label}: led by {held_by}; waited {waited} so far"
            )),
            None => out.info(format_args!(
                "standing by for {label}; waited {waited} so far"
            )),
        }
    }

    /// `pid 4242 (...) since ...; 2 waiting`, or `None` when the holders cannot be looked up.
    async fn holders(&mut self, key: AdvisoryKey) -> Option<String> {
        let locks = self.fetch(key).await?;
        let now = SystemTime::now();
        let holders: Vec<&LockInfo> = locks.iter().filter(|l| l.granted).collect();
        let waiters = locks.iter().filter(|l| !l.granted).count();
        let held_by = if holders.is_empty() {
            "a session that just let go".to_owned()
        } else {
            holders
                .iter()
                .map(|holder| describe_holder(holder, now))
                .collect::<Vec<_>>()
                .join("; ")
        };
        let queue = match waiters {
            0 => String::new(),
            1 => ", 1 waiting".to_owned(),
            n => format!(", {n} waiting"),
        };
        Some(format!("{held_by}{queue}"))
    }

    async fn fetch(&mut self, key: AdvisoryKey) -> Option<Vec<LockInfo>> {
        if self.failed {
            return None;
        }
        if self.connection.is_none() {
            match connect(
                self.progress.url,
                AppName::Default(self.progress.monitor_app),
            )
            .await
            {
                Ok(connection) => self.connection = Some(connection),
                Err(error) => {
                    self.progress
                        .out
                        .verbose(format_args!("cannot look up the holders: {error}"));
                    self.failed = true;
                    return None;
                }
            }
        }
        let client = &self.connection.as_ref()?.session;
        match Introspect::new().key(key).fetch(client.client()).await {
            Ok(locks) => Some(locks),
            Err(error) => {
                self.progress
                    .out
                    .verbose(format_args!("cannot look up the holders: {error}"));
                self.connection = None;
                None
            }
        }
    }
}

/// `pid 4242 (pglock run migrations, 10.1.2.3) since 2024-05-01T12:00:00Z (1m 05s)`.
pub fn describe_holder(holder: &LockInfo, now: SystemTime) -> String {
    let mut text = match holder.pid {
        Some(pid) => format!("pid {pid}"),
        None => "a prepared transaction".to_owned(),
    };
    let mut about = Vec::new();
    if let Some(app) = holder.application_name.as_deref().filter(|a| !a.is_empty()) {
        about.push(app.to_owned());
    }
    if let Some(addr) = holder.client_addr {
        about.push(format!("from {addr}"));
    }
    if !about.is_empty() {
        text.push_str(&format!(" ({})", about.join(", ")));
    }
    if holder.mode == LockMode::Shared {
        text.push_str(" shared");
    }
    match (holder.held_since, holder.backend_start) {
        (Some(since), _) => text.push_str(&format!(
            " since {} ({})",
            rfc3339(since, false),
            ago(since, now)
        )),
        (None, Some(connected)) => text.push_str(&format!(
            ", connected since {} ({})",
            rfc3339(connected, false),
            ago(connected, now)
        )),
        (None, None) => {}
    }
    text
}
