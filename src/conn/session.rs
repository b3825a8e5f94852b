//! A [`Session`]: one connection the caller owns, shared by several locks, and the keys pglock
//! reserves on it.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::{Client, Config, NoTls, Socket, Statement};

use crate::acquire::try_lock_queue::TryLockQueue;
use crate::base::cancel::{Canceller, PendingCancels};
use crate::base::database_url::{redact_url, DatabaseUrl};
use crate::base::error::{Error, Result};
use crate::base::health::{self, HealthCheck};
use crate::base::key::AdvisoryKey;
use crate::base::scope::LockScope;
use crate::conn::backend::Verification;
use crate::conn::prepared::PreparedStatements;
use crate::loss::monitor::Monitor;
use crate::release::deferred::DeferredUnlocks;
use crate::release::in_flight::ReleaseInFlight;

/// One PostgreSQL connection that pglock may share between several locks.
///
/// A `Session` wraps a [`tokio_postgres::Client`] (it derefs to it, so you can run your own
/// queries on it) and remembers which keys pglock holds on it, so that pglock never stacks a
/// session lock (PostgreSQL would count it twice, and the first release would not free it).
/// A second acquisition of a key the session holds, from another task, waits in-process until
/// the first guard is dropped, as [`CohortLock`](crate::CohortLock) waiters do; a `try_lock`
/// of it returns `Ok(None)`, as when another session holds the key. (From the task that holds
/// the guard, `lock` would wait forever, as on a pool: drop the guard first.)
///
/// # Shared by default
///
/// A session is assumed *shared*: other tasks may run their own statements on it whenever they
/// like, and nothing pglock does may disturb them. So on a shared session:
///
/// - waits poll: [`lock`](crate::AdvisoryLock::lock) and the `try_lock_for` family send
///   `pg_try_advisory_lock` attempts (pauses from 10 ms doubling up to 1 s, as
///   [`WaitStrategy::poll`](crate::WaitStrategy::poll), unless the lock sets its own polling
///   strategy). No statement of pglock's ever waits in the server's queue there, so an
///   abandoned acquisition never needs a cancel request, which would end whatever statement
///   the session runs when it arrives. Polling waiters are not served in order.
/// - transaction-scoped locks are refused ([`Error::TransactionOnSharedSession`]): their
///   transaction would take in every other task's statements, and its rollback undo their
///   writes. Use a pool, or a dedicated session.
///
/// A session that one task uses can say so with [`dedicated`](Self::dedicated): waits then
/// queue on the server (in order, cancelled when abandoned), and transaction scope is allowed.
///
/// # Examples
///
/// ```no_run
/// # async fn demo() -> pglock::Result<()> {
/// use std::sync::Arc;
/// use pglock::{AdvisoryLock, Session};
///
/// let session = Arc::new(Session::connect("postgres://postgres@localhost/test").await?);
/// let guard = AdvisoryLock::new(session.clone(), "nightly-report").lock().await?;
/// session.execute("SELECT 1", &[]).await?; // your own queries run on the same session
/// pglock::AdvisoryLockGuard::unlock(guard).await?;
/// # Ok(()) }
/// ```
pub struct Session {
    pub(super) client: Client,
    /// pglock's statements prepared here.
    pub(super) statements: PreparedStatements,
    /// Keys pglock holds here, and which of them are being cleaned up (a new acquisition of
    /// such a key waits for `cleaned`).
    held: Mutex<HashMap<AdvisoryKey, KeyState, KeyHash>>,
    cleaned: tokio::sync::Notify,
    /// Cancel requests for abandoned statements not yet over (dedicated sessions only).
    cancels: Arc<PendingCancels>,
    in_transaction: Mutex<bool>,
    /// The release a dropped guard queued last, for the next acquisition to read its answer.
    offered_release: Mutex<Weak<ReleaseInFlight>>,
    /// Whether `offered_release` may hold one, read first so that an acquisition with none
    /// offered before it takes no lock.
    offered: AtomicBool,
    /// The unlock of a dropped guard, not sent yet (see `release::deferred::DeferredUnlock`).
    pub(crate) deferred_unlocks: Arc<DeferredUnlocks>,
    /// `try_lock` requests waiting for this session's next batch (see `batch`).
    pub(crate) try_locks: TryLockQueue,
    pub(super) canceller: Canceller,
    connection_task: Option<JoinHandle<()>>,
    /// The health check of this session's loss monitor, when set with
    /// [`with_health_check`](Self::with_health_check).
    pub(super) health: Option<HealthCheck>,
    /// The loss monitor of this connection, created on the first `loss_signal()`.
    pub(super) monitor: OnceLock<Arc<Monitor>>,
    /// Set when the connection task pglock runs ends (with the reason), for [`Session::connect`].
    pub(super) closed: Option<watch::Receiver<Option<String>>>,
    /// Declared with [`behind_transaction_pooler`](Self::behind_transaction_pooler).
    pub(super) behind_pooler: bool,
    /// Declared with [`always_check_backend`](Self::always_check_backend).
    always_check: bool,
    /// Declared with [`dedicated`](Self::dedicated).
    pub(super) dedicated: bool,
    /// Whether the connection is verified as direct to a primary's backend.
    pub(super) backend: Verification,
    /// How many times the client was handed out to the caller (see [`Conn::borrows`]).
    pub(super) borrows: AtomicU64,
}

