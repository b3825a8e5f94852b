//! The one error type of the crate.

use std::time::Duration;

use tokio_postgres::error::SqlState;

use crate::key::AdvisoryKey;

/// A specialised `Result` whose error is [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while taking, holding or releasing an advisory lock.
///
/// Contention is not an error: [`try_lock`](crate::AdvisoryLock::try_lock) and
/// [`try_lock_for`](crate::AdvisoryLock::try_lock_for) return `Ok(None)` when the lock is busy.
///
/// Every message says what happened and what to do next. No message contains a password: a
/// connection string is only ever shown through [`redact_url`](crate::redact_url).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The connection string or another setting is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// A connection to PostgreSQL could not be established.
    #[error("could not connect to PostgreSQL at {target}: {}; check that the server is running and that the URL, user and database are right", describe(.source))]
    Connect {
        /// Where pglock tried to connect, with any password removed.
        target: String,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },

    /// TLS could not be set up with the server (see [`TlsFailure`] for why and what to do).
    ///
    /// Only the TLS connectors of [`pglock::tls`](crate#feature-flags) (feature `rustls`)
    /// report it; other connectors' failures are [`Error::Connect`].
    #[error("could not set up TLS with PostgreSQL at {target}: {failure} ({detail})")]
    Tls {
        /// Where pglock tried to connect, with any password removed.
        target: String,
        /// What went wrong, in a form a program can match on.
        failure: TlsFailure,
        /// The TLS library's own description, such as
        /// `invalid peer certificate: UnknownIssuer`.
        detail: String,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },

    /// Every connection of the pool is in use and none came free before the pool's wait timeout.
    #[error("the connection pool is exhausted: no connection came free in time; raise the pool's max_size or its wait timeout, or hold fewer locks at once (each held lock keeps one pooled connection)")]
    PoolExhausted,

    /// Another error from the deadpool connection pool.
    #[error("connection pool error: {0}")]
    Pool(#[source] deadpool_postgres::PoolError),

    /// The connection closed or failed; any lock it held has been released by the server.
    #[error("the connection to PostgreSQL was lost{}: {}; every advisory lock of that session is gone", key_suffix(.key), describe(.source))]
    ConnectionLost {
        /// The key of the lock concerned, when there is one.
        key: Option<AdvisoryKey>,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },

    /// An operation did not finish before its deadline (connecting, a health probe, a release).
    #[error("{operation} timed out after {after:?}")]
    Timeout {
        /// What timed out.
        operation: &'static str,
        /// How long pglock waited.
        after: Duration,
    },

    /// PostgreSQL's deadlock detector chose this wait as the victim (SQLSTATE 40P01).
    #[error("deadlock detected while waiting for advisory lock {key}: {}; retry, or use WaitStrategy::Poll when the holder may wait on this session (e.g. CREATE INDEX CONCURRENTLY)", describe(.source))]
    Deadlock {
        /// The key that was being waited for.
        key: AdvisoryKey,
        /// The server's error.
        #[source]
        source: tokio_postgres::Error,
    },

    /// The wait was cancelled on the server (SQLSTATE 57014: `pg_cancel_backend`,
    /// `statement_timeout`).
    #[error("the wait for advisory lock {key} was cancelled by the server: {}", describe(.source))]
    Cancelled {
        /// The key that was being waited for.
        key: AdvisoryKey,
        /// The server's error.
        #[source]
        source: tokio_postgres::Error,
    },

    /// The lock was not held by this session when pglock released it: it was lost before.
    #[error("advisory lock {key} was not held by this session at release: it was lost earlier (session ended or replaced, e.g. behind a transaction-pooling PgBouncer)")]
    NotHeld {
        /// The key that was not held.
        key: AdvisoryKey,
    },

    /// The server answered one of pglock's lock statements without the row PostgreSQL always
    /// returns for it: something between pglock and PostgreSQL (a proxy) does not pass the
    /// answers through. What the statement did is unknown; whatever it may have taken is
    /// undone (a pooled connection is closed).
    #[error("the server answered pglock's statement for advisory lock {key} without a row, which PostgreSQL never does: check what sits between this client and PostgreSQL; whatever the statement may have taken is undone")]
    UnexpectedAnswer {
        /// The lock's key.
        key: AdvisoryKey,
    },

    /// This session already holds the key through pglock.
    ///
    /// PostgreSQL would stack the lock, and the first release would then not free it. pglock
    /// no longer returns this error from an acquisition: a second acquisition of a key a
    /// [`Session`](crate::Session) holds waits in-process until the first guard is gone (or,
    /// for a `try_lock`, reports the key busy). The variant stays for code that matches it.
    #[error("advisory lock {key} is already held on this session; pglock does not stack session locks: use the guard you have, or another connection")]
    AlreadyHeld {
        /// The key already held.
        key: AdvisoryKey,
    },

    /// The connection's PostgreSQL backend changed between two statements of a lock's life: the
    /// connection goes through a transaction-pooling proxy (PgBouncer with
    /// `pool_mode = transaction`, and the like), which hands each transaction to whichever server
    /// connection is free.
    ///
    /// pglock sees it when a statement for the lock answers from another backend than the one
    /// that granted the lock (the release then releases nothing: the lock may stay held on the
    /// proxy's server connection until that connection closes), or when a statement pglock
    /// prepared on a connection it could not verify as direct is missing on the server
    /// (SQLSTATE 26000; on a verified connection that only means the statements were
    /// deallocated, and pglock prepares them again). See `docs/pgbouncer.md`.
    #[error("the PostgreSQL backend of this connection changed between statements for advisory lock {key}{}: the connection goes through a transaction-pooling proxy (such as PgBouncer with pool_mode=transaction), where session locks do not hold; use LockScope::Transaction with ConnectionSource::behind_transaction_pooler(), or connect directly or through a session-pooling port (see docs/pgbouncer.md)", backend_suffix(*.granted_on, *.now_on))]
    BackendChanged {
        /// The key of the lock concerned.
        key: AdvisoryKey,
        /// The backend that granted the lock, when pglock knows it.
        granted_on: Option<i32>,
        /// The backend that answered instead, when pglock knows it.
        now_on: Option<i32>,
        /// The server's error, when the change showed as a missing prepared statement.
        #[source]
        source: Option<tokio_postgres::Error>,
    },

    /// A session-scope lock was asked of a connection source declared to be behind a
    /// transaction pooler ([`ConnectionSource::behind_transaction_pooler`](crate::ConnectionSource::behind_transaction_pooler)).
    #[error("refusing session-scope advisory lock {key}: its connection goes through a transaction pooler, which would leave the lock on a server connection that other clients use; use LockScope::Transaction, or a direct or session-pooled connection for session locks")]
    SessionLockBehindPooler {
        /// The key that was asked for.
        key: AdvisoryKey,
    },

    /// A transaction-scoped lock was asked of a shared [`Session`](crate::Session): its
    /// transaction would take in every statement other tasks send on the session meanwhile,
    /// and its rollback would undo their writes. Nothing was sent.
    ///
    /// Take transaction-scoped locks on a pool (each lock gets its own connection), or on a
    /// session that one task uses, declared with [`Session::dedicated`](crate::Session::dedicated).
    #[error("a transaction-scoped lock ({key}) on a shared Session would pull the statements of every task using the session into its transaction; take it on a pool, or on a Session that one task uses, declared with Session::dedicated()")]
    TransactionOnSharedSession {
        /// The key asked for.
        key: AdvisoryKey,
    },

    /// The session already has a transaction open for a transaction-scoped lock.
    #[error("this session already has an open pglock transaction; finish it (commit or roll back its guard) or use another connection")]
    TransactionInProgress,

    /// The server is a read-only hot standby: advisory locks there do not coordinate with the
    /// primary.
    #[error("the server is a read-only standby (pg_is_in_recovery() is true): advisory locks taken there do not coordinate with the primary; connect to the primary instead")]
    ReadOnlyStandby,

    /// The server ran out of lock table space (SQLSTATE 53200).
    #[error("PostgreSQL is out of lock table space ({}); raise max_locks_per_transaction on the server (restart required) or hold fewer locks at once; locks already held are unaffected", describe(.source))]
    OutOfLockMemory {
        /// The server's error.
        #[source]
        source: tokio_postgres::Error,
    },

    /// The leader election's term table could not be created or updated: it is missing and
    /// this role may not create it, or this role may not write it.
    #[error("cannot use the leader term table {table}: {}; have it created beforehand (TermTable::create_sql gives the statement), grant this role SELECT, INSERT and UPDATE on it and connect read-write, or choose another table with LeaderElection::term_table", describe(.source))]
    TermTable {
        /// The table, as SQL.
        table: String,
        /// The server's error.
        #[source]
        source: tokio_postgres::Error,
    },

    /// `commit` found the transaction of a transaction-scoped lock already failed: PostgreSQL
    /// answers `COMMIT` of a failed transaction with a rollback, so none of its work was
    /// committed. The lock is released all the same.
    #[error("the transaction of advisory lock {key} had failed before the commit, so PostgreSQL rolled it back: none of its work was committed (the lock is released); {}", describe(.source))]
    RolledBack {
        /// The lock's key.
        key: AdvisoryKey,
        /// The error of the statement that found the transaction failed (usually SQLSTATE
        /// 25P02, "current transaction is aborted").
        #[source]
        source: tokio_postgres::Error,
    },

    /// Any other error reported by PostgreSQL.
    #[error("PostgreSQL error: {}", describe(.0))]
    Postgres(#[source] tokio_postgres::Error),
}

/// Why a TLS connection to the server failed ([`Error::Tls`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum TlsFailure {
    /// The server's certificate does not chain to a trusted root certificate.
    #[error("the server's certificate is not signed by a trusted certificate authority; set sslrootcert to the CA certificate that signed it (managed services publish theirs), or use sslmode=require to encrypt without verifying")]
    UntrustedCertificate,
    /// The certificate is trusted but issued for another host name than the one connected to.
    #[error("the server's certificate is not valid for the host name in the connection string; connect with a host name the certificate names, or use sslmode=verify-ca to check the certificate authority only")]
    HostnameMismatch,
    /// The certificate has expired or is not valid yet.
    #[error("the server's certificate has expired or is not valid yet; renew it on the server, or check this machine's clock")]
    CertificateExpired,
    /// The server refused TLS (`ssl = off`) while the connection string requires it.
    #[error("the server does not accept TLS connections; turn ssl on at the server, or lower sslmode to prefer or disable")]
    ServerWithoutTls,
    /// Any other handshake failure (protocol versions, ciphers, a bad certificate).
    #[error("the TLS handshake failed")]
    Handshake,
}

