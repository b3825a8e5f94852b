//! The SQL pglock sends. Every statement is parameterised and prepared once per connection.

use std::sync::OnceLock;

use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Row, Statement};

use crate::key::AdvisoryKey;
use crate::scope::{LockMode, LockScope};

/// What a statement does to the lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    /// Wait in the server's queue until granted.
    Lock,
    /// One attempt, never waits.
    TryLock,
    /// Wait at most the `lock_timeout` passed as the last parameter (scoped to the statement).
    LockWithTimeout,
    /// Release a session lock.
    Unlock,
}

/// Which of PostgreSQL's two key spaces a statement takes its key from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Form {
    Single,
    Pair,
}

impl Form {
    pub(crate) fn of(key: AdvisoryKey) -> Self {
        match key {
            AdvisoryKey::Single(_) => Form::Single,
            AdvisoryKey::Pair(..) => Form::Pair,
        }
    }
}

/// What a statement checks on the server itself, besides taking or releasing the lock.
///
/// On a connection pglock has not verified (see the `backend` module), every statement checks
/// that the server is not a standby and reports the backend that ran it, and an unlock runs
/// only on the backend that granted the lock. On a connection verified once as direct to a
/// primary's backend, neither can change while it lives, and the statements are the plain
/// ones: `SELECT pg_advisory_lock($1)` and nothing more.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Checks {
    /// The checking forms, which work on any connection.
    InStatement,
    /// The plain forms, for a connection verified as direct to the primary backend with this
    /// pid.
    Verified(i32),
}

impl Checks {
    fn index(self) -> usize {
        matches!(self, Checks::Verified(_)) as usize
    }

    /// The unlock's last parameter, the pid of the backend that granted the lock, for the
    /// checking forms.
    pub(crate) fn pid_param(self, granted_on: &i32) -> Option<&(dyn ToSql + Sync)> {
        match self {
            Checks::InStatement => Some(granted_on),
            Checks::Verified(_) => None,
        }
    }

    /// An acquiring statement's answer: whether the lock was granted (`None` on a standby) and
    /// the backend that ran the statement. `blocking`: the statement waits for the lock (not a
    /// `try`), so that its plain form, `void IS NOT NULL`, can only answer `true`, and the
    /// column need not be read.
    pub(crate) fn acquired(self, row: &Row, blocking: bool) -> (Option<bool>, i32) {
        match self {
            Checks::InStatement => (row.get(0), row.get(1)),
            Checks::Verified(pid) if blocking => (Some(true), pid),
            Checks::Verified(pid) => (row.get(0), pid),
        }
    }

    /// An unlock's answer: the backend that ran it, and whether it released the key (`None`
    /// when that backend is not the one that granted the lock, so the unlock did not run).
    pub(crate) fn unlocked(self, row: &Row) -> (i32, Option<bool>) {
        match self {
            Checks::InStatement => (row.get(1), row.get(0)),
            Checks::Verified(pid) => (pid, row.get(0)),
        }
    }

    /// The combined statement's answer ([`unlock_then`]): the acquisition's (`blocking` as for
    /// [`acquired`](Self::acquired)), then the unlock's released column.
    pub(crate) fn unlocked_then_acquired(
        self,
        row: &Row,
        blocking: bool,
    ) -> (Option<bool>, i32, Option<bool>) {
        match self {
            Checks::InStatement => (row.get(0), row.get(1), row.get(2)),
            Checks::Verified(pid) if blocking => (Some(true), pid, row.get(1)),
            Checks::Verified(pid) => (row.get(0), pid, row.get(1)),
        }
    }
}

/// A prepared session unlock, with the checks it was prepared with.
#[derive(Clone, Debug)]
pub(crate) struct PreparedUnlock {
    pub(crate) statement: Statement,
    pub(crate) checks: Checks,
}

/// The key as statement parameters, without allocating.
pub(crate) enum KeyParams {
    Single(i64),
    Pair(i32, i32),
}

impl KeyParams {
    pub(crate) fn new(key: AdvisoryKey) -> Self {
        match key {
            AdvisoryKey::Single(k) => KeyParams::Single(k),
            AdvisoryKey::Pair(a, b) => KeyParams::Pair(a, b),
        }
    }

