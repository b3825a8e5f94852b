//! The unlocks of several guards of one shared [`Session`](crate::Session), dropped together,
//! sent as one statement.

use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;

use crate::conn::handle::Conn;
use crate::conn::session::Reservation;
use crate::error::Error;
use crate::key::AdvisoryKey;
use crate::release::in_flight::ReleaseTask;
use crate::release::statement::unlock_outcome;
use crate::scope::LockMode;
use crate::sql::{self, by_index, Checks, Form, KeyArrays};
use crate::{background, trace};

/// Releases the keys of dropped guards of one session (`conn`), all of `form` and held in
/// `mode`, in one statement, queued on the connection before this returns; its answer is read
/// in the background, and each key's outcome traced as a dropped guard's release is.
///
/// The statement is sent unprepared (`query_typed`: parse, bind and execute in one message), so
/// that it can be queued at once even on a connection where it was never prepared; its parsing
/// is shared by all its keys. `unlocks` are `(key, pid of the granting backend, reservation)`:
/// each reservation is dropped once the statement is queued, as a single unlock's is. It is
/// always the checking form, guarded by each key's granting pid: the guards of one session may
/// have been granted before and after it was verified, and that form serves them all.
pub(crate) fn unlock_together(
    conn: Conn,
    mode: LockMode,
    form: Form,
    unlocks: Vec<(AdvisoryKey, i32, Option<Reservation>)>,
) {
    let mut keys = Vec::with_capacity(unlocks.len());
    let mut pids = Vec::with_capacity(unlocks.len());
    let mut reservations = Vec::with_capacity(unlocks.len());
    for (key, granted_on, reservation) in unlocks {
        keys.push(key);
        pids.push(granted_on);
        reservations.push(reservation);
    }
    let sql = sql::unlock_batch(mode, form);
    let task: ReleaseTask = Box::pin(async move {
        let client = conn.client();
        // Run again once if a late cancel request (for an abandoned wait on the session) ended
        // it, as a single unlock is: the keys would otherwise stay held.
        let mut result = run_unlocks(client, sql, form, &keys, &pids).await;
        if matches!(&result, Err(e) if e.code() == Some(&SqlState::QUERY_CANCELED)) {
            result = run_unlocks(client, sql, form, &keys, &pids).await;
        }
        report_unlocks(&keys, &pids, result);
    });
    // Queued now, ahead of anything sent later on the session: the keys may be taken again.
    // The first poll finishes the task when the connection is closed: only the rest of a
    // pending task is spawned.
    background::queue_and_spawn(task);
    drop(reservations);
}

/// Sends a batched unlock statement and reads its rows.
async fn run_unlocks(
    client: &tokio_postgres::Client,
    sql: &str,
    form: Form,
    keys: &[AdvisoryKey],
    pids: &[i32],
) -> std::result::Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
    let arrays = KeyArrays::new(form, keys);
    client
        .query_typed(sql, &arrays.typed(Some((&pids, Type::INT4_ARRAY))))
        .await
}

/// Traces each key's outcome of a batched unlock, as a dropped guard's unlock sent alone is.
fn report_unlocks(
    keys: &[AdvisoryKey],
    pids: &[i32],
    result: std::result::Result<Vec<tokio_postgres::Row>, tokio_postgres::Error>,
) {
    match result {
        Ok(rows) => {
            // The batched unlock always checks (see `unlock_together`).
            let outcomes = by_index(&rows, keys.len(), Checks::InStatement);
            for ((key, granted_on), outcome) in keys.iter().zip(pids).zip(outcomes) {
                let result = match outcome {
                    Some((released, now_on)) => unlock_outcome(*key, *granted_on, now_on, released),
                    None => Err(Error::NotHeld { key: *key }),
                };
                trace::released(*key, *granted_on, "drop", &result, true);
            }
        }
        // One error for all the keys: reported with the first (the others share its fate).
        Err(error) => {
            if let (Some(key), Some(granted_on)) = (keys.first(), pids.first()) {
                let result = Err(Error::from_postgres(Some(*key), error));
                trace::released(*key, *granted_on, "drop", &result, true);
            }
        }
    }
}
