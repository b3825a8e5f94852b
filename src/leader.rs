//! Leader election on an advisory lock, with fencing terms.
//!
//! [`LeaderElection`] campaigns for a named leadership; the winner holds one advisory lock and
//! gets a *term*: a number, kept in a small table, that strictly increases with every new leader
//! of the name, across processes and restarts. See `docs/leader-election.md` for the guide.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Mutex, OwnedMutexGuard};
use tokio::task::JoinHandle;
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

use crate::base::error::{Error, Result};
use crate::base::health::HealthCheck;
use crate::base::key::AdvisoryKey;
use crate::base::loss::{LossReason, LossSignal};
use crate::base::scope::WaitStrategy;
use crate::base::trace;
use crate::conn::source::ConnectionSource;
use crate::guard::AdvisoryLockGuard;
use crate::lock::AdvisoryLock;

/// The default of [`LeaderElection::queue_round`]: how long a campaign waits in the server's lock
/// queue before it re-checks its connection and queues again. It bounds how long a campaign can
/// sit on a dead connection whose socket has no keepalives.
const QUEUE_ROUND: Duration = Duration::from_secs(10);

/// The shortest queue round: shorter ones would make a campaign a busy loop.
const MIN_QUEUE_ROUND: Duration = Duration::from_millis(100);

/// What this instance is, for one named leadership.
///
/// Observe it with [`LeaderElection::subscribe`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum LeaderState {
    /// Not the leader: campaigning, waiting, stopped, or just lost the leadership.
    #[default]
    Follower,
    /// The leader, in the given term.
    Leader {
        /// The fencing term of this leadership.
        term: i64,
    },
}

impl LeaderState {
    /// Whether this instance leads.
    pub fn is_leader(&self) -> bool {
        matches!(self, LeaderState::Leader { .. })
    }

    /// The term, while this instance leads.
    pub fn term(&self) -> Option<i64> {
        match self {
            LeaderState::Leader { term } => Some(*term),
            LeaderState::Follower => None,
        }
    }
}

/// The table that keeps the current term of each leadership name.
///
/// The default is `pglock_leader_terms`, resolved through the session's `search_path`. pglock
/// creates the table on first use (under an advisory lock of its own, so that concurrent first
/// campaigns do not race on `CREATE TABLE`); a role without `CREATE` privilege needs it created
/// beforehand with [`create_sql`](Self::create_sql).
///
/// # Examples
///
/// ```
/// use pglock::TermTable;
///
/// let table = TermTable::new("leader_terms").in_schema("ops");
/// assert_eq!(table.qualified_name().unwrap(), r#""ops"."leader_terms""#);
/// assert!(table.create_sql().unwrap().starts_with(r#"CREATE TABLE IF NOT EXISTS "ops"."leader_terms""#));
/// assert!(TermTable::new("").qualified_name().is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TermTable {
    schema: Option<String>,
    name: String,
}

impl Default for TermTable {
    fn default() -> Self {
        TermTable::new(TermTable::DEFAULT_NAME)
    }
}

impl TermTable {
    /// The default table name.
    pub const DEFAULT_NAME: &'static str = "pglock_leader_terms";

    /// A table called `name` (taken literally: it is quoted, never interpreted as SQL).
    pub fn new(name: impl Into<String>) -> Self {
        TermTable {
            schema: None,
            name: name.into(),
        }
    }