fn backend_suffix(granted_on: Option<i32>, now_on: Option<i32>) -> String {
    match (granted_on, now_on) {
        (Some(granted), Some(now)) => format!(" (granted on backend {granted}, now on {now})"),
        (None, Some(now)) => format!(" (now on backend {now})"),
        (Some(granted), None) => format!(" (granted on backend {granted})"),
        (None, None) => {
            " (a statement pglock prepared on this connection is missing on the server)".to_owned()
        }
    }
}

/// A driver error with the server's own words: tokio-postgres displays a server error as just
/// "db error" and keeps the message in its source.
fn describe(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => {
            let mut text = format!(
                "{}: {} (SQLSTATE {})",
                db.severity(),
                db.message(),
                db.code().code()
            );
            if let Some(detail) = db.detail() {
                text.push_str(&format!("; detail: {detail}"));
            }
            if let Some(hint) = db.hint() {
                text.push_str(&format!("; hint: {hint}"));
            }
            text
        }
        None => {
            let mut text = error.to_string();
            let mut cause = std::error::Error::source(error);
            while let Some(inner) = cause {
                let inner_text = inner.to_string();
                if !text.contains(&inner_text) {
                    text.push_str(": ");
                    text.push_str(&inner_text);
                }
                cause = inner.source();
            }
            text
        }
    }
}

