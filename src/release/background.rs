//! Releases sent and confirmed in the background, for guards dropped without `unlock().await`.

use std::sync::Arc;

use tokio::runtime::Handle;

use crate::base::key::AdvisoryKey;
use crate::base::trace;
use crate::conn::handle::Conn;
use crate::conn::held::HeldConn;
use crate::release::in_flight::{ReleaseInFlight, ReleaseTask};
use crate::release::parking::Parking;
use crate::release::statement::{release, Release};

/// Queues `release` on the connection now and confirms it in the background: in the next
/// acquisition on the connection, or in a task of its own (see [`ReleaseInFlight`]).
///
/// The first poll happens here, synchronously: tokio-postgres writes a request into the
/// connection's queue on the first poll, so the release is ordered before anything the caller
/// sends afterwards. Without a runtime to finish on, the connection is closed instead.
pub(crate) fn release_in_background(conn: Conn, release_how: Release, key: AdvisoryKey) {
    release_in_background_traced(conn, release_how, key, None, None);
}

/// [`release_in_background`], reporting the outcome as a release of the lock granted by
/// `backend_pid` (a guard's drop) or, without one, only a failure (a cleanup). With `parking`,
/// the connection is parked there until the release answers, for the next acquisition of the
/// lock to claim.
pub(crate) fn release_in_background_traced(
    conn: Conn,
    release_how: Release,
    key: AdvisoryKey,
    backend_pid: Option<i32>,
    parking: Option<Arc<Parking>>,
) {
    let (report, released) = match parking {
        Some(_) => {
            let (report, released) = Parking::report_channel();
            (Some(report), Some((released, conn.share())))
        }
        None => (None, None),
    };
    let parked_at = parking.clone();
    let session = match &conn {
        Conn::Session(session) => Some(session.clone()),
        Conn::Pooled(_) => None,
    };
    let held = HeldConn::new(conn);
    let mut task: ReleaseTask = Box::pin(async move {
        let result = release(held.conn(), &release_how, key).await;
        if backend_pid.is_some() || result.is_err() {
            trace::released(key, backend_pid.unwrap_or(0), "drop", &result, true);
        }
        let released = result.is_ok();
        if let (Some(parking), Some(report)) = (parking, report) {
            if !released {
                // A claimer may hold the connection already: close it when the last lets go.
                held.conn().mark_discard();
            }
            parking.unpark(held.conn());
            let _ = report.send(released);
        }
        held.finish(released);
    });
    let Ok(runtime) = Handle::try_current() else {
        // No runtime to confirm the release on: the request is queued all the same, and
        // dropping the task closes a pooled connection, which is therefore not parked.
        crate::base::background::queue_and_forget(task.as_mut());
        return;
    };
    // Parked (or offered to the session) only once the release is queued, and before its task
    // can run: a claimer's statement always travels behind the release, and the task always
    // finds the connection parked (or claimed) when it comes to take it back.
    ReleaseInFlight::start(task, runtime, |in_flight| {
        if let (Some(parking), Some((released, conn))) = (parked_at, released) {
            parking.park(conn, released, in_flight);
        } else if let Some(session) = session {
            session.offer_release(in_flight);
        }
    });
}
