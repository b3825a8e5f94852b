//! Who holds which advisory lock, and who waits for it: `pg_locks` joined with
//! `pg_stat_activity`, as typed rows.
//!
//! ```no_run
//! # async fn demo(client: &tokio_postgres::Client) -> pglock::Result<()> {
//! use pglock::introspect::Introspect;
//!
//! for lock in Introspect::new().name("migrations").fetch(client).await? {
//!     let state = if lock.granted { "holds" } else { "waits for" };
//!     println!(
//!         "pid {:?} ({}) {state} {} {:?}",
//!         lock.pid,
//!         lock.application_name.as_deref().unwrap_or("?"),
//!         lock.name.as_deref().unwrap_or("?"),
//!         lock.key,
//!     );
//! }
//! # Ok(()) }
//! ```
//!
//! # What PostgreSQL can and cannot tell
//!
//! - **Key, mode, holder or waiter, pid** come straight from `pg_locks`, exactly.
//! - **Name**: PostgreSQL only stores the 64-bit key. A [`LockInfo::name`] is given when a name
//!   hashes to the key ([`AdvisoryKey::from_name`]): a name you registered with
//!   [`Introspect::name`], or the name that the `pglock` command puts in its
//!   `application_name` (`pglock run NAME`; `pglock leader NAME`, whose lock is the key of
//!   `leader:NAME`; non-ASCII percent-encoded, see [`application_name`]), which then names
//!   every row of that key, waiters included. A lock taken by other code (an Alembic `env.py`
//!   that takes the key of `migrations` itself) has no name unless you register it.
//! - **Scope** (session or transaction) is not recorded in `pg_locks`. A lock held by a
//!   session that has no transaction open is a session lock: that is certain. Otherwise
//!   pglock infers the scope from the statement the session runs or ran last, when that
//!   statement calls advisory lock functions of one scope only (for a waiter it is the very
//!   statement that waits; for a holder it must also be its only advisory lock). Anything
//!   else is reported as `None` rather than guessed.
//! - **Since when a lock is held** is not recorded either. [`LockInfo::held_since`] is the
//!   moment the session's last statement ended, when that statement took an advisory lock,
//!   the session has been idle since, and it holds only this advisory lock: which is how a
//!   pglock guard looks until its loss detection starts probing (every probe is a statement
//!   too, so a watched lock's grant time cannot be told; [`LockInfo::backend_start`] then
//!   bounds it from below). For waiters, [`LockInfo::wait_start`] is exact (PostgreSQL 14
//!   and later).
//! - `pg_locks` and `pg_stat_activity` are read in one statement but are not one atomic
//!   snapshot: a session that ends between the two reads shows without its activity columns.
//! - Without the `pg_read_all_stats` role, the activity of other users' sessions (client
//!   address, statement, times) reads as `NULL`, and so shows as `None` here.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::SystemTime;

use tokio_postgres::{Client, Row};

use crate::base::error::{Error, Result};
use crate::base::key::AdvisoryKey;
use crate::base::scope::{LockMode, LockScope};

/// The prefix of the `application_name` that the `pglock` command gives its connections, as in
/// `pglock run migrations`.
pub const APPLICATION_NAME_PREFIX: &str = "pglock ";

/// The longest `application_name` PostgreSQL keeps (`NAMEDATALEN - 1` bytes); longer ones are
/// truncated by the server.
pub const APPLICATION_NAME_MAX: usize = 63;

/// One advisory lock held or awaited by one backend, with what `pg_stat_activity` says about
/// that backend.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct LockInfo {
    /// The lock's key.
    pub key: AdvisoryKey,
    /// The name that hashes to the key, where pglock can tell (see the module docs).
    pub name: Option<String>,
    /// Exclusive or shared.
    pub mode: LockMode,
    /// `true` for a holder, `false` for a waiter.
    pub granted: bool,
    /// Session or transaction scope, where it can be told (see the module docs).
    pub scope: Option<LockScope>,
    /// The backend's process id; `None` for a lock held by a prepared transaction.
    pub pid: Option<i32>,
    /// The backend's `application_name`.
    pub application_name: Option<String>,
    /// The role the backend is logged in as.
    pub user: Option<String>,
    /// The client's address; `None` for a Unix socket connection (or without the privilege
    /// to see it).
    pub client_addr: Option<IpAddr>,
    /// The client's TCP port.
    pub client_port: Option<i32>,
    /// When the backend (the client's connection) started.
    pub backend_start: Option<SystemTime>,
    /// When the backend's current transaction started; `None` when it has none open.
    pub transaction_start: Option<SystemTime>,
    /// The backend's state: `active`, `idle`, `idle in transaction`, ...
    pub state: Option<String>,
    /// When a waiter started to wait (PostgreSQL 14 and later); `None` for holders.
    pub wait_start: Option<SystemTime>,
    /// When a holder got the lock, where it can be told (see the module docs).
    pub held_since: Option<SystemTime>,
    /// For a waiter, the pids it waits behind (`pg_blocking_pids`): holders of a conflicting
    /// mode and waiters queued ahead of it. Empty for holders.
    pub blocked_by: Vec<i32>,
    /// Where the key sits in a [`Semaphore`](crate::Semaphore) whose name pglock knows (one
    /// registered with [`Introspect::semaphore`], or held by `pglock run --slots`); `name` is
    /// then the semaphore's name.
    pub semaphore: Option<SemaphoreKey>,
}