    /// Puts the table in `schema` instead of the first schema of the `search_path`.
    pub fn in_schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = Some(schema.into());
        self
    }

    /// The table's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The table's schema, if one was set.
    pub fn schema(&self) -> Option<&str> {
        self.schema.as_deref()
    }

    /// The table's name as SQL: each part double-quoted.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] if a part is empty, longer than PostgreSQL's 63-byte identifier limit
    /// (it would be truncated silently), or contains a NUL character.
    pub fn qualified_name(&self) -> Result<String> {
        let name = quote_identifier(&self.name)?;
        match &self.schema {
            Some(schema) => Ok(format!("{}.{name}", quote_identifier(schema)?)),
            None => Ok(name),
        }
    }

    /// The `CREATE TABLE IF NOT EXISTS` statement pglock runs on first use, for a database
    /// administrator to run beforehand when the application's role may not create tables.
    ///
    /// The role then needs `SELECT, INSERT, UPDATE` on the table.
    ///
    /// # Errors
    ///
    /// As [`qualified_name`](Self::qualified_name).
    pub fn create_sql(&self) -> Result<String> {
        Ok(format!(
            "CREATE TABLE IF NOT EXISTS {} (\n    \
             name text PRIMARY KEY,\n    \
             term bigint NOT NULL CHECK (term > 0),\n    \
             leader text,\n    \
             elected_at timestamptz NOT NULL DEFAULT now()\n)",
            self.qualified_name()?
        ))
    }

    /// The statement that starts a new term: it bumps the name's term, but only while the
    /// session holds the leadership lock exclusively, and waits at most `$6` for the row.
    ///
    /// The new term is the old one plus one, and at least the first term of the server's
    /// current timeline, `(timeline << 32) + 1` (see [`Leadership::term`]): a promoted standby
    /// writes on a new timeline, so the first term it hands out is greater than every term of
    /// the old primary, even one whose update never reached the standby.
    ///
    /// Its commit is synchronous whatever the session's `synchronous_commit`: with
    /// `synchronous_commit = off`, a crash right after the commit could lose the new term, and
    /// the next leader would get the same number again.
    fn bump_sql(&self) -> Result<String> {
        Ok(format!(
            "INSERT INTO {} AS t (name, term, leader, elected_at) \
             SELECT $1::text, bounded.first_of_timeline, $2::text, now() \
             FROM (SELECT set_config('lock_timeout', $6::text, true), \
                   set_config('synchronous_commit', 'on', true), \
                   ((('x' || substr(pg_catalog.pg_walfile_name(pg_catalog.pg_current_wal_lsn()), 1, 8))\
                     ::bit(32)::int8 << 32) + 1) AS first_of_timeline \
                   OFFSET 0) AS bounded \
             WHERE EXISTS (SELECT 1 FROM pg_catalog.pg_locks l \
                 WHERE l.locktype = 'advisory' AND l.pid = pg_catalog.pg_backend_pid() \
                 AND l.granted AND l.mode = 'ExclusiveLock' AND l.classid = $3::int8::oid \
                 AND l.objid = $4::int8::oid AND l.objsubid = $5::int2) \
             ON CONFLICT (name) DO UPDATE \
             SET term = greatest(t.term + 1, EXCLUDED.term), leader = EXCLUDED.leader, \
                 elected_at = EXCLUDED.elected_at \
             RETURNING t.term",
            self.qualified_name()?
        ))
    }
}

/// Double-quotes an identifier after checking that PostgreSQL will take it as it is.
fn quote_identifier(identifier: &str) -> Result<String> {
    if identifier.is_empty() || identifier.len() > 63 || identifier.contains('\0') {
        return Err(Error::Config(format!(
            "invalid table or schema name {identifier:?} for the leader term table: it must be 1 to 63 bytes long and contain no NUL character"
        )));
    }
    Ok(format!("\"{}\"", identifier.replace('"', "\"\"")))
}

/// The advisory lock under which term tables are created, so that concurrent first campaigns
/// never race on `CREATE TABLE IF NOT EXISTS` (which fails with a duplicate key in
/// `pg_type_typname_nsp_index` when two sessions create the same table at once).
fn ddl_key() -> i64 {
    match AdvisoryKey::from_name("pglock:leader-term-table-ddl") {
        AdvisoryKey::Single(key) => key,
        AdvisoryKey::Pair(..) => unreachable!("names map to single keys"),
    }
}