    /// The parameters, followed by `extra` when given.
    pub(crate) fn with<'a>(&'a self, extra: Option<&'a (dyn ToSql + Sync)>) -> ParamList<'a> {
        let mut list = ParamList {
            items: [&0i64; 3],
            len: 0,
        };
        match self {
            KeyParams::Single(k) => list.push(k),
            KeyParams::Pair(a, b) => {
                list.push(a);
                list.push(b);
            }
        }
        if let Some(extra) = extra {
            list.push(extra);
        }
        list
    }
}

/// Up to three statement parameters with their types, on the stack, for statements sent
/// without preparing them (`Client::query_typed`).
pub(crate) struct TypedParamList<'a> {
    items: [(&'a (dyn ToSql + Sync), Type); 3],
    len: usize,
}

impl<'a> TypedParamList<'a> {
    pub(crate) fn as_slice(&self) -> &[(&'a (dyn ToSql + Sync), Type)] {
        &self.items[..self.len]
    }
}

impl KeyParams {
    /// The parameters with their types, followed by `extra` and its type when given.
    pub(crate) fn typed<'a>(
        &'a self,
        extra: Option<(&'a (dyn ToSql + Sync), Type)>,
    ) -> TypedParamList<'a> {
        let mut list = TypedParamList {
            items: [
                (&0i64, Type::INT8),
                (&0i64, Type::INT8),
                (&0i64, Type::INT8),
            ],
            len: 0,
        };
        let mut push = |item: &'a (dyn ToSql + Sync), ty: Type| {
            list.items[list.len] = (item, ty);
            list.len += 1;
        };
        match self {
            KeyParams::Single(k) => push(k, Type::INT8),
            KeyParams::Pair(a, b) => {
                push(a, Type::INT4);
                push(b, Type::INT4);
            }
        }
        if let Some((extra, ty)) = extra {
            push(extra, ty);
        }
        list
    }
}

/// Up to three statement parameters on the stack.
pub(crate) struct ParamList<'a> {
    items: [&'a (dyn ToSql + Sync); 3],
    len: usize,
}

impl<'a> ParamList<'a> {
    fn push(&mut self, item: &'a (dyn ToSql + Sync)) {
        self.items[self.len] = item;
        self.len += 1;
    }

    pub(crate) fn as_slice(&self) -> &[&'a (dyn ToSql + Sync)] {
        &self.items[..self.len]
    }
}

/// Runs one of pglock's single-row session-scope statements (a lock, an unlock, or both) and
/// returns its row as soon as it arrives; `None` if the answer ends without one, which
/// PostgreSQL never does for these.
///
/// The rest of the answer (the command tag, then ready-for-query) is read and dropped by
/// tokio-postgres's connection task. Reading it here, as `Client::query_one` does, costs the
/// client about 750 instructions per statement (`bench/instructions.sh`), more than all of
/// pglock's own work on a `lock` + `unlock` cycle. Nothing in that rest can change what the row
/// says: an error after it (a cancel request landing just then) aborts the implicit
/// transaction, which session locks outlive, and a transaction-scoped lock never comes here.
pub(crate) async fn first_row(
    client: &tokio_postgres::Client,
    statement: &Statement,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Option<Row>, tokio_postgres::Error> {
    use futures_util::TryStreamExt;
    let rows = client.query_raw(statement, params.iter().copied()).await?;
    std::pin::pin!(rows).try_next().await
}

/// The text of the statement for `op` on a key of `form`, in `mode` and `scope`, with `checks`.
///
/// With [`Checks::InStatement`], every acquiring statement returns `(granted, backend_pid)`,
/// where `granted` is NULL when the server is a standby: checking `pg_is_in_recovery()` in the
/// same statement costs no round trip. `Unlock` takes the backend pid that granted the lock as
/// its last parameter and returns `(released, backend_pid)`: it releases only on that backend,
/// so a connection whose backend changed (a transaction-pooling proxy) can never release a lock
/// another client holds there. With [`Checks::Verified`], the statements return `granted` or
/// `released` alone, and `Unlock` takes the key only. ([`Checks`] reads both shapes.)
///
/// A blocking lock function returns `void`, which is never NULL: `IS NOT NULL` turns it into
/// `true` without converting it to text.
pub(crate) fn statement(
    op: Op,
    mode: LockMode,
    scope: LockScope,
    form: Form,
    checks: Checks,
) -> &'static str {
    static TABLE: OnceLock<Vec<String>> = OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut table = Vec::with_capacity(64);
        for checks in [Checks::InStatement, Checks::Verified(0)] {
            for op in [Op::Lock, Op::TryLock, Op::LockWithTimeout, Op::Unlock] {
                for mode in [LockMode::Exclusive, LockMode::Shared] {
                    for scope in [LockScope::Session, LockScope::Transaction] {
                        for form in [Form::Single, Form::Pair] {
                            table.push(build(op, mode, scope, form, checks));
                        }
                    }
                }
            }
        }
        table
    });
    &table[index(op, mode, scope, form, checks)]
}