/// A key of a [`Semaphore`](crate::Semaphore): one of its slots, or its queue (the gate key
/// its waiters wait for, held by the waiter at the head of the queue).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SemaphoreKey {
    /// The slot, from 0; `None` for the queue.
    pub slot: Option<u32>,
    /// The semaphore's number of slots.
    pub permits: u32,
}

impl SemaphoreKey {
    /// `key` as a key of the semaphore with `space` ([`AdvisoryKey::semaphore_space`]) and
    /// `permits` slots, if it is one.
    fn of(key: AdvisoryKey, space: i32, permits: u32) -> Option<Self> {
        match key {
            AdvisoryKey::Pair(a, -1) if a == space => Some(SemaphoreKey {
                slot: None,
                permits,
            }),
            AdvisoryKey::Pair(a, b) if a == space && b >= 0 && (b as u32) < permits => {
                Some(SemaphoreKey {
                    slot: Some(b as u32),
                    permits,
                })
            }
            _ => None,
        }
    }
}

impl LockInfo {
    /// The lock's name if known, else its key, for display; a semaphore's keys as
    /// `NAME [slot k of N]` and `NAME [queue of N]`.
    pub fn label(&self) -> String {
        let name = match &self.name {
            Some(name) => name.clone(),
            None => self.key.to_string(),
        };
        match self.semaphore {
            Some(SemaphoreKey {
                slot: Some(slot),
                permits,
            }) => format!("{name} [slot {slot} of {permits}]"),
            Some(SemaphoreKey {
                slot: None,
                permits,
            }) => format!("{name} [queue of {permits}]"),
            None => name,
        }
    }

    /// Whether the backend is a `pglock` command (by its `application_name`).
    pub fn is_pglock_command(&self) -> bool {
        self.application_name
            .as_deref()
            .is_some_and(|app| app.starts_with(APPLICATION_NAME_PREFIX))
    }
}

/// A query for the advisory locks of the current database.
///
/// Built with [`new`](Self::new), narrowed with [`key`](Self::key) and
/// [`name`](Self::name), and run with [`fetch`](Self::fetch) on any client of the database.
/// Rows come ordered by key, then holders before waiters, waiters in the order they started
/// to wait, then by pid.
#[derive(Clone, Debug, Default)]
pub struct Introspect {
    names: HashMap<AdvisoryKey, String>,
    /// Semaphores by key space: name and number of slots.
    semaphores: HashMap<i32, (String, u32)>,
    keys: Vec<AdvisoryKey>,
    only_selected: bool,
}