/// Campaigns for a named leadership among any number of instances, across processes.
///
/// The leader holds one session-level advisory lock (on a connection of its own, taken from
/// the [`ConnectionSource`]) and a fencing *term*. Leadership ends when the leader steps down,
/// drops its [`Leadership`], or loses its connection; a health check on the leader's connection
/// reports the loss within [`HealthCheck::detection_bound`].
///
/// Two ways to use it:
/// - [`run`](Self::run) runs a leader task whenever this instance leads, stops it when the
///   leadership is lost, campaigns again, and steps down when the task returns;
/// - [`campaign`](Self::campaign) waits for the leadership and hands you a [`Leadership`].
///
/// [`subscribe`](Self::subscribe) observes this instance's [`LeaderState`].
///
/// One `LeaderElection` is one contender: it holds at most one [`Leadership`] at a time (a
/// second campaign waits until the first leadership ends), so it never takes the leadership
/// lock twice on one session. Share it between tasks with an `Arc`.
///
/// # Examples
///
/// A singleton job that runs on exactly one instance at a time:
///
/// ```no_run
/// # async fn demo(pool: deadpool_postgres::Pool) -> pglock::Result<()> {
/// use std::time::Duration;
/// use pglock::LeaderElection;
///
/// let election = LeaderElection::new(&pool, "nightly-report");
/// election
///     .run(|leader| async move {
///         loop {
///             println!("leader in term {}: working", leader.term());
///             tokio::time::sleep(Duration::from_secs(1)).await;
///         }
///     })
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct LeaderElection {
    source: ConnectionSource,
    name: Arc<str>,
    key: AdvisoryKey,
    health: HealthCheck,
    wait: WaitStrategy,
    retry: (Duration, Duration),
    election_timeout: Duration,
    queue_round: Option<Duration>,
    table: TermTable,
    identity: String,
    state: Arc<watch::Sender<LeaderState>>,
    /// Taken by a campaign until its leadership ends: one campaign or leadership at a time
    /// per election.
    turn: Arc<Mutex<()>>,
}

impl LeaderElection {
    /// An election for the leadership called `name`, campaigning on connections from `source`.
    ///
    /// `source` is a [`deadpool_postgres::Pool`] (recommended: the leader keeps one of its
    /// connections, and a lost connection is replaced by a fresh one) or an
    /// `Arc<`[`Session`](crate::Session)`>` (once that session is closed, campaigns fail with
    /// [`Error::ConnectionLost`]).
    ///
    /// The leadership lock's key is [`AdvisoryKey::from_name`]`("leader:" + name)`; change it
    /// with [`key`](Self::key).
    pub fn new(source: impl Into<ConnectionSource>, name: impl Into<String>) -> Self {
        let name: String = name.into();
        LeaderElection {
            source: source.into(),
            key: AdvisoryKey::from_name(&format!("leader:{name}")),
            name: name.into(),
            health: HealthCheck::default(),
            wait: WaitStrategy::Block,
            retry: (Duration::from_millis(250), Duration::from_secs(5)),
            election_timeout: Duration::from_secs(10),
            queue_round: Some(QUEUE_ROUND),
            table: TermTable::default(),
            identity: format!("pid {}", std::process::id()),
            state: Arc::new(watch::channel(LeaderState::Follower).0),
            turn: Arc::new(Mutex::new(())),
        }
    }

    /// Uses `key` for the leadership lock instead of the one derived from the name.
    pub fn key(mut self, key: impl Into<AdvisoryKey>) -> Self {
        self.key = key.into();
        self
    }

    /// Sets how the leader's connection is checked; loss is reported within
    /// [`HealthCheck::detection_bound`].
    pub fn health_check(mut self, health: HealthCheck) -> Self {
        self.health = health;
        self
    }

    /// Sets how a campaign waits while another instance leads: in the server's lock queue
    /// ([`WaitStrategy::Block`], the default, which hands over within a round trip of the
    /// leader's release) or by polling. Use polling when the source is a shared
    /// [`Session`](crate::Session), which a blocked wait would occupy.
    pub fn wait_strategy(mut self, wait: WaitStrategy) -> Self {
        self.wait = wait;
        self
    }