fn index(op: Op, mode: LockMode, scope: LockScope, form: Form, checks: Checks) -> usize {
    let op = match op {
        Op::Lock => 0,
        Op::TryLock => 1,
        Op::LockWithTimeout => 2,
        Op::Unlock => 3,
    };
    let mode = matches!(mode, LockMode::Shared) as usize;
    let scope = matches!(scope, LockScope::Transaction) as usize;
    let form = matches!(form, Form::Pair) as usize;
    (((checks.index() * 4 + op) * 2 + mode) * 2 + scope) * 2 + form
}

/// The key's placeholders in a statement's argument list, and the number of the next one.
fn key_args(form: Form) -> (&'static str, usize) {
    match form {
        Form::Single => ("$1::int8", 2),
        Form::Pair => ("$1::int4, $2::int4", 3),
    }
}

/// The suffix of the lock functions for `mode`.
fn shared_suffix(mode: LockMode) -> &'static str {
    match mode {
        LockMode::Exclusive => "",
        LockMode::Shared => "_shared",
    }
}

fn build(op: Op, mode: LockMode, scope: LockScope, form: Form, checks: Checks) -> String {
    let (args, next) = key_args(form);
    let xact = if scope == LockScope::Transaction {
        "_xact"
    } else {
        ""
    };
    let shared = shared_suffix(mode);
    let acquire = match op {
        Op::Lock | Op::LockWithTimeout => {
            format!("pg_advisory{xact}_lock{shared}({args}) IS NOT NULL")
        }
        Op::TryLock => format!("pg_try_advisory{xact}_lock{shared}({args})"),
        Op::Unlock => format!("pg_advisory_unlock{shared}({args})"),
    };
    let columns = match (op, checks) {
        (Op::Unlock, Checks::InStatement) => format!(
            "CASE WHEN pg_backend_pid() = ${next}::int4 THEN {acquire} END, pg_backend_pid()"
        ),
        (_, Checks::InStatement) => {
            format!("{STANDBY_GUARD} {acquire} END, pg_backend_pid()")
        }
        (_, Checks::Verified(_)) => acquire,
    };
    match op {
        // The subquery sets lock_timeout for this transaction before the lock is requested, and
        // the last column puts the previous value back, so the session's own setting survives
        // even inside the explicit transaction of a transaction-scoped lock.
        Op::LockWithTimeout => format!(
            "SELECT {columns}, set_config('lock_timeout', s.previous, true) \
             FROM (SELECT current_setting('lock_timeout') AS previous, \
             set_config('lock_timeout', ${next}::text, true) AS applied OFFSET 0) AS s"
        ),
        _ => format!("SELECT {columns}"),
    }
}

/// Makes an acquiring statement's `granted` NULL on a standby (closed by `END`).
const STANDBY_GUARD: &str = "CASE WHEN pg_is_in_recovery() THEN NULL ELSE";

/// The statement that releases a dropped guard's session lock and then acquires the same key
/// in the same mode with `op` ([`Op::Lock`] or [`Op::TryLock`]), in one round trip and one
/// statement: what a `lock` + drop loop sends once per cycle (see `release::deferred::DeferredUnlock`).
///
/// Parameters as for [`Op::Unlock`] with the same `checks`: the key, then (checking forms) the
/// pid of the backend that granted the lock being released. The checking forms return
/// `(granted, backend_pid, released)`: the first two as for the acquiring statement, the last
/// as the unlock's (NULL when the backend changed); the plain forms `(granted, released)`.
///
/// The unlock runs in a subquery that the planner may neither flatten nor reorder (`OFFSET 0`,
/// and the unlock is volatile): its row exists before the outer target list, and with it the
/// lock request, is evaluated. So the release always comes first, as it would in two
/// statements, and whoever waits in the server's queue for the key is granted it before this
/// session asks again.
pub(crate) fn unlock_then(
    op: Op,
    mode: LockMode,
    form: Form,
    checks: Checks,
) -> Option<&'static str> {
    static TABLE: OnceLock<Vec<String>> = OnceLock::new();
    let op_index = match op {
        Op::Lock => 0,
        Op::TryLock => 1,
        Op::LockWithTimeout | Op::Unlock => return None,
    };
    let table = TABLE.get_or_init(|| {
        let mut table = Vec::with_capacity(16);
        for checks in [Checks::InStatement, Checks::Verified(0)] {
            for op in [Op::Lock, Op::TryLock] {
                for mode in [LockMode::Exclusive, LockMode::Shared] {
                    for form in [Form::Single, Form::Pair] {
                        table.push(build_unlock_then(op, mode, form, checks));
                    }
                }
            }
        }
        table
    });
    let mode_index = matches!(mode, LockMode::Shared) as usize;
    let form_index = matches!(form, Form::Pair) as usize;
    Some(&table[((checks.index() * 2 + op_index) * 2 + mode_index) * 2 + form_index])
}

