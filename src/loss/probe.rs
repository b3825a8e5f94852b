//! The probes a loss monitor sends: the cheap one (is the backend still there?) and the full
//! one (does it still hold each watched lock?), and how their answers are read.

use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Row;

use crate::conn::handle::Conn;
use crate::health::HealthCheck;
use crate::loss::signal::LossReason;
use crate::scope::LockScope;

/// The probe: this backend's pid, and the 1-based positions of the watched locks that this
/// backend does not hold (granted, in that mode). `pg_lock_status()` is the function behind the
/// `pg_locks` view; calling it directly takes no lock on the view inside a transaction.
pub(crate) static PROBE_SQL: &str = "SELECT pg_backend_pid(), \
     coalesce(array_agg(h.n) FILTER (WHERE l.pid IS NULL), '{}')::int8[] \
     FROM unnest($1::int8[], $2::int2[], $3::bool[]) WITH ORDINALITY AS h(key, subid, shared, n) \
     LEFT JOIN pg_lock_status() AS l \
     ON l.locktype = 'advisory' AND l.pid = pg_backend_pid() AND l.granted \
     AND l.classid = ((h.key >> 32) & 4294967295)::oid \
     AND l.objid = (h.key & 4294967295)::oid \
     AND l.objsubid = h.subid \
     AND l.mode = CASE WHEN h.shared THEN 'ShareLock' ELSE 'ExclusiveLock' END";

/// The cheap probe: this backend's pid. Its cost does not depend on the server's lock table.
/// An answer says the connection is alive, reaches the backend that took the locks, and (for a
/// transaction-scoped lock) that its transaction has not failed (`25P02` otherwise).
static CHEAP_PROBE_SQL: &str = "SELECT pg_backend_pid()";

/// The watched locks of one probe, as parallel arrays (the full probe's parameters), and the
/// schedule their health checks ask for.
pub(crate) struct Batch {
    pub(crate) ids: Vec<u64>,
    pub(crate) pids: Vec<i32>,
    pub(crate) scopes: Vec<LockScope>,
    pub(crate) timeouts: Vec<Duration>,
    pub(crate) keys: Vec<i64>,
    pub(crate) subids: Vec<i16>,
    pub(crate) shared: Vec<bool>,
    /// Ids below this were registered when the batch was taken.
    pub(crate) newest: u64,
    /// The shortest interval of the watched locks: the time between two probes.
    pub(crate) interval: Duration,
    /// The longest interval of the watched locks.
    pub(crate) loosest_interval: Duration,
    /// The shortest fallback cadence of the full check.
    pub(crate) full_check_interval: Duration,
    /// The health check whose keepalive timeout is the longest.
    pub(crate) keepalives: Option<HealthCheck>,
}

/// Runs one probe, the full one or the cheap one: `(backend pid, sorted 1-based positions of
/// the missing locks)` (none for the cheap probe).
pub(crate) async fn probe(
    conn: &Conn,
    batch: &Batch,
    full: bool,
    keepalives: Option<&HealthCheck>,
) -> Result<(i32, Vec<i64>), tokio_postgres::Error> {
    let client = conn.client();
    let mut row = match keepalives {
        // Pipelined with the probe: no extra round trip.
        Some(health) => {
            let (_, row) = futures_util::future::join(
                crate::health::apply_server_keepalives(client, health),
                probe_once(conn, batch, full),
            )
            .await;
            row
        }
        None => probe_once(conn, batch, full).await,
    };
    // A cancel request meant for an abandoned wait on this session can arrive late and hit the
    // probe; that says nothing about the lock, so ask once more.
    if matches!(&row, Err(e) if e.code() == Some(&SqlState::QUERY_CANCELED)) {
        row = probe_once(conn, batch, full).await;
    }
    let row = row?;
    let pid: i32 = row.try_get(0)?;
    if !full {
        return Ok((pid, Vec::new()));
    }
    let mut missing: Vec<i64> = row.try_get(1)?;
    missing.sort_unstable();
    Ok((pid, missing))
}

/// Sends the probe as a statement prepared once per connection, or unprepared when the
/// prepared one is unknown to the backend that answers: behind a transaction pooler, the
/// backend may not be the one the statement was prepared on, and the probe must still reach
/// the answering backend to tell that it changed.
async fn probe_once(conn: &Conn, batch: &Batch, full: bool) -> Result<Row, tokio_postgres::Error> {
    if !full {
        let prepared = match conn.prepare(CHEAP_PROBE_SQL).await {
            Ok(statement) => conn.client().query_one(&statement, &[]).await,
            Err(error) => Err(error),
        };
        return match prepared {
            Err(error) if error.code() == Some(&SqlState::INVALID_SQL_STATEMENT_NAME) => {
                let mut rows = conn.client().query_typed(CHEAP_PROBE_SQL, &[]).await?;
                Ok(rows.pop().expect("the probe returns one row"))
            }
            other => other,
        };
    }
    let params: [&(dyn ToSql + Sync); 3] = [&batch.keys, &batch.subids, &batch.shared];
    let prepared = match conn.prepare(PROBE_SQL).await {
        Ok(statement) => conn.client().query_one(&statement, &params).await,
        Err(error) => Err(error),
    };
    match prepared {
        Err(error) if error.code() == Some(&SqlState::INVALID_SQL_STATEMENT_NAME) => {
            let typed = [
                (params[0], Type::INT8_ARRAY),
                (params[1], Type::INT2_ARRAY),
                (params[2], Type::BOOL_ARRAY),
            ];
            let mut rows = conn.client().query_typed(PROBE_SQL, &typed).await?;
            Ok(rows.pop().expect("an aggregate returns one row"))
        }
        other => other,
    }
}

/// What a failed probe says about the watched locks.
pub(crate) enum Verdict {
    /// All of them are lost.
    Lost(LossReason),
    /// The caller's transaction on the connection has failed (`25P02`). PostgreSQL released
    /// its transaction-scoped locks when it failed; session locks stay held, and nothing can
    /// release them until the transaction is rolled back.
    TransactionFailed,
    /// Nothing: a cancel request meant for something else hit the probe twice.
    Inconclusive,
    /// Not waited for any more: the monitor may have nothing left to watch, or every lock of
    /// the batch has timed out.
    Abandoned,
}

pub(crate) fn classify(error: &tokio_postgres::Error) -> Verdict {
    let detail = error.to_string();
    if error.is_closed() {
        return Verdict::Lost(LossReason::ConnectionClosed { detail });
    }
    let Some(db) = error.as_db_error() else {
        return Verdict::Lost(LossReason::ProbeFailed { detail });
    };
    if matches!(db.severity(), "FATAL" | "PANIC") {
        return Verdict::Lost(LossReason::ConnectionClosed { detail });
    }
    match *db.code() {
        SqlState::IN_FAILED_SQL_TRANSACTION => Verdict::TransactionFailed,
        SqlState::QUERY_CANCELED => Verdict::Inconclusive,
        SqlState::ADMIN_SHUTDOWN
        | SqlState::CRASH_SHUTDOWN
        | SqlState::CANNOT_CONNECT_NOW
        | SqlState::IDLE_SESSION_TIMEOUT => Verdict::Lost(LossReason::ConnectionClosed { detail }),
        _ => Verdict::Lost(LossReason::ProbeFailed { detail }),
    }
}