    /// Sets the pause of [`run`](Self::run) after a failed campaign: from `initial`, doubling up
    /// to `max` (defaults 250 ms and 5 s).
    pub fn retry_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.retry = (initial, max.max(initial));
        self
    }

    /// Sets how long a new leader may take to record its term (default 10 s). Past it, the
    /// campaign gives the leadership up and fails with [`Error::Timeout`].
    pub fn election_timeout(mut self, timeout: Duration) -> Self {
        self.election_timeout = timeout;
        self
    }

    /// Sets how long a waiting campaign stays in the server's lock queue before it leaves the
    /// queue to check its connection, and joins it again at the end (default 10 s, at least
    /// 100 ms).
    ///
    /// The rounds bound how long a campaign can wait on a connection that died silently (a
    /// server that restarted behind a half-open socket), where the operating system's TCP
    /// keepalives would take hours to notice. Each round costs the campaign its place in the
    /// queue: standbys that queued later may be served first.
    ///
    /// `None` keeps the campaign's place for as long as it waits (standbys are served in the
    /// order they queued). Choose it when the connections have client-side TCP keepalives and
    /// a user timeout, as [`HealthCheck::configure_keepalives`] sets them (and
    /// [`Session::connect`](crate::Session::connect) and the `pglock` command do): they end a
    /// dead connection, and with it the campaign's wait, within
    /// [`HealthCheck::keepalive_timeout`]. With [`WaitStrategy::Poll`] nothing queues, and
    /// this setting has no effect.
    pub fn queue_round(mut self, round: Option<Duration>) -> Self {
        self.queue_round = round;
        self
    }

    /// Keeps the terms in `table` instead of `pglock_leader_terms`.
    pub fn term_table(mut self, table: TermTable) -> Self {
        self.table = table;
        self
    }

    /// Sets what this instance records as `leader` in the term table (default `pid <pid>`).
    pub fn identity(mut self, identity: impl Into<String>) -> Self {
        self.identity = identity.into();
        self
    }

    /// The leadership's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The key of the leadership lock.
    pub fn lock_key(&self) -> AdvisoryKey {
        self.key
    }

    /// This instance's state now.
    pub fn state(&self) -> LeaderState {
        *self.state.borrow()
    }

    /// A receiver that observes this instance's [`LeaderState`].
    ///
    /// The state turns [`Leader`](LeaderState::Leader) once the term is recorded, and back to
    /// [`Follower`](LeaderState::Follower) as soon as the leadership is lost (when the loss is
    /// detected), stepped down or dropped, before the lock is released.
    ///
    /// For a `Stream`, wrap the receiver in `tokio_stream::wrappers::WatchStream`.
    ///
    /// ```no_run
    /// # async fn demo(election: pglock::LeaderElection) {
    /// let mut state = election.subscribe();
    /// while state.changed().await.is_ok() {
    ///     println!("now {:?}", *state.borrow_and_update());
    /// }
    /// # }
    /// ```
    pub fn subscribe(&self) -> watch::Receiver<LeaderState> {
        self.state.subscribe()
    }

    /// Waits until this instance is the leader, and returns its [`Leadership`].
    ///
    /// The campaign takes the leadership lock, then starts a new term: it creates the term
    /// table if it does not exist yet, and increments the name's term on the lock's own
    /// session.
    ///
    /// # Errors
    ///
    /// - connection errors ([`Error::Connect`], [`Error::ConnectionLost`], pool errors);
    /// - [`Error::ReadOnlyStandby`] if the server is a standby;
    /// - [`Error::TermTable`] if the term table is missing and cannot be created, or the role
    ///   may not update it;
    /// - [`Error::Timeout`] if recording the term took longer than the
    ///   [`election_timeout`](Self::election_timeout);
    /// - [`Error::Config`] for an invalid term table name.
    ///
    /// On every error, this instance does not hold the leadership.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: dropping the future leaves no lock held and no waiter queued. If it is
    /// dropped while the term is being recorded, the term may have been used up; terms stay
    /// strictly increasing, they are just not consecutive.
    pub async fn campaign(&self) -> Result<Leadership> {
        self.table.qualified_name()?;
        let turn = self.turn.clone().lock_owned().await;
        let lock = self.lock().wait_strategy(self.wait);
        let Some(round) = self.queue_round else {
            let guard = lock.lock().await?;
            return self.elect(guard, turn).await;
        };
        loop {
            // A round trip's worth of slack on top of the server-side wait: past it, the
            // connection is presumed dead, and the attempt is dropped (which cleans up).
            let round = round.max(MIN_QUEUE_ROUND);
            let client_bound = round + self.health.probe_timeout;
            match tokio::time::timeout(client_bound, lock.try_lock_for(round)).await {
                Ok(Ok(Some(guard))) => return self.elect(guard, turn).await,
                Ok(Ok(None)) | Err(_) => {}
                Ok(Err(error)) => return Err(error),
            }
        }
    }

    /// Becomes the leader if nobody leads now; `Ok(None)` otherwise.
    ///
    /// # Errors
    ///
    /// As [`campaign`](Self::campaign).
    ///
    /// # Cancel safety
    ///
    /// As [`campaign`](Self::campaign).
    pub async fn try_campaign(&self) -> Result<Option<Leadership>> {
        self.table.qualified_name()?;
        let Ok(turn) = self.turn.clone().try_lock_owned() else {
            return Ok(None);
        };
        match self.lock().try_lock().await? {
            Some(guard) => self.elect(guard, turn).await.map(Some),
            None => Ok(None),
        }
    }

    /// Runs `task` whenever this instance leads, until the task returns.
    ///
    /// The loop: campaign; once leader, call `task` with a [`LeaderContext`] and drive the
    /// future it returns. If the leadership is lost meanwhile, the future is dropped (so the
    /// task stops at its current `.await`), and the loop campaigns again. When the future
    /// completes, the instance steps down at once, so a standby takes over without waiting for
    /// a timeout, and `run` returns the task's output.
    ///
    /// A campaign that fails for a passing reason (connection refused or lost, server
    /// restarting, pool exhausted, timeout) is retried after a pause (see
    /// [`retry_backoff`](Self::retry_backoff)).
    ///
    /// Between the leader's loss and its detection (at most [`HealthCheck::detection_bound`]), the
    /// old task may still run while a new leader already leads: guard every write to a shared
    /// resource with [`LeaderContext::term`] (see `docs/leader-election.md`).
    ///
    /// # Errors
    ///
    /// Only errors that retrying cannot fix: [`Error::Config`], [`Error::TermTable`],
    /// [`Error::SessionLockBehindPooler`], [`Error::Tls`] for a certificate that does not
    /// verify (not for a failed handshake), and [`Error::ConnectionLost`] when the source is a
    /// [`Session`](crate::Session) that closed.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future stops the task and steps down: the release of the leadership lock
    /// is sent as soon as the dropping task yields (as when an [`AdvisoryLockGuard`] is
    /// dropped), so a standby takes over within about a round trip. Use this for graceful shutdown:
    ///
    /// ```no_run
    /// # async fn demo(election: pglock::LeaderElection) -> pglock::Result<()> {
    /// tokio::select! {
    ///     result = election.run(|leader| async move { /* work */ }) => result?,
    ///     _ = tokio::signal::ctrl_c() => {} // steps down as `run` is dropped
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn run<F, Fut, T>(&self, mut task: F) -> Result<T>
    where
        F: FnMut(LeaderContext) -> Fut,
        Fut: Future<Output = T>,
    {
        let mut pause = self.retry.0;
        loop {
            let mut leadership = match self.campaign().await {
                Ok(leadership) => leadership,
                Err(error) if self.is_permanent(&error) => return Err(error),
                Err(_) => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(self.retry.1);
                    continue;
                }
            };
            pause = self.retry.0;
            let work = task(leadership.context());
            tokio::select! {
                biased;
                _ = leadership.lost() => {
                    // The task future is dropped here, before anything else happens.
                }
                output = work => {
                    // The lock is released whatever step_down reports: on error its
                    // connection is closed.
                    let _ = leadership.step_down().await;
                    return Ok(output);
                }
            }
        }
    }

    fn lock(&self) -> AdvisoryLock {
        AdvisoryLock::new(self.source.clone(), self.key).health_check(self.health)
    }

    fn is_permanent(&self, error: &Error) -> bool {
        match error {
            Error::Config(_)
            | Error::TermTable { .. }
            | Error::AlreadyHeld { .. }
            | Error::SessionLockBehindPooler { .. }
            | Error::TransactionOnSharedSession { .. }
            | Error::TransactionInProgress => true,
            // A certificate that does not verify will not verify on the next attempt either.
            Error::Tls { failure, .. } => *failure != crate::TlsFailure::Handshake,
            Error::ConnectionLost { .. } => self.source.is_closed_session(),
            _ => false,
        }
    }

    /// Starts a term for a freshly granted leadership lock.
    async fn elect(
        &self,
        guard: AdvisoryLockGuard,
        turn: OwnedMutexGuard<()>,
    ) -> Result<Leadership> {
        let client_bound = self.election_timeout + self.health.probe_timeout;
        let term = match tokio::time::timeout(client_bound, self.start_term(&guard)).await {
            Ok(Ok(term)) => term,
            Ok(Err(error)) => return Err(error),
            Err(_) => {
                return Err(Error::Timeout {
                    operation: "recording the new leader term",
                    after: client_bound,
                })
            }
        };
        // Watching starts once the term is recorded: the term statement may wait for the term
        // row longer than a probe may take. The monitor probes at once, so a loss during the
        // election is still reported within the detection bound.
        let loss = AdvisoryLockGuard::loss_signal(&guard);
        self.state.send_replace(LeaderState::Leader { term });
        let key = self.key;
        trace::leadership_acquired(
            &self.name,
            key,
            term,
            AdvisoryLockGuard::backend_pid(&guard),
        );
        // Observers see the leadership end as soon as its loss is detected.
        let mut on_loss = loss.clone();
        let state = self.state.clone();
        let name = self.name.clone();
        let watcher = tokio::spawn(async move {
            let reason = on_loss.lost().await;
            if demote(&state, term) && !matches!(reason, LossReason::Released) {
                trace::leadership_lost(&name, key, term, &reason);
            }
        });
        Ok(Leadership {
            guard: Some(guard),
            watcher,
            context: LeaderContext {
                name: self.name.clone(),
                term,
                loss,
            },
            key,
            state: self.state.clone(),
            step_down_timeout: self.health.probe_timeout.max(Duration::from_secs(1)),
            _turn: turn,
        })
    }

    /// Increments the name's term on the lock's session, creating the table first if needed.
    async fn start_term(&self, guard: &AdvisoryLockGuard) -> Result<i64> {
        let bump = self.table.bump_sql()?;
        let (classid, objid, objsubid) = self.key.pg_locks_ids();
        let lock_timeout = format!("{}ms", self.election_timeout.as_millis().max(1));
        let mut created = false;
        loop {
            // pglock's own statement: not a borrow that could release the lock (see `loss`).
            let result = guard
                .pglock_client()
                .query_opt(
                    bump.as_str(),
                    &[
                        &&*self.name,
                        &self.identity,
                        &i64::from(classid),
                        &i64::from(objid),
                        &objsubid,
                        &lock_timeout,
                    ],
                )
                .await;
            match result {
                Ok(Some(row)) => return Ok(row.get(0)),
                Ok(None) => {
                    return Err(Error::NotHeld {
                        key: AdvisoryLockGuard::key(guard),
                    })
                }
                Err(error) if error.code() == Some(&SqlState::UNDEFINED_TABLE) && !created => {
                    self.create_table(guard.pglock_client()).await?;
                    created = true;
                }
                Err(error) => return Err(self.term_table_error(error)),
            }
        }
    }

    /// Creates the term table under the DDL advisory lock, in one implicit transaction.
    async fn create_table(&self, client: &Client) -> Result<()> {
        let create = self.table.create_sql()?;
        let lock_timeout = self.election_timeout.as_millis().max(1);
        // One simple-query message: its statements run as one transaction, so the
        // transaction-level advisory lock covers the CREATE and ends with it. The only values
        // spliced in are a number and identifiers quoted by `qualified_name`.
        let batch = format!(
            "SELECT set_config('lock_timeout', '{lock_timeout}ms', true); \
             SELECT pg_advisory_xact_lock({}::int8); \
             {create}",
            ddl_key()
        );
        match client.batch_execute(&batch).await {
            Ok(()) => Ok(()),
            // Created meanwhile by something that did not take the DDL lock.
            Err(error)
                if matches!(
                    error.code(),
                    Some(&SqlState::DUPLICATE_TABLE) | Some(&SqlState::UNIQUE_VIOLATION)
                ) =>
            {
                Ok(())
            }
            Err(error) => Err(self.term_table_error(error)),
        }
    }

    fn term_table_error(&self, error: tokio_postgres::Error) -> Error {
        match error.code() {
            // A standby was already refused by the lock statement (pg_is_in_recovery), so a
            // read-only error here comes from default_transaction_read_only or the like.
            Some(&SqlState::READ_ONLY_SQL_TRANSACTION)
            | Some(&SqlState::INSUFFICIENT_PRIVILEGE)
            | Some(&SqlState::UNDEFINED_TABLE)
            | Some(&SqlState::INVALID_SCHEMA_NAME)
            | Some(&SqlState::UNDEFINED_COLUMN)
            | Some(&SqlState::INVALID_COLUMN_REFERENCE)
            | Some(&SqlState::CHECK_VIOLATION) => Error::TermTable {
                table: self
                    .table
                    .qualified_name()
                    .unwrap_or_else(|_| self.table.name.clone()),
                source: error,
            },
            Some(&SqlState::LOCK_NOT_AVAILABLE) => Error::Timeout {
                operation: "waiting for the leader term row",
                after: self.election_timeout,
            },
            _ => Error::from_postgres(Some(self.key), error),
        }
    }
}