fn key_suffix(key: &Option<AdvisoryKey>) -> String {
    match key {
        Some(key) => format!(" while holding or taking advisory lock {key}"),
        None => String::new(),
    }
}

impl Error {
    /// The SQLSTATE code the server sent, if this error came from the server.
    pub fn code(&self) -> Option<&SqlState> {
        match self {
            Error::Deadlock { source, .. }
            | Error::Cancelled { source, .. }
            | Error::OutOfLockMemory { source }
            | Error::ConnectionLost { source, .. }
            | Error::Connect { source, .. }
            | Error::TermTable { source, .. }
            | Error::Tls { source, .. }
            | Error::Postgres(source) => source.code(),
            Error::BackendChanged {
                source: Some(source),
                ..
            } => source.code(),
            _ => None,
        }
    }

    /// Whether the connection is gone, and with it every session lock it held.
    pub fn is_connection_lost(&self) -> bool {
        matches!(self, Error::ConnectionLost { .. })
    }

    /// Whether the server refused or dropped a new connection for a reason that passes by
    /// itself, so that connecting again later may succeed: no connection slot free (SQLSTATE
    /// 53300, "too many clients"), a server starting up, shutting down or recovering (57P03,
    /// 57P01, 57P02), a connection refused, reset or timed out while the server restarts, a host
    /// name that does not resolve yet (a container starting), a pool that cannot connect for
    /// one of these reasons.
    ///
    /// Authentication failures, a database that does not exist, TLS and configuration errors
    /// are not transient.
    pub fn is_transient(&self) -> bool {
        let source = match self {
            Error::Connect { source, .. } => source,
            Error::Pool(deadpool_postgres::PoolError::Backend(source)) => source,
            _ => return false,
        };
        match source.code() {
            Some(code) => [
                SqlState::TOO_MANY_CONNECTIONS,
                SqlState::CANNOT_CONNECT_NOW,
                SqlState::ADMIN_SHUTDOWN,
                SqlState::CRASH_SHUTDOWN,
            ]
            .contains(code),
            // No server error: the connection itself failed (refused, reset, timed out, the
            // name did not resolve) or closed during the login, as a server that is starting
            // or stopping does. The driver's other code-less errors (a password it was not
            // given, a protocol error) are not.
            None => {
                source.is_closed()
                    || std::error::Error::source(source)
                        .is_some_and(|cause| cause.is::<std::io::Error>())
            }
        }
    }

