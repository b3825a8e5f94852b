//! The statements that release a lock ([`Release`]): an unlock, a commit or a rollback, each
//! sent as the connection needs it, and how their answers are read.

use std::future::Future;

use crate::conn::handle::Conn;
use crate::error::{Error, Result};
use crate::key::AdvisoryKey;
use crate::scope::{LockMode, LockScope};
use crate::sql::{first_row, Checks, Form, KeyParams, Op, PreparedUnlock};

/// How a lock is given back.
#[derive(Clone)]
pub(crate) enum Release {
    /// `pg_advisory_unlock` with this prepared statement (session scope), for the lock granted
    /// by the backend with this pid (the checking form runs only there); the mode names the
    /// statement again if the server lost it.
    Unlock(PreparedUnlock, i32, LockMode),
    /// `COMMIT` (transaction scope).
    Commit,
    /// `ROLLBACK` (transaction scope).
    Rollback,
    /// Release the key in this mode if, and only if, the session holds it: the cleanup of a
    /// session-scoped acquisition whose outcome is unknown.
    UnlockIfHeld(LockMode),
}

impl Release {
    /// How the release reads in events.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Release::Unlock(..) | Release::UnlockIfHeld(_) => "unlock",
            Release::Commit => "commit",
            Release::Rollback => "rollback",
        }
    }
}

/// Runs `release` on `conn`. A session unlock is retried once if a cancel request sent for an
/// abandoned wait arrives late and cancels it. A session unlock that reaches another backend
/// than the one that granted the lock releases nothing and fails with
/// [`Error::BackendChanged`].
pub(crate) async fn release(conn: &Conn, release: &Release, key: AdvisoryKey) -> Result<()> {
    match release {
        // Boxed: their futures are larger than the session unlock's, and every release future
        // (one per dropped guard) would otherwise be as large.
        Release::UnlockIfHeld(_) | Release::Commit | Release::Rollback => {
            Box::pin(end_transaction_or_undo(conn, release, key)).await
        }
        Release::Unlock(unlock, granted_on, mode) => {
            unlock_session(conn, unlock, *granted_on, *mode, key).await
        }
    }
}

/// The session unlock `unlock` on `conn`, of the lock in `mode` granted by the backend with pid
/// `granted_on`: see [`release`].
pub(crate) async fn unlock_session(
    conn: &Conn,
    unlock: &PreparedUnlock,
    granted_on: i32,
    mode: LockMode,
    key: AdvisoryKey,
) -> Result<()> {
    let client = conn.client();
    let (statement, checks) = (&unlock.statement, unlock.checks);
    let params = KeyParams::new(key);
    let params = params.with(checks.pid_param(&granted_on));
    // The hot path: written out rather than through `again_if_cancelled`, which costs it a few
    // hundred instructions. Once is enough here: after the last request of an abandoned wait's
    // cleanup, at most one stray cancel can still be on its way.
    let mut result = first_row(client, statement, params.as_slice()).await;
    if matches!(&result, Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::QUERY_CANCELED))
    {
        result = first_row(client, statement, params.as_slice()).await;
    }
    let row = match result {
        Err(e)
            if e.code() == Some(&tokio_postgres::error::SqlState::INVALID_SQL_STATEMENT_NAME) =>
        {
            Box::pin(unlock_unprepared(conn, key, mode, granted_on, checks))
                .await
                .map(Some)
        }
        result => result,
    }
    .map_err(|e| Error::from_postgres(Some(key), e))?
    .ok_or(Error::UnexpectedAnswer { key })?;
    let (ran_on, released) = checks.unlocked(&row);
    unlock_outcome(key, granted_on, ran_on, released)
}

/// What a guarded session unlock's answer means: the backend it ran on (`now_on`) and its
/// `released` column, NULL when it did not run because the backend is not the one that
/// granted the lock.
pub(crate) fn unlock_outcome(
    key: AdvisoryKey,
    granted_on: i32,
    now_on: i32,
    released: Option<bool>,
) -> Result<()> {
    if now_on != granted_on {
        return Err(Error::BackendChanged {
            key,
            granted_on: Some(granted_on),
            now_on: Some(now_on),
            source: None,
        });
    }
    match released {
        Some(true) => Ok(()),
        _ => Err(Error::NotHeld { key }),
    }
}