impl Session {
    /// Connects to the server at `url` (a `postgres://` URL or a key-value string) without TLS.
    ///
    /// `application_name` defaults to `pglock`, so the session is recognisable in
    /// `pg_stat_activity`. The connection task runs on the current tokio runtime and ends with
    /// the session.
    ///
    /// So that a dead network path cannot keep a lock held for hours, the connection gets TCP
    /// keepalives and a TCP user timeout on both ends, derived from the default
    /// [`HealthCheck`] (see [`HealthCheck::keepalive_timeout`]): on the client socket unless
    /// the URL sets them (`keepalives`, `keepalives_idle`, `keepalives_interval`,
    /// `keepalives_retries`, `tcp_user_timeout`), and on the server through the session
    /// settings `tcp_keepalives_idle`, `tcp_keepalives_interval`, `tcp_keepalives_count` and
    /// `tcp_user_timeout` (one statement after login).
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for a malformed URL, [`Error::Connect`] when the server cannot be
    /// reached or refuses the login. Neither message contains the password.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with_tls(url, NoTls).await
    }

    /// Connects like [`connect`](Self::connect), negotiating TLS with `tls` as the URL's
    /// `sslmode` asks.
    ///
    /// # Errors
    ///
    /// As [`connect`](Self::connect).
    pub async fn connect_with_tls<T>(url: &str, tls: T) -> Result<Self>
    where
        T: MakeTlsConnect<Socket> + Clone + Send + Sync + 'static,
        T::Stream: Send,
        T::TlsConnect: Send,
        <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
    {
        let config = parse_config(url)?;
        Self::connect_config(config, tls)
            .await
            .map_err(|source| Error::Connect {
                target: redact_url(url),
                source,
            })
    }

    /// Connects with an already parsed configuration (keepalives as the default health check
    /// wants them); cancel requests go through `tls`.
    pub(crate) async fn connect_config<T>(
        mut config: Config,
        tls: T,
    ) -> Result<Self, tokio_postgres::Error>
    where
        T: MakeTlsConnect<Socket> + Clone + Send + Sync + 'static,
        T::Stream: Send,
        T::TlsConnect: Send,
        <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
    {
        HealthCheck::default().configure_client(&mut config);
        let (client, connection) = config.connect(tls.clone()).await?;
        let (closed_tx, closed_rx) = watch::channel(None);
        // The task that drives the connection also sends the unlocks that dropped guards defer.
        let deferred_unlocks = Arc::new(DeferredUnlocks::default());
        let task = tokio::spawn(deferred_unlocks.clone().drive(connection, move |ended| {
            let detail = match ended {
                Ok(()) => "the server closed the connection".to_owned(),
                Err(error) => error.to_string(),
            };
            closed_tx.send_replace(Some(detail));
        }));
        // Best effort: a server or pooler that refuses these settings still gives a usable
        // session, only one that a dead network path keeps longer.
        let _ = health::apply_server_keepalives(&client, &HealthCheck::default()).await;
        let mut session = Session::from_client(client);
        session.deferred_unlocks = deferred_unlocks;
        session.canceller = Canceller::for_config(&config, tls);
        session.connection_task = Some(task);
        session.closed = Some(closed_rx);
        Ok(session)
    }

    /// Wraps a client whose connection task the caller already runs.
    ///
    /// Cancel requests for abandoned waits go without TLS; see
    /// [`with_cancel_tls`](Self::with_cancel_tls).
    pub fn from_client(client: Client) -> Self {
        Session {
            client,
            statements: PreparedStatements::default(),
            held: Mutex::new(HashMap::default()),
            cleaned: tokio::sync::Notify::new(),
            cancels: Arc::default(),
            in_transaction: Mutex::new(false),
            offered_release: Mutex::new(Weak::new()),
            offered: AtomicBool::new(false),
            deferred_unlocks: Arc::default(),
            try_locks: TryLockQueue::default(),
            canceller: Canceller::default(),
            connection_task: None,
            health: None,
            monitor: OnceLock::new(),
            closed: None,
            behind_pooler: false,
            always_check: false,
            dedicated: false,
            backend: Verification::default(),
            borrows: AtomicU64::new(0),
        }
    }

    /// Declares that this session's connection goes through a transaction-pooling proxy
    /// (PgBouncer with `pool_mode = transaction`, and the like).
    ///
    /// pglock then sends its statements without preparing them, so they work on poolers that
    /// do not carry prepared statements between transactions, and refuses session-scope locks
    /// with [`Error::SessionLockBehindPooler`]: use
    /// [`LockScope::Transaction`](crate::LockScope::Transaction). See `docs/pgbouncer.md`.
    pub fn behind_transaction_pooler(mut self) -> Self {
        self.behind_pooler = true;
        self
    }

    /// Declares that one task uses this session: pglock may then wait for a lock in the
    /// server's queue, cancel such a wait when it is abandoned, and open transactions for
    /// transaction-scoped locks on it.
    ///
    /// Without this declaration a session is *shared*: other tasks may run their own
    /// statements on it at any time, and pglock keeps clear of them.
    ///
    /// | | shared (the default) | `dedicated()` |
    /// |---|---|---|
    /// | [`lock`](crate::AdvisoryLock::lock), `try_lock_for` | poll with `pg_try_advisory_lock`, one short statement per attempt, with pauses from 10 ms doubling up to 1 s ([`WaitStrategy::poll`](crate::WaitStrategy::poll)); waiters are not served in order | wait in the server's lock queue ([`WaitStrategy::Block`](crate::WaitStrategy::Block), the default), served in order |
    /// | an abandoned wait | nothing to cancel: the attempt in flight is one short statement, undone behind it | cancelled on the server by cancel requests, repeated until the wait has ended |
    /// | [`LockScope::Transaction`](crate::LockScope::Transaction) | refused: [`Error::TransactionOnSharedSession`] | one pglock transaction at a time |
    ///
    /// A cancel request reaches whatever statement the session runs when it arrives, and a
    /// transaction takes in every statement sent on the session while it is open: on a session
    /// other tasks use, a dedicated session's abandoned wait could cancel their statements
    /// (SQLSTATE 57014) and a transaction-scoped lock's rollback could undo their writes.
    /// pglock's own guarantees (mutual exclusion, nothing left held) hold either way.
    ///
    /// Polling costs under contention: its waiters are not served in order, and with 8 tasks
    /// contending for one key on 8 shared sessions the longest wait in a bench run was 3.3 s,
    /// against 2.4 ms on 8 dedicated ones (`pglock_shared_session_contended_8` in
    /// docs/performance.md). Give each task that waits for a contended key a dedicated session,
    /// or take its locks from a pool.
    ///
    /// The `pglock` command uses its session from one task and declares it dedicated, so that
    /// its waits keep their place in the server's queue.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> pglock::Result<()> {
    /// use pglock::{AdvisoryLock, AdvisoryLockGuard, LockScope, Session};
    ///
    /// // One job, one connection: its lock may wait in the server's queue, in a transaction.
    /// let session = Session::connect("postgres://postgres@localhost/test").await?.dedicated();
    /// let guard = AdvisoryLock::new(session, "nightly-report")
    ///     .scope(LockScope::Transaction)
    ///     .lock()
    ///     .await?;
    /// guard.execute("INSERT INTO reports DEFAULT VALUES", &[]).await?;
    /// AdvisoryLockGuard::commit(guard).await?;
    /// # Ok(()) }
    /// ```
    pub fn dedicated(mut self) -> Self {
        self.dedicated = true;
        self
    }

    /// Keeps pglock's checks of the server in every statement on this session, instead of
    /// verifying the connection once.
    ///
    /// pglock normally checks, with the first lock it takes on a connection, that the
    /// connection is direct to a primary's backend: the backend that runs the statement is the
    /// one the login announced (in its cancel key), and the server is not a standby. Neither
    /// can change while a direct connection lives, so from then on it sends the plain
    /// statements. A pooler that may serve one client from several backends, such as
    /// PgBouncer, gives its clients cancel keys of its own, so behind it that check fails and
    /// the statements keep checking the standby state and the backend themselves. Use this
    /// behind a proxy that passes the server's own cancel key on to its clients and may still
    /// run their statements on another backend or server (say, a proxy that balances `SELECT`
    /// statements over replicas). See "Checked in every statement until the connection is
    /// verified" in `docs/design.md`.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> pglock::Result<()> {
    /// use pglock::{AdvisoryLock, Session};
    ///
    /// let session = Session::connect("postgres://postgres@balancer.internal/app")
    ///     .await?
    ///     .always_check_backend();
    /// let guard = AdvisoryLock::new(session, "nightly-report").lock().await?;
    /// # Ok(()) }
    /// ```
    pub fn always_check_backend(mut self) -> Self {
        self.always_check = true;
        self
    }

    /// Sets the health check of this session's loss monitor.
    ///
    /// One monitor probes the session for every lock held on it (one probe per interval,
    /// however many locks). This setting takes precedence over
    /// [`AdvisoryLock::health_check`](crate::AdvisoryLock::health_check) for every lock taken
    /// on the session. Without it, each watched lock keeps its own health check (its lock's,
    /// or [`HealthCheck::default`]): the monitor probes at the shortest interval among them and
    /// reports each lock's probe timeout after that lock's own `probe_timeout`, so every lock's
    /// [`detection_bound`](HealthCheck::detection_bound) holds.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> pglock::Result<()> {
    /// use std::time::Duration;
    /// use pglock::{HealthCheck, Session};
    ///
    /// let session = Session::connect("postgres://postgres@localhost/test")
    ///     .await?
    ///     .with_health_check(HealthCheck::new(Duration::from_millis(500), Duration::from_millis(500)));
    /// # Ok(()) }
    /// ```
    pub fn with_health_check(mut self, health: HealthCheck) -> Self {
        self.health = Some(health);
        self
    }

    /// Sends cancel requests (for abandoned waits) through `tls`, as the server requires.
    pub fn with_cancel_tls<T>(mut self, tls: T) -> Self
    where
        T: MakeTlsConnect<Socket> + Clone + Send + Sync + 'static,
        T::Stream: Send,
        T::TlsConnect: Send,
        <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
    {
        self.canceller = Canceller::new(tls);
        self
    }

    /// The underlying client.
    ///
    /// Statements you run on it (or on the session itself, which derefs to it) may release
    /// locks pglock holds here (`pg_advisory_unlock_all()`, `DISCARD ALL`): each call of this
    /// method or of the session's `Deref` makes the loss monitor check the server's lock table
    /// on its next probes. See [`HealthCheck`] for the bounds.
    pub fn client(&self) -> &Client {
        self.borrows.fetch_add(1, Ordering::SeqCst);
        &self.client
    }

    /// Whether pglock currently holds `key` on this session (counting a dropped guard's key
    /// until its unlock is sent, which happens when the dropping task yields).
    pub fn holds(&self, key: impl Into<AdvisoryKey>) -> bool {
        self.held.lock().unwrap().contains_key(&key.into())
    }

    /// How many keys pglock holds on this session (counting acquisitions in flight and
    /// abandoned acquisitions still being cleaned up).
    pub fn held_count(&self) -> usize {
        self.held.lock().unwrap().len()
    }

    /// Declared behind a transaction pooler, where session locks are refused.
    pub(crate) fn is_behind_pooler(&self) -> bool {
        self.behind_pooler
    }

    /// Whether a statement's answer may verify this session as direct (see `backend`).
    pub(crate) fn may_verify(&self) -> bool {
        !(self.behind_pooler || self.always_check)
    }

    /// Offers the answer of a release queued on this session to the next acquisition on it.
    pub(crate) fn offer_release(&self, release: Weak<ReleaseInFlight>) {
        let mut offered = self.offered_release.lock().unwrap();
        *offered = release;
        self.offered.store(true, Ordering::Release);
    }

    /// Takes the release offered last, if any.
    pub(crate) fn take_offered_release(&self) -> Weak<ReleaseInFlight> {
        if !self.offered.load(Ordering::Acquire) {
            return Weak::new();
        }
        let mut offered = self.offered_release.lock().unwrap();
        self.offered.store(false, Ordering::Release);
        std::mem::take(&mut *offered)
    }

    /// Whether no release offered on the session waits for its answer to be read. One offered
    /// just after this says so is harmless: unadopted, it is spawned when its answer comes.
    pub(crate) fn offered_release_answered(&self) -> bool {
        !self.offered.load(Ordering::Acquire)
            || self.offered_release.lock().unwrap().strong_count() == 0
    }

    /// How many keys pglock holds, or cleans up, on this session now.
    pub(crate) fn held_keys(&self) -> usize {
        self.held.lock().unwrap().len()
    }

    /// Marks `key` held on this session (see [`Conn::reserve`]).
    pub(super) async fn reserve(
        self: &Arc<Self>,
        key: AdvisoryKey,
        scope: LockScope,
        wait: Option<Option<tokio::time::Instant>>,
    ) -> Result<Option<Reservation>> {
        let session = self;
        // A cancel request of an abandoned statement that lands late would end this
        // acquisition's statement: wait until they are over (a round trip or two).
        if !session.cancels.none() {
            match wait.flatten() {
                Some(deadline) => {
                    if tokio::time::timeout_at(deadline, session.cancels.over())
                        .await
                        .is_err()
                    {
                        return Ok(None);
                    }
                }
                None => session.cancels.over().await,
            }
        }
        loop {
            let cleaned = {
                let mut held = session.held.lock().unwrap();
                match held.get_mut(&key) {
                    Some(KeyState::Held { .. }) if wait.is_none() => return Ok(None),
                    Some(KeyState::Held { waited } | KeyState::Cleaning { waited }) => {
                        *waited = true;
                        // Registered while the map is locked: the cleanup notifies only after
                        // it has updated the map, so the notification cannot be missed.
                        let mut cleaned = Box::pin(session.cleaned.notified());
                        cleaned.as_mut().enable();
                        cleaned
                    }
                    None => {
                        if scope == LockScope::Transaction {
                            let mut in_transaction = session.in_transaction.lock().unwrap();
                            if *in_transaction {
                                return Err(Error::TransactionInProgress);
                            }
                            *in_transaction = true;
                        }
                        held.insert(key, KeyState::HELD);
                        return Ok(Some(Reservation::on(session, key, scope)));
                    }
                }
            };
            match wait.flatten() {
                Some(deadline) => {
                    if tokio::time::timeout_at(deadline, cleaned).await.is_err() {
                        return Ok(None);
                    }
                }
                None => cleaned.await,
            }
        }
    }

    /// The cancel requests in flight on this session.
    pub(crate) fn cancels(&self) -> &Arc<PendingCancels> {
        &self.cancels
    }

    /// Marks `key` held for a session-scoped acquisition, if nothing holds or cleans it up
    /// already and no cancel request is in flight; `None` otherwise (see [`Conn::reserve`],
    /// which waits or fails then).
    pub(crate) fn try_reserve(self: &Arc<Self>, key: AdvisoryKey) -> Option<Reservation> {
        if !self.cancels.none() {
            return None;
        }
        let mut held = self.held.lock().unwrap();
        match held.entry(key) {
            std::collections::hash_map::Entry::Occupied(_) => None,
            std::collections::hash_map::Entry::Vacant(vacant) => {
                vacant.insert(KeyState::HELD);
                Some(Reservation::on(self, key, LockScope::Session))
            }
        }
    }

    pub(super) async fn prepare(
        &self,
        sql: &'static str,
    ) -> Result<Statement, tokio_postgres::Error> {
        self.statements.prepare(&self.client, sql).await
    }

    #[inline(always)]
    pub(super) fn cached(&self, sql: &'static str) -> Option<Statement> {
        self.statements.cached(sql)
    }
}