    /// Whether an operation ran past its deadline.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Timeout { .. })
    }

    /// Whether the server's deadlock detector ended the wait.
    pub fn is_deadlock(&self) -> bool {
        matches!(self, Error::Deadlock { .. })
    }

    /// Classifies a driver error raised while working on `key`.
    pub(crate) fn from_postgres(key: Option<AdvisoryKey>, error: tokio_postgres::Error) -> Self {
        // The connection is gone when the driver says so, or when reading or writing its socket
        // failed; the driver's other code-less errors (an unexpected row count, a type that
        // does not convert, ...) concern one statement of a live connection.
        let io_failed =
            std::error::Error::source(&error).is_some_and(|source| source.is::<std::io::Error>());
        if error.is_closed() || io_failed {
            return Error::ConnectionLost { key, source: error };
        }
        let code = error.code().cloned();
        match (code, key) {
            (Some(SqlState::T_R_DEADLOCK_DETECTED), Some(key)) => {
                Error::Deadlock { key, source: error }
            }
            (Some(SqlState::QUERY_CANCELED), Some(key)) => Error::Cancelled { key, source: error },
            // pglock prepares its statements on the connection before using them: one missing
            // on the server means the statement reached another backend.
            (Some(SqlState::INVALID_SQL_STATEMENT_NAME), Some(key)) => Error::BackendChanged {
                key,
                granted_on: None,
                now_on: None,
                source: Some(error),
            },
            (Some(SqlState::OUT_OF_MEMORY), _) => Error::OutOfLockMemory { source: error },
            (Some(SqlState::ADMIN_SHUTDOWN), _)
            | (Some(SqlState::CRASH_SHUTDOWN), _)
            | (Some(SqlState::IDLE_SESSION_TIMEOUT), _) => {
                Error::ConnectionLost { key, source: error }
            }
            _ => Error::Postgres(error),
        }
    }
}