impl Introspect {
    /// All advisory locks of the current database.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `name`, so that rows of its key carry it in [`LockInfo::name`].
    ///
    /// Registering a name does not filter; see [`only`](Self::only).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        let name = name.into();
        self.names.insert(AdvisoryKey::from_name(&name), name);
        self
    }

    /// Selects `key` (a name, a number or a pair, as for [`AdvisoryLock::new`](crate::AdvisoryLock::new)).
    /// Once any key is selected, [`fetch`](Self::fetch) returns the rows of the selected keys
    /// only. A name passed here is also registered, as by [`name`](Self::name).
    pub fn key(mut self, key: impl Into<SelectKey>) -> Self {
        let SelectKey { key, name } = key.into();
        if let Some(name) = name {
            self.names.insert(key, name);
        }
        self.keys.push(key);
        self.only_selected = true;
        self
    }

    /// Selects the keys of the [`Semaphore`](crate::Semaphore) `name` with `permits` slots:
    /// its slots and its queue, whose rows then carry [`LockInfo::semaphore`] and the name.
    pub fn semaphore(mut self, name: impl Into<String>, permits: u32) -> Self {
        let name = name.into();
        let space = AdvisoryKey::semaphore_space(&name);
        self.keys.push(AdvisoryKey::Pair(space, -1));
        for slot in 0..permits.min(i32::MAX as u32) {
            self.keys.push(AdvisoryKey::Pair(space, slot as i32));
        }
        self.semaphores.insert(space, (name, permits));
        self.only_selected = true;
        self
    }

    /// Restricts the result to the keys of the names registered so far (and keys selected).
    pub fn only(mut self) -> Self {
        self.keys.extend(self.names.keys().copied());
        self.only_selected = true;
        self
    }

    /// Runs the query on `client` (one round trip).
    ///
    /// # Errors
    ///
    /// [`Error::ConnectionLost`] if the connection is gone, [`Error::Postgres`] for a server
    /// error.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: it only reads.
    pub async fn fetch(&self, client: &Client) -> Result<Vec<LockInfo>> {
        let (hi, lo, sub) = self.selected_ids();
        let rows = client
            .query(LIST_SQL, &[&!self.only_selected, &hi, &lo, &sub])
            .await
            .map_err(Error::from)?;
        let held = held_per_pid(&rows);
        let mut locks: Vec<LockInfo> = rows
            .iter()
            .filter_map(|row| self.lock_info(row, &held))
            .collect();
        spread_names(&mut locks);
        Ok(locks)
    }

    /// The selected keys as `pg_locks` identifies them, in three arrays for the query:
    /// `classid`, `objid`, `objsubid`.
    fn selected_ids(&self) -> (Vec<i64>, Vec<i64>, Vec<i16>) {
        let mut hi = Vec::with_capacity(self.keys.len());
        let mut lo = Vec::with_capacity(self.keys.len());
        let mut sub = Vec::with_capacity(self.keys.len());
        for key in &self.keys {
            let (classid, objid, objsubid) = key.pg_locks_ids();
            hi.push(i64::from(classid));
            lo.push(i64::from(objid));
            sub.push(objsubid);
        }
        (hi, lo, sub)
    }

    /// One row of the query as a [`LockInfo`], named where this introspection can tell;
    /// `None` for a row whose ids are not an advisory key's. `held` counts the advisory locks
    /// each backend holds (see [`held_per_pid`]).
    fn lock_info(&self, row: &Row, held: &HashMap<i32, usize>) -> Option<LockInfo> {
        let classid: i64 = row.get("classid");
        let objid: i64 = row.get("objid");
        let objsubid: i16 = row.get("objsubid");
        let key = AdvisoryKey::from_pg_locks_ids(classid as u32, objid as u32, objsubid)?;
        let mode = match row.get::<_, &str>("mode") {
            "ShareLock" => LockMode::Shared,
            _ => LockMode::Exclusive,
        };
        let granted: bool = row.get("granted");
        let pid: Option<i32> = row.get("pid");
        let application_name: Option<String> = row.get("application_name");
        let state: Option<String> = row.get("state");
        let transaction_start: Option<SystemTime> = row.get("xact_start");
        let (scope, held_since) = inferred_scope(row, granted, pid, held);
        let semaphore = self.semaphore_of(key, application_name.as_deref());
        let name = match &semaphore {
            Some((name, _)) => Some(name.clone()),
            None => self
                .names
                .get(&key)
                .cloned()
                .or_else(|| name_from_application_name(application_name.as_deref()?, key)),
        };
        Some(LockInfo {
            key,
            name,
            mode,
            granted,
            scope,
            pid,
            application_name,
            user: row.get("usename"),
            client_addr: row.get("client_addr"),
            client_port: row.get("client_port"),
            backend_start: row.get("backend_start"),
            transaction_start,
            state,
            wait_start: row.get("waitstart"),
            held_since,
            blocked_by: row.get("blocked_by"),
            semaphore: semaphore.map(|(_, at)| at),
        })
    }

    /// The semaphore `key` belongs to, with its place there: one registered, or the one a
    /// `pglock run --slots N NAME` names in its `application_name` (`pglock run/N NAME`).
    fn semaphore_of(
        &self,
        key: AdvisoryKey,
        application_name: Option<&str>,
    ) -> Option<(String, SemaphoreKey)> {
        let AdvisoryKey::Pair(space, _) = key else {
            return None;
        };
        if let Some((name, permits)) = self.semaphores.get(&space) {
            return SemaphoreKey::of(key, space, *permits).map(|at| (name.clone(), at));
        }
        let rest = application_name?.strip_prefix(APPLICATION_NAME_PREFIX)?;
        let (command, written) = rest.split_once(' ')?;
        let permits: u32 = command.strip_prefix("run/")?.parse().ok()?;
        let decoded = percent_decode(written);
        std::iter::once(written.to_owned())
            .chain(decoded)
            .find(|name| AdvisoryKey::semaphore_space(name) == space)
            .and_then(|name| SemaphoreKey::of(key, space, permits).map(|at| (name, at)))
    }
}