/// Turns `Leader { term }` into `Follower`, unless the state has moved on to another term.
/// Turns `term`'s leadership into a follower state; whether it was still the leader.
fn demote(state: &watch::Sender<LeaderState>, term: i64) -> bool {
    state.send_if_modified(|current| {
        if *current == (LeaderState::Leader { term }) {
            *current = LeaderState::Follower;
            true
        } else {
            false
        }
    })
}

/// This instance's leadership: the leadership lock, held, and the term it started.
///
/// Dropping it steps down in the background (the release is sent as soon as the dropping task
/// yields, so a standby takes over within about a round trip); [`step_down`](Self::step_down) does the same and reports
/// how it went.
///
/// # Examples
///
/// ```no_run
/// # async fn demo(election: pglock::LeaderElection) -> pglock::Result<()> {
/// let mut leadership = election.campaign().await?;
/// let term = leadership.term();
/// tokio::select! {
///     reason = leadership.lost() => eprintln!("lost the leadership of term {term}: {reason:?}"),
///     _ = async { /* the leader's work, writing with `term` */ } => {
///         leadership.step_down().await?;
///     }
/// }
/// # Ok(()) }
/// ```
#[must_use = "if unused the leadership is given up immediately"]
pub struct Leadership {
    guard: Option<AdvisoryLockGuard>,
    watcher: JoinHandle<()>,
    /// The name, the term and the loss signal, as handed to leader tasks.
    context: LeaderContext,
    /// The leadership lock's key (for events).
    key: AdvisoryKey,
    state: Arc<watch::Sender<LeaderState>>,
    step_down_timeout: Duration,
    _turn: OwnedMutexGuard<()>,
}

