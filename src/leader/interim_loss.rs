//! INTERIM stand-in for the lock-loss detection of the `loss` branch, with the same public
//! shape (`LossReason`, `LossSignal`, `HealthCheck`). It is deleted when `loss` is merged: the
//! leader module then takes its signal from `AdvisoryLockGuard::loss_signal`.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::{AdvisoryKey, AdvisoryLockGuard};

/// Why a held lock was lost.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LossReason {
    /// The connection closed or failed.
    ConnectionClosed,
    /// The health probe did not answer within its timeout.
    ProbeTimeout,
    /// The lock is no longer held by the session.
    NotHeld,
}

/// How often a held lock is checked, and how long one check may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    /// The pause between two probes.
    pub interval: Duration,
    /// How long one probe may take before the lock is considered lost.
    pub probe_timeout: Duration,
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            interval: Duration::from_secs(1),
            probe_timeout: Duration::from_secs(1),
        }
    }
}

/// Completes when a held lock is lost.
#[derive(Clone, Debug)]
pub struct LossSignal {
    rx: watch::Receiver<Option<LossReason>>,
}

impl LossSignal {
    /// Whether the lock is known to be lost.
    pub fn is_lost(&self) -> bool {
        self.rx.borrow().is_some()
    }

    /// Why the lock was lost, if it was.
    pub fn reason(&self) -> Option<LossReason> {
        self.rx.borrow().clone()
    }

    /// Waits until the lock is lost.
    pub async fn lost(&mut self) -> LossReason {
        let reason = match self.rx.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone(),
            Err(_) => None,
        };
        match reason {
            Some(reason) => reason,
            None => std::future::pending().await,
        }
    }
}

const PROBE: &str = "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_locks WHERE locktype = 'advisory' \
    AND pid = pg_catalog.pg_backend_pid() AND granted AND classid = $1::int8::oid \
    AND objid = $2::int8::oid AND objsubid = $3::int2)";

/// Probes `guard` every `health.interval` until the lock is found lost.
pub(crate) fn monitor(
    guard: Arc<AdvisoryLockGuard>,
    health: HealthCheck,
) -> (LossSignal, JoinHandle<()>) {
    let (tx, rx) = watch::channel(None);
    let key: AdvisoryKey = AdvisoryLockGuard::key(&guard);
    let (classid, objid, objsubid) = key.pg_locks_ids();
    let (classid, objid) = (i64::from(classid), i64::from(objid));
    let task = tokio::spawn(async move {
        loop {
            if guard.is_closed() {
                let _ = tx.send(Some(LossReason::ConnectionClosed));
                return;
            }
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] =
                [&classid, &objid, &objsubid];
            let probe = guard.query_one(PROBE, &params);
            let reason = match tokio::time::timeout(health.probe_timeout, probe).await {
                Ok(Ok(row)) if row.get::<_, bool>(0) => None,
                Ok(Ok(_)) => Some(LossReason::NotHeld),
                Ok(Err(_)) => Some(LossReason::ConnectionClosed),
                Err(_) => Some(LossReason::ProbeTimeout),
            };
            if let Some(reason) = reason {
                let _ = tx.send(Some(reason));
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(health.interval) => {}
                _ = tx.closed() => return,
            }
        }
    });
    (LossSignal { rx }, task)
}