/// How many advisory locks each backend of `rows` holds.
fn held_per_pid(rows: &[Row]) -> HashMap<i32, usize> {
    let mut held: HashMap<i32, usize> = HashMap::new();
    for row in rows {
        let granted: bool = row.get("granted");
        if let (true, Some(pid)) = (granted, row.get::<_, Option<i32>>("pid")) {
            *held.entry(pid).or_default() += 1;
        }
    }
    held
}

/// A row's scope and, for a holder, since when it holds, as far as they can be told (see the
/// module docs): a holder with no transaction open holds a session lock; otherwise the scope is
/// that of the statement the backend runs or ran last, when it is the backend's only advisory
/// lock (or the row is a waiter, whose statement is the one waiting).
fn inferred_scope(
    row: &Row,
    granted: bool,
    pid: Option<i32>,
    held: &HashMap<i32, usize>,
) -> (Option<LockScope>, Option<SystemTime>) {
    let state: Option<&str> = row.get("state");
    let query: Option<&str> = row.get("query");
    let in_transaction = row.get::<_, Option<SystemTime>>("xact_start").is_some();
    let only_lock = pid.is_some_and(|pid| held.get(&pid) == Some(&1));
    let statement_scope = query.and_then(lock_statement_scope);
    let idle = matches!(state, Some("idle" | "idle in transaction"));
    let scope = if granted && !in_transaction && pid.is_some() {
        Some(LockScope::Session)
    } else if !granted || only_lock {
        statement_scope
    } else {
        None
    };
    let held_since = if granted && idle && only_lock && statement_scope.is_some() {
        row.get("state_change")
    } else {
        None
    };
    (scope, held_since)
}

/// Names the rows a single row can name: a name told by one row of a key (a pglock holder's
/// `application_name`) names them all, and a semaphore told by one row of its space names its
/// other keys.
fn spread_names(locks: &mut [LockInfo]) {
    let mut told: HashMap<AdvisoryKey, String> = HashMap::new();
    let mut spaces: HashMap<i32, (String, u32)> = HashMap::new();
    for lock in locks.iter() {
        if let Some(name) = &lock.name {
            told.entry(lock.key).or_insert_with(|| name.clone());
        }
        if let (Some(name), Some(at), AdvisoryKey::Pair(space, _)) =
            (&lock.name, lock.semaphore, lock.key)
        {
            spaces
                .entry(space)
                .or_insert_with(|| (name.clone(), at.permits));
        }
    }
    for lock in locks.iter_mut() {
        if let (None, AdvisoryKey::Pair(space, _)) = (lock.semaphore, lock.key) {
            if let Some((name, permits)) = spaces.get(&space) {
                if let Some(at) = SemaphoreKey::of(lock.key, space, *permits) {
                    lock.semaphore = Some(at);
                    lock.name = Some(name.clone());
                }
            }
        }
        if lock.name.is_none() {
            lock.name = told.get(&lock.key).cloned();
        }
    }
}

/// A key to select in [`Introspect::key`]: a name (registered too), a number or a pair.
#[derive(Clone, Debug)]
pub struct SelectKey {
    key: AdvisoryKey,
    name: Option<String>,
}

impl From<AdvisoryKey> for SelectKey {
    fn from(key: AdvisoryKey) -> Self {
        SelectKey { key, name: None }
    }
}

impl From<i64> for SelectKey {
    fn from(key: i64) -> Self {
        AdvisoryKey::from(key).into()
    }
}

impl From<(i32, i32)> for SelectKey {
    fn from(key: (i32, i32)) -> Self {
        AdvisoryKey::from(key).into()
    }
}