fn build_unlock_then(op: Op, mode: LockMode, form: Form, checks: Checks) -> String {
    let (args, next) = key_args(form);
    let shared = shared_suffix(mode);
    let acquire = match op {
        Op::Lock => format!("pg_advisory_lock{shared}({args}) IS NOT NULL"),
        Op::TryLock => format!("pg_try_advisory_lock{shared}({args})"),
        Op::LockWithTimeout | Op::Unlock => unreachable!("not combined with an unlock"),
    };
    match checks {
        Checks::InStatement => format!(
            "SELECT {STANDBY_GUARD} {acquire} END, pg_backend_pid(), \
             u.released FROM (SELECT CASE WHEN pg_backend_pid() = ${next}::int4 \
             THEN pg_advisory_unlock{shared}({args}) END AS released OFFSET 0) AS u"
        ),
        Checks::Verified(_) => format!(
            "SELECT {acquire}, u.released \
             FROM (SELECT pg_advisory_unlock{shared}({args}) AS released OFFSET 0) AS u"
        ),
    }
}

/// The batch statement for keys of `form` with `checks`: one row per key, `(index, granted,
/// backend_pid)`, where `index` is the key's 1-based place in the arrays and `granted` is NULL
/// on a standby (as in the single statement, see [`statement`]); `(index, granted)` in the plain
/// form.
pub(crate) fn try_lock_batch(form: Form, checks: Checks) -> &'static str {
    static SQL: [&str; 4] = [
        "SELECT t.i, CASE WHEN pg_is_in_recovery() THEN NULL \
         ELSE pg_try_advisory_lock(t.k) END, pg_backend_pid() \
         FROM unnest($1::int8[]) WITH ORDINALITY AS t(k, i)",
        "SELECT t.i, CASE WHEN pg_is_in_recovery() THEN NULL \
         ELSE pg_try_advisory_lock(t.a, t.b) END, pg_backend_pid() \
         FROM unnest($1::int4[], $2::int4[]) WITH ORDINALITY AS t(a, b, i)",
        "SELECT t.i, pg_try_advisory_lock(t.k) FROM unnest($1::int8[]) WITH ORDINALITY AS t(k, i)",
        "SELECT t.i, pg_try_advisory_lock(t.a, t.b) \
         FROM unnest($1::int4[], $2::int4[]) WITH ORDINALITY AS t(a, b, i)",
    ];
    SQL[2 * checks.index() + usize::from(form == Form::Pair)]
}

/// The statement that releases several keys of `form` in `mode` at once, each only on the
/// backend that granted it: one row per key, `(index, released, backend_pid)`, where `released`
/// is NULL when the backend is not the granting one (as in the single unlock, see
/// [`statement`]).
pub(crate) fn unlock_batch(mode: LockMode, form: Form) -> &'static str {
    static SQL: [&str; 4] = [
        "SELECT t.i, CASE WHEN pg_backend_pid() = t.p THEN pg_advisory_unlock(t.k) END, \
         pg_backend_pid() FROM unnest($1::int8[], $2::int4[]) WITH ORDINALITY AS t(k, p, i)",
        "SELECT t.i, CASE WHEN pg_backend_pid() = t.p THEN pg_advisory_unlock(t.a, t.b) END, \
         pg_backend_pid() \
         FROM unnest($1::int4[], $2::int4[], $3::int4[]) WITH ORDINALITY AS t(a, b, p, i)",
        "SELECT t.i, CASE WHEN pg_backend_pid() = t.p THEN pg_advisory_unlock_shared(t.k) END, \
         pg_backend_pid() FROM unnest($1::int8[], $2::int4[]) WITH ORDINALITY AS t(k, p, i)",
        "SELECT t.i, CASE WHEN pg_backend_pid() = t.p THEN pg_advisory_unlock_shared(t.a, t.b) \
         END, pg_backend_pid() \
         FROM unnest($1::int4[], $2::int4[], $3::int4[]) WITH ORDINALITY AS t(a, b, p, i)",
    ];
    SQL[2 * usize::from(mode == LockMode::Shared) + usize::from(form == Form::Pair)]
}