/// The releases other than a session unlock: see [`release`].
async fn end_transaction_or_undo(conn: &Conn, release: &Release, key: AdvisoryKey) -> Result<()> {
    let client = conn.client();
    match release {
        Release::Unlock(..) => unreachable!("a session unlock runs in `release`"),
        Release::UnlockIfHeld(mode) => {
            // One round trip, no prepared statement: this is a rare path.
            use tokio_postgres::types::{ToSql, Type};
            let sql = crate::sql::unlock_if_held(*mode, crate::sql::Form::of(key));
            let (classid, objid, objsubid) = key.pg_locks_ids();
            let (classid, objid) = (i64::from(classid), i64::from(objid));
            let (single, pair) = match key {
                AdvisoryKey::Single(k) => (k, (0, 0)),
                AdvisoryKey::Pair(a, b) => (0, (a, b)),
            };
            let mut params: Vec<(&(dyn ToSql + Sync), Type)> = match key {
                AdvisoryKey::Single(_) => vec![(&single, Type::INT8)],
                AdvisoryKey::Pair(..) => vec![(&pair.0, Type::INT4), (&pair.1, Type::INT4)],
            };
            params.extend([
                (&classid as &(dyn ToSql + Sync), Type::INT8),
                (&objid, Type::INT8),
                (&objsubid, Type::INT2),
            ]);
            again_if_cancelled(|| client.query_typed(&sql, &params))
                .await
                .map(drop)
                .map_err(|e| Error::from_postgres(Some(key), e))
        }
        Release::Commit => {
            // PostgreSQL answers COMMIT of a failed transaction with a rollback, not an error.
            // A statement sent just before it, in the same round trip, fails in a failed
            // transaction (25P02): that tells a rollback from a commit. Both are simple
            // queries, so this works behind transaction poolers too.
            let (probe, commit) = futures_util::future::join(
                client.simple_query("SELECT 1"),
                client.batch_execute("COMMIT"),
            )
            .await;
            commit.map_err(|e| Error::from_postgres(Some(key), e))?;
            // Whatever made the probe fail inside the transaction block (usually an earlier
            // failure, 25P02) made the COMMIT a rollback.
            probe
                .map(drop)
                .map_err(|source| Error::RolledBack { key, source })
        }
        Release::Rollback => again_if_cancelled(|| client.batch_execute("ROLLBACK"))
            .await
            .map_err(|e| Error::from_postgres(Some(key), e)),
    }
}

/// The guarded unlock sent without its prepared statement, which the server reported missing
/// (SQLSTATE 26000): someone deallocated it, or a transaction pooler moved the connection to
/// another backend. Either way what pglock remembers as prepared there is forgotten. The
/// statement still releases only on the backend that granted the lock, so on another backend
/// it releases nothing and the caller reports [`Error::BackendChanged`] with both pids.
#[cold]
async fn unlock_unprepared(
    conn: &Conn,
    key: AdvisoryKey,
    mode: LockMode,
    granted_on: i32,
    checks: Checks,
) -> Result<tokio_postgres::Row, tokio_postgres::Error> {
    conn.forget_statements();
    let form = Form::of(key);
    let sql = crate::sql::statement(Op::Unlock, mode, LockScope::Session, form, checks);
    let params = KeyParams::new(key);
    let pid = checks
        .pid_param(&granted_on)
        .map(|pid| (pid, tokio_postgres::types::Type::INT4));
    let params = params.typed(pid);
    conn.client().query_typed_one(sql, params.as_slice()).await
}

/// Runs a release statement, and runs it again if a cancel request ended it.
///
/// pglock sends cancel requests only for its own abandoned waits, but on a shared session such
/// a request travels over another connection and may land on whatever runs there when it
/// arrives, including a release (see `cancel_until_ended` in the lock module, which may send
/// several). The statements it runs (the conditional unlock, `ROLLBACK`) can safely run twice.
async fn again_if_cancelled<T, F, Fut>(mut run: F) -> Result<T, tokio_postgres::Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, tokio_postgres::Error>>,
{
    const ATTEMPTS: usize = 3;
    let mut attempt = 1;
    loop {
        let result = run().await;
        match &result {
            Err(e)
                if attempt < ATTEMPTS
                    && e.code() == Some(&tokio_postgres::error::SqlState::QUERY_CANCELED) =>
            {
                attempt += 1;
            }
            _ => return result,
        }
    }
}