impl Leadership {
    /// The fencing term: greater than the term of every earlier leader of this name.
    ///
    /// A term is `(timeline << 32) + n`: the PostgreSQL timeline the primary wrote on when
    /// the term was started (the high 32 bits), and a count within it (the low 32 bits, from 1).
    /// A promoted standby starts a new timeline, so every term it hands out compares greater than
    /// every term of the old primary, including one whose update the standby never received
    /// (asynchronous replication). Compare terms as whole numbers; `term >> 32` is the timeline.
    ///
    /// ```
    /// let term: i64 = (1 << 32) + 7; // the 7th term on timeline 1
    /// assert_eq!((term >> 32, term & 0xffff_ffff), (1, 7));
    /// assert!(((2_i64 << 32) + 1) > term); // the first term after a promotion
    /// ```
    pub fn term(&self) -> i64 {
        self.context.term()
    }

    /// The leadership's name.
    pub fn name(&self) -> &str {
        self.context.name()
    }

    /// Whether the leadership is known to be lost (cheap; no round trip).
    pub fn is_lost(&self) -> bool {
        self.context.is_lost()
    }

    /// Completes when the leadership is lost, with the reason.
    ///
    /// Loss is detected within the [`HealthCheck::detection_bound`] of the election's health check.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: use it in `tokio::select!`; a later call completes on the same loss.
    pub async fn lost(&mut self) -> LossReason {
        self.context.lost().await
    }