impl From<&str> for SelectKey {
    fn from(name: &str) -> Self {
        SelectKey {
            key: AdvisoryKey::from_name(name),
            name: Some(name.to_owned()),
        }
    }
}

impl From<String> for SelectKey {
    fn from(name: String) -> Self {
        SelectKey {
            key: AdvisoryKey::from_name(&name),
            name: Some(name),
        }
    }
}

/// The `application_name` the `pglock` command uses for `command` (`run`, `leader`) on `name`,
/// cut to what PostgreSQL keeps.
///
/// PostgreSQL keeps only printable ASCII in an `application_name` and turns every other byte
/// into `?` (PostgreSQL 15 and earlier) or a `\xNN` escape (16 and later), which would lose a
/// name such as `café`. So the name is percent-encoded here: each byte outside printable ASCII,
/// and `%` itself, is written `%XX` (`pglock run caf%C3%A9`). [`LockInfo::name`] decodes it.
pub fn application_name(command: &str, name: &str) -> String {
    let mut app = format!("{APPLICATION_NAME_PREFIX}{command} ");
    for byte in name.bytes() {
        if (b' '..=b'~').contains(&byte) && byte != b'%' {
            app.push(char::from(byte));
        } else {
            app.push_str(&format!("%{byte:02X}"));
        }
    }
    if app.len() > APPLICATION_NAME_MAX {
        // All ASCII now: cut anywhere but inside a `%XX`.
        let mut end = APPLICATION_NAME_MAX;
        if let Some(escape) = app[end - 2..end].find('%') {
            end = end - 2 + escape;
        }
        app.truncate(end);
    }
    app
}

/// The lock name in a `pglock <command> <name>` application name, if it hashes to `key`: the
/// name as written, or percent-decoded (see [`application_name`]; a name with a literal `%`
/// from an older `pglock` is found as written).
///
/// `pglock leader NAME` holds the key of `leader:NAME` (see
/// [`LeaderElection::new`](crate::LeaderElection::new)), which is the name reported.
fn name_from_application_name(app: &str, key: AdvisoryKey) -> Option<String> {
    let rest = app.strip_prefix(APPLICATION_NAME_PREFIX)?;
    let (command, written) = rest.split_once(' ')?;
    let decoded = percent_decode(written);
    let candidates = std::iter::once(written.to_owned()).chain(decoded);
    for name in candidates {
        if AdvisoryKey::from_name(&name) == key {
            return Some(name);
        }
        let leader = format!("leader:{name}");
        if command == "leader" && AdvisoryKey::from_name(&leader) == key {
            return Some(leader);
        }
    }
    None
}

/// `text` with every `%XX` turned back into its byte, if it has any and they make UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    if !text.contains('%') {
        return None;
    }
    let mut bytes = Vec::with_capacity(text.len());
    let mut rest = text.as_bytes();
    while let Some((&byte, tail)) = rest.split_first() {
        if byte == b'%' {
            let hex = tail
                .get(..2)
                .filter(|hex| hex.iter().all(u8::is_ascii_hexdigit))?;
            bytes.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
            rest = &tail[2..];
        } else {
            bytes.push(byte);
            rest = tail;
        }
    }
    String::from_utf8(bytes).ok()
}

/// The scope of the advisory lock functions `statement` calls, if they are all of one scope.
fn lock_statement_scope(statement: &str) -> Option<LockScope> {
    let statement = statement.to_ascii_lowercase();
    let transaction = statement.contains("advisory_xact_lock");
    let session = statement.contains("pg_advisory_lock") || statement.contains("try_advisory_lock");
    match (session, transaction) {
        (true, false) => Some(LockScope::Session),
        (false, true) => Some(LockScope::Transaction),
        _ => None,
    }
}

/// The listing. `to_jsonb(l) ->> 'waitstart'` reads `pg_locks.waitstart` where it exists
/// (PostgreSQL 14 and later) and NULL before, in one statement for every version.
const LIST_SQL: &str = "\
SELECT l.classid::int8 AS classid, l.objid::int8 AS objid, l.objsubid::int2 AS objsubid,
       l.mode, l.granted, l.pid,
       a.application_name, a.usename::text AS usename, a.client_addr, a.client_port,
       a.backend_start, a.xact_start, a.state, a.state_change, a.query,
       (to_jsonb(l) ->> 'waitstart')::timestamptz AS waitstart,
       CASE WHEN l.granted OR l.pid IS NULL THEN ARRAY[]::int4[]
            ELSE pg_blocking_pids(l.pid) END AS blocked_by