impl Deref for Session {
    type Target = Client;

    fn deref(&self) -> &Client {
        self.client()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.deferred_unlocks.stop_flusher();
        if let Some(task) = self.connection_task.take() {
            task.abort();
        }
    }
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field(
                "held",
                &self.held.lock().unwrap().keys().collect::<Vec<_>>(),
            )
            .field("closed", &self.client.is_closed())
            .finish_non_exhaustive()
    }
}

/// The hash of the keys a [`Session`] holds: a multiply-rotate hash of the key's integers
/// (as FxHash does), which costs a fraction of SipHash on every acquisition and release. The
/// map only holds the keys held on one session, so a poor distribution could only slow that
/// session's bookkeeping down, never mix two keys up.
type KeyHash = BuildHasherDefault<KeyHasher>;

#[derive(Default)]
struct KeyHasher(u64);

impl KeyHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.add(u64::from(byte));
        }
    }

    // The signed and narrower writes default to these (an enum's discriminant, then its i32 or
    // i64 fields).
    fn write_u32(&mut self, n: u32) {
        self.add(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// Parses a connection string in any form [`DatabaseUrl`] reads, defaulting `application_name`
/// to `pglock`.
pub(crate) fn parse_config(url: &str) -> Result<Config> {
    DatabaseUrl::parse(url)?.config()
}

/// A key marked as held on a shared [`Session`] while a guard or an acquisition owns it.
///
/// Dropping it clears the mark. Guards drop it right after queueing their release (a deferred
/// unlock keeps it, marked as being cleaned up, until it is sent, or passes it to the
/// acquisition that sends it): the release is ordered before anything pglock sends later on
/// the session, and PostgreSQL counts grants and releases, so a new acquisition that follows
/// can never be left holding a stacked count.
pub(crate) struct Reservation {
    session: Option<Arc<Session>>,
    key: AdvisoryKey,
    scope: LockScope,
}

impl Reservation {
    /// The reservation of `key` on `session`, whose held-key map the caller has just marked.
    pub(super) fn on(session: &Arc<Session>, key: AdvisoryKey, scope: LockScope) -> Self {
        Reservation {
            session: Some(session.clone()),
            key,
            scope,
        }
    }

    /// The reservation of a pooled connection, which holds nothing but its own locks.
    pub(crate) fn none(key: AdvisoryKey, scope: LockScope) -> Self {
        Reservation {
            session: None,
            key,
            scope,
        }
    }
}

impl Reservation {
    pub(crate) fn key(&self) -> AdvisoryKey {
        self.key
    }

    pub(crate) fn scope(&self) -> LockScope {
        self.scope
    }

    /// Undoes [`mark_cleaning`](Self::mark_cleaning): an acquisition takes the key over.
    pub(crate) fn mark_held(&self) {
        if let Some(session) = &self.session {
            let mut held = session.held.lock().unwrap();
            let state = held.entry(self.key).or_insert(KeyState::HELD);
            // Whoever waited for the cleanup finds the key held again, as if this acquisition
            // had reserved it first, and waits on for it (or reports it busy).
            *state = KeyState::Held {
                waited: state.waited(),
            };
        }
    }

    /// Keeps the key reserved, but lets new acquisitions of it wait instead of failing with
    /// [`Error::AlreadyHeld`]: the lock's owner is gone and only cleanup is left.
    pub(crate) fn mark_cleaning(&self) {
        if let Some(session) = &self.session {
            let mut held = session.held.lock().unwrap();
            let state = held.entry(self.key).or_insert(KeyState::HELD);
            if let KeyState::Held { waited } = *state {
                *state = KeyState::Cleaning { waited };
            }
        }
    }
}

/// A key pglock holds on a shared session. A new acquisition of it waits for
/// `Session::cleaned` (or, a `try_lock` of a held key, reports it busy), and says so in
/// `waited`, so that the common case, with nobody waiting, notifies nobody.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KeyState {
    /// Held by a guard or an acquisition.
    Held { waited: bool },
    /// Being cleaned up (a dropped guard's unlock not sent yet, an abandoned acquisition's
    /// undo).
    Cleaning { waited: bool },
}

impl KeyState {
    const HELD: KeyState = KeyState::Held { waited: false };

    fn waited(self) -> bool {
        match self {
            KeyState::Held { waited } | KeyState::Cleaning { waited } => waited,
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(session) = &self.session {
            let state = session.held.lock().unwrap().remove(&self.key);
            if self.scope == LockScope::Transaction {
                *session.in_transaction.lock().unwrap() = false;
            }
            // Only an acquisition of a key being cleaned up waits (see `Conn::reserve`).
            if state.is_some_and(KeyState::waited) {
                session.cleaned.notify_waiters();
            }
        }
    }
}