    /// A cloneable signal of this leadership's loss, for other tasks.
    pub fn loss_signal(&self) -> LossSignal {
        self.context.loss_signal()
    }

    /// What a leader task needs: the name, the term and the loss signal.
    pub fn context(&self) -> LeaderContext {
        self.context.clone()
    }

    fn guard(&self) -> &AdvisoryLockGuard {
        self.guard
            .as_ref()
            .expect("a leadership holds its lock until it ends")
    }

    /// The connection that holds the leadership lock.
    ///
    /// Statements on it run only while this session holds the lock: if the session has
    /// ended, they fail. Keep them short: the health probe queues behind them.
    pub fn client(&self) -> &Client {
        self.guard()
    }

    /// The PostgreSQL backend process that holds the leadership lock.
    pub fn backend_pid(&self) -> i32 {
        AdvisoryLockGuard::backend_pid(self.guard())
    }

    /// Steps down now: releases the leadership lock, so that a waiting standby takes over
    /// within about a round trip.
    ///
    /// The state turns [`Follower`](LeaderState::Follower) before the lock is released.
    ///
    /// # Errors
    ///
    /// - [`Error::NotHeld`] or [`Error::ConnectionLost`] if the leadership had been lost;
    /// - [`Error::Timeout`] if the server did not confirm the release in time (the larger of
    ///   the probe timeout and 1 s); the connection is then closed.
    ///
    /// Whatever the result, this instance no longer holds the leadership lock: a release that
    /// is not confirmed closes a pooled connection, and the server frees the lock as the
    /// session ends.
    ///
    /// # Cancel safety
    ///
    /// If the future is dropped, the release still happens in the background.
    pub async fn step_down(mut self) -> Result<()> {
        if demote(&self.state, self.term()) {
            trace::leadership_released(self.name(), self.key, self.term(), "step_down");
        }
        let guard = self
            .guard
            .take()
            .expect("a leadership holds its lock until it ends");
        let after = self.step_down_timeout;
        match tokio::time::timeout(after, AdvisoryLockGuard::unlock(guard)).await {
            Ok(result) => result,
            Err(_) => Err(Error::Timeout {
                operation: "stepping down (releasing the leadership lock)",
                after,
            }),
        }
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        if demote(&self.state, self.term()) {
            trace::leadership_released(self.name(), self.key, self.term(), "drop");
        }
        self.watcher.abort();
    }
}