FROM pg_locks l
LEFT JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory'
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND ($1::bool OR (l.classid::int8, l.objid::int8, l.objsubid::int2) IN
       (SELECT * FROM unnest($2::int8[], $3::int8[], $4::int2[])))
ORDER BY l.objsubid, l.classid::int8, l.objid::int8, l.granted DESC,
         (to_jsonb(l) ->> 'waitstart')::timestamptz NULLS FIRST, l.pid";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statement_scopes() {
        assert_eq!(
            lock_statement_scope("SELECT pg_advisory_lock($1::int8)"),
            Some(LockScope::Session)
        );
        assert_eq!(
            lock_statement_scope("SELECT pg_try_advisory_lock_shared(1, 2)"),
            Some(LockScope::Session)
        );
        assert_eq!(
            lock_statement_scope("select PG_TRY_ADVISORY_XACT_LOCK(1)"),
            Some(LockScope::Transaction)
        );
        assert_eq!(
            lock_statement_scope("SELECT pg_advisory_xact_lock(1), pg_advisory_lock(2)"),
            None
        );
        assert_eq!(lock_statement_scope("SELECT pg_advisory_unlock(1)"), None);
        assert_eq!(lock_statement_scope("COMMIT"), None);
    }

    #[test]
    fn names_from_application_names() {
        let key = AdvisoryKey::from_name("migrations");
        assert_eq!(
            name_from_application_name("pglock run migrations", key).as_deref(),
            Some("migrations")
        );
        assert_eq!(
            name_from_application_name("pglock leader migrations", key).as_deref(),
            Some("migrations")
        );
        assert_eq!(
            name_from_application_name("pglock leader beat", AdvisoryKey::from_name("leader:beat"))
                .as_deref(),
            Some("leader:beat")
        );
        assert_eq!(name_from_application_name("pglock run other", key), None);
        assert_eq!(name_from_application_name("psql", key), None);
        let long = "x".repeat(100);
        let app = application_name("run", &long);
        assert_eq!(app.len(), APPLICATION_NAME_MAX);
        assert_eq!(
            name_from_application_name(&app, AdvisoryKey::from_name(&long)),
            None
        );
        let accented = "é".repeat(40);
        let app = application_name("run", &accented);
        assert!(app.len() <= APPLICATION_NAME_MAX);
        assert!(
            !app.contains('%') || app.rsplit('%').next().unwrap().len() >= 2,
            "{app}"
        );
    }

    #[test]
    fn names_survive_postgresqls_ascii_only_application_name() {
        for name in [
            "café",
            "日本語",
            "50%",
            "tab\there",
            "",
            "a b",
            "x%41",
            "naïve:beat",
        ] {
            let app = application_name("run", name);
            assert!(app.bytes().all(|b| (b' '..=b'~').contains(&b)), "{app:?}");
            assert_eq!(
                name_from_application_name(&app, AdvisoryKey::from_name(name)).as_deref(),
                Some(name),
                "{app:?}"
            );
            let leader = format!("leader:{name}");
            assert_eq!(
                name_from_application_name(
                    &application_name("leader", name),
                    AdvisoryKey::from_name(&leader)
                ),
                Some(leader)
            );
        }
        assert_eq!(application_name("run", "café"), "pglock run caf%C3%A9");
        assert_eq!(application_name("run", "50%"), "pglock run 50%25");
        // A name with a literal `%`, as an older pglock wrote it, is found as written.
        assert_eq!(
            name_from_application_name("pglock run 50%", AdvisoryKey::from_name("50%")).as_deref(),
            Some("50%")
        );
        // What PostgreSQL 15 keeps of a raw non-ASCII name names nothing.
        assert_eq!(
            name_from_application_name("pglock run caf??", AdvisoryKey::from_name("café")),
            None
        );
        assert_eq!(percent_decode("%4"), None);
        assert_eq!(percent_decode("%+1"), None);
        assert_eq!(percent_decode("%FF"), None);
        // Cut to 63 bytes, never inside an escape.
        for prefix in 0..6 {
            let name = format!("{}{}", "x".repeat(50 + prefix), "é".repeat(10));
            let app = application_name("run", &name);
            assert!(app.len() <= APPLICATION_NAME_MAX && app.len() >= APPLICATION_NAME_MAX - 2);
            let tail = app.rsplit_once('%').map_or(2, |(_, tail)| tail.len());
            assert!(tail >= 2, "{app}");
        }
    }
}