/// Errors of the caller's own queries on a guard's or session's connection, so that `?` works
/// inside protected work. A dead connection becomes [`Error::ConnectionLost`].
impl From<tokio_postgres::Error> for Error {
    fn from(error: tokio_postgres::Error) -> Self {
        Error::from_postgres(None, error)
    }
}

impl From<deadpool_postgres::PoolError> for Error {
    fn from(error: deadpool_postgres::PoolError) -> Self {
        use deadpool_postgres::{PoolError, TimeoutType};
        match error {
            PoolError::Timeout(TimeoutType::Wait) => Error::PoolExhausted,
            PoolError::Backend(source) if source.code().is_none() => {
                let target = "the pool's server";
                Error::connect(target, source)
            }
            other => Error::Pool(other),
        }
    }
}

impl Error {
    /// A connection error: [`Error::Tls`] when TLS is what failed, else [`Error::Connect`].
    pub(crate) fn connect(target: &str, error: tokio_postgres::Error) -> Error {
        #[cfg(feature = "rustls")]
        if let Some((failure, detail)) = tls_failure(&error) {
            return Error::Tls {
                target: target.to_owned(),
                failure,
                detail,
                source: error,
            };
        }
        Error::Connect {
            target: target.to_owned(),
            source: error,
        }
    }
}

/// What failed in a TLS set-up, and the innermost description of it; `None` when TLS is not
/// what failed.
#[cfg(feature = "rustls")]
fn tls_failure(error: &tokio_postgres::Error) -> Option<(TlsFailure, String)> {
    use rustls::CertificateError;
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = next {
        // tokio-rustls wraps rustls's error in an io::Error, whose `source` skips it.
        let rustls_error = current.downcast_ref::<rustls::Error>().or_else(|| {
            current
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(rustls_error) = rustls_error {
            let failure = match rustls_error {
                rustls::Error::InvalidCertificate(cert) => match cert {
                    CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                        TlsFailure::UntrustedCertificate
                    }
                    CertificateError::NotValidForName
                    | CertificateError::NotValidForNameContext { .. } => {
                        TlsFailure::HostnameMismatch
                    }
                    CertificateError::Expired
                    | CertificateError::ExpiredContext { .. }
                    | CertificateError::NotValidYet
                    | CertificateError::NotValidYetContext { .. } => TlsFailure::CertificateExpired,
                    _ => TlsFailure::Handshake,
                },
                _ => TlsFailure::Handshake,
            };
            return Some((failure, rustls_error.to_string()));
        }
        // tokio-postgres's own TLS errors have no type of their own, only this text.
        let text = current.to_string();
        if text.contains("server does not support TLS") {
            return Some((TlsFailure::ServerWithoutTls, text));
        }
        next = current.source();
    }
    let text = error.to_string();
    text.starts_with("error performing TLS handshake")
        .then(|| (TlsFailure::Handshake, innermost(error)))
}

#[cfg(feature = "rustls")]
fn innermost(error: &(dyn std::error::Error + 'static)) -> String {
    let mut current = error;
    while let Some(next) = current.source() {
        current = next;
    }
    current.to_string()
}