impl std::fmt::Debug for Leadership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leadership")
            .field("name", &self.name())
            .field("term", &self.term())
            .field("lost", &self.is_lost())
            .finish_non_exhaustive()
    }
}

/// What [`LeaderElection::run`] hands the leader task: the term and the loss signal.
///
/// Cheap to clone into the task's own sub-tasks.
#[derive(Clone, Debug)]
pub struct LeaderContext {
    name: Arc<str>,
    term: i64,
    loss: LossSignal,
}

impl LeaderContext {
    /// The fencing term of this leadership: pass it with every write to a shared resource.
    pub fn term(&self) -> i64 {
        self.term
    }

    /// The leadership's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the leadership is known to be lost.
    pub fn is_lost(&self) -> bool {
        self.loss.is_lost()
    }

    /// Completes when the leadership is lost. Cancel-safe.
    pub async fn lost(&mut self) -> LossReason {
        self.loss.lost().await
    }

    /// A cloneable signal of this leadership's loss.
    pub fn loss_signal(&self) -> LossSignal {
        self.loss.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_quoted_and_checked() {
        assert_eq!(quote_identifier("a\"b").unwrap(), "\"a\"\"b\"");
        assert_eq!(
            TermTable::new("t; DROP TABLE x").qualified_name().unwrap(),
            "\"t; DROP TABLE x\""
        );
        assert!(quote_identifier(&"x".repeat(64)).is_err());
        assert!(quote_identifier("a\0b").is_err());
        assert!(TermTable::new("t").in_schema("").qualified_name().is_err());
        assert_eq!(
            TermTable::default().qualified_name().unwrap(),
            "\"pglock_leader_terms\""
        );
    }

    #[test]
    fn state_accessors() {
        assert!(!LeaderState::Follower.is_leader());
        assert_eq!(LeaderState::Leader { term: 3 }.term(), Some(3));
        let (tx, _rx) = watch::channel(LeaderState::Leader { term: 3 });
        demote(&tx, 2);
        assert_eq!(*tx.borrow(), LeaderState::Leader { term: 3 });
        demote(&tx, 3);
        assert_eq!(*tx.borrow(), LeaderState::Follower);
    }
}