/// A statement that releases the key only if this session holds it in `mode`, for when an
/// acquiring statement failed or was cancelled and may or may not have taken the lock (a session
/// lock survives the error of the statement that took it). Parameters: the key, then its
/// `pg_locks` ids `(classid, objid, objsubid)` as `int8, int8, int2`.
///
/// pglock never stacks a key on a session, so "held" means "taken by that statement".
///
/// The rows are this backend's own (`pid`), so they are in its database: an advisory lock's tag
/// carries the database the session is connected to. So the statement opens no shared catalog
/// (`pg_database` would need a slot in the server's shared lock table); the `pg_locks` view it
/// reads is local to the database, and its lock takes one of the backend's own fast-path
/// slots. It therefore still runs when the shared lock table is full, which is when an undo
/// matters most.
pub(crate) fn unlock_if_held(mode: LockMode, form: Form) -> String {
    let (args, next) = key_args(form);
    let shared = shared_suffix(mode);
    let lock_mode = match mode {
        LockMode::Exclusive => "ExclusiveLock",
        LockMode::Shared => "ShareLock",
    };
    format!(
        "SELECT pg_advisory_unlock{shared}({args}) FROM pg_locks \
         WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted \
         AND classid = ${}::int8::oid AND objid = ${}::int8::oid AND objsubid = ${}::int2 \
         AND mode = '{lock_mode}'",
        next,
        next + 1,
        next + 2
    )
}

/// The most keys one statement asks for; a longer queue goes out in several.
pub(crate) const MAX_BATCH: usize = 1_000;

/// Keys of one form as a batch statement's arrays: one `int8[]`, or two `int4[]` for pairs.
pub(crate) enum KeyArrays {
    Single(Vec<i64>),
    Pair(Vec<i32>, Vec<i32>),
}

impl KeyArrays {
    pub(crate) fn new(form: Form, keys: &[AdvisoryKey]) -> Self {
        let mut arrays = match form {
            Form::Single => KeyArrays::Single(Vec::with_capacity(keys.len())),
            Form::Pair => KeyArrays::Pair(Vec::with_capacity(keys.len()), Vec::new()),
        };
        for key in keys {
            match (&mut arrays, *key) {
                (KeyArrays::Single(singles), AdvisoryKey::Single(k)) => singles.push(k),
                (KeyArrays::Pair(firsts, seconds), AdvisoryKey::Pair(a, b)) => {
                    firsts.push(a);
                    seconds.push(b);
                }
                _ => unreachable!("a batch holds keys of one form"),
            }
        }
        arrays
    }

    /// The arrays as typed parameters, followed by `extra`.
    pub(crate) fn typed<'a>(
        &'a self,
        extra: Option<(&'a (dyn ToSql + Sync), Type)>,
    ) -> Vec<(&'a (dyn ToSql + Sync), Type)> {
        let mut params: Vec<(&'a (dyn ToSql + Sync), Type)> = match self {
            KeyArrays::Single(singles) => vec![(singles, Type::INT8_ARRAY)],
            KeyArrays::Pair(firsts, seconds) => {
                vec![(firsts, Type::INT4_ARRAY), (seconds, Type::INT4_ARRAY)]
            }
        };
        params.extend(extra);
        params
    }
}

/// A batch statement's rows `(index, flag, backend_pid)` in the order of its keys (`index` is
/// a key's 1-based place in the arrays), read as `checks` says (the plain forms report no pid);
/// `None` for a key without a row.
pub(crate) fn by_index(
    rows: &[tokio_postgres::Row],
    keys: usize,
    checks: Checks,
) -> Vec<Option<(Option<bool>, i32)>> {
    let mut by_index = vec![None; keys];
    for row in rows {
        let index: i64 = row.get(0);
        if let Some(slot) = usize::try_from(index - 1)
            .ok()
            .and_then(|i| by_index.get_mut(i))
        {
            *slot = Some(match checks {
                Checks::InStatement => (row.get(1), row.get(2)),
                Checks::Verified(pid) => (row.get(1), pid),
            });
        }
    }
    by_index
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHECKS: [Checks; 2] = [Checks::InStatement, Checks::Verified(0)];

    #[test]
    fn every_statement_is_distinct_and_parameterised() {
        let mut seen = std::collections::HashSet::new();
        for checks in CHECKS {
            for op in [Op::Lock, Op::TryLock, Op::LockWithTimeout, Op::Unlock] {
                for mode in [LockMode::Exclusive, LockMode::Shared] {
                    for scope in [LockScope::Session, LockScope::Transaction] {
                        for form in [Form::Single, Form::Pair] {
                            let sql = statement(op, mode, scope, form, checks);
                            assert!(sql.contains("$1"), "{sql}");
                            assert_eq!(
                                sql.contains("pg_backend_pid()"),
                                checks == Checks::InStatement,
                                "{sql}"
                            );
                            if op != Op::Unlock || scope == LockScope::Session {
                                assert!(seen.insert(sql), "duplicate {sql}");
                            }
                        }
                    }
                }
            }
            for op in [Op::Lock, Op::TryLock] {
                for mode in [LockMode::Exclusive, LockMode::Shared] {
                    for form in [Form::Single, Form::Pair] {
                        let sql = unlock_then(op, mode, form, checks).expect("combined");
                        assert!(seen.insert(sql), "duplicate {sql}");
                    }
                }
            }
        }
        for form in [Form::Single, Form::Pair] {
            for checks in CHECKS {
                let sql = try_lock_batch(form, checks);
                assert!(sql.contains("unnest($1") && seen.insert(sql), "{sql}");
                assert_eq!(
                    sql.contains("pg_backend_pid()"),
                    checks == Checks::InStatement,
                    "{sql}"
                );
            }
            for mode in [LockMode::Exclusive, LockMode::Shared] {
                let sql = unlock_batch(mode, form);
                assert!(sql.contains("unnest($1") && seen.insert(sql), "{sql}");
                assert_eq!(sql.contains("_shared("), mode == LockMode::Shared, "{sql}");
            }
        }
        for checks in CHECKS {
            assert_eq!(
                unlock_then(
                    Op::LockWithTimeout,
                    LockMode::Exclusive,
                    Form::Single,
                    checks
                ),
                None
            );
        }
        assert_eq!(
            unlock_then(Op::TryLock, LockMode::Shared, Form::Pair, Checks::InStatement).unwrap(),
            "SELECT CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_try_advisory_lock_shared($1::int4, $2::int4) END, \
             pg_backend_pid(), u.released FROM (SELECT CASE WHEN pg_backend_pid() = $3::int4 \
             THEN pg_advisory_unlock_shared($1::int4, $2::int4) END AS released OFFSET 0) AS u"
        );
        assert_eq!(
            unlock_then(
                Op::Lock,
                LockMode::Exclusive,
                Form::Single,
                Checks::Verified(7)
            )
            .unwrap(),
            "SELECT pg_advisory_lock($1::int8) IS NOT NULL, u.released \
             FROM (SELECT pg_advisory_unlock($1::int8) AS released OFFSET 0) AS u"
        );
        assert_eq!(
            statement(
                Op::TryLock,
                LockMode::Shared,
                LockScope::Transaction,
                Form::Pair,
                Checks::InStatement
            ),
            "SELECT CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_try_advisory_xact_lock_shared($1::int4, $2::int4) END, pg_backend_pid()"
        );
        assert_eq!(
            statement(
                Op::Unlock,
                LockMode::Exclusive,
                LockScope::Session,
                Form::Single,
                Checks::InStatement
            ),
            "SELECT CASE WHEN pg_backend_pid() = $2::int4 THEN pg_advisory_unlock($1::int8) END, pg_backend_pid()"
        );
        assert_eq!(
            statement(
                Op::Lock,
                LockMode::Exclusive,
                LockScope::Session,
                Form::Single,
                Checks::Verified(7)
            ),
            "SELECT pg_advisory_lock($1::int8) IS NOT NULL"
        );
        assert_eq!(
            statement(
                Op::LockWithTimeout,
                LockMode::Exclusive,
                LockScope::Session,
                Form::Single,
                Checks::Verified(7)
            ),
            "SELECT pg_advisory_lock($1::int8) IS NOT NULL, set_config('lock_timeout', s.previous, true) \
             FROM (SELECT current_setting('lock_timeout') AS previous, \
             set_config('lock_timeout', $2::text, true) AS applied OFFSET 0) AS s"
        );
    }
}
