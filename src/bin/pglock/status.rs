//! `pglock status`: the advisory locks on the database now, as a table or as JSON.

use std::time::SystemTime;

use pglock::introspect::{Introspect, LockInfo};
use pglock::{LockMode, LockScope};
use serde_json::{json, Value};

use crate::args::StatusArgs;
use crate::connect::{AppName, Database, Refusals};
use crate::exit;
use crate::format::{ago, key_arg, rfc3339};
use crate::output::Output;

pub async fn status(db: &Database, args: StatusArgs, out: &Output) -> i32 {
    let app = AppName::Default("pglock status");
    let connection = match db.connect(app, None, &mut Refusals::default(), out).await {
        Ok(connection) => connection,
        Err(error) => return out.report_error(&error),
    };
    let mut query = Introspect::new();
    for name in &args.name {
        query = query.key(name.as_str());
    }
    for key in &args.key {
        query = query.key(*key);
    }
    for name in &args.known {
        query = query.name(name.as_str());
    }
    for (name, permits) in &args.semaphore {
        query = query.semaphore(name.as_str(), *permits);
    }
    let client = connection.session.client();
    let locks = match query.fetch(client).await {
        Ok(locks) => locks,
        Err(error) => return out.report_error(&error),
    };
    let now = SystemTime::now();
    if args.json {
        let value = json!({
            "generated_at": rfc3339(now, true),
            "locks": locks.iter().map(to_json).collect::<Vec<_>>(),
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&value).expect("JSON values always serialise")
        );
    } else if locks.is_empty() {
        println!("No advisory locks held or awaited.");
    } else {
        print!("{}", table(&locks, now));
    }
    exit::OK
}

fn mode_str(mode: LockMode) -> &'static str {
    match mode {
        LockMode::Exclusive => "exclusive",
        LockMode::Shared => "shared",
    }
}

fn scope_str(scope: Option<LockScope>) -> &'static str {
    match scope {
        Some(LockScope::Session) => "session",
        Some(LockScope::Transaction) => "transaction",
        None => "unknown",
    }
}

/// One lock as JSON. Keys are strings in `--key` syntax (`"42"`, `"1,2"`), exact in every JSON
/// reader; `classid`/`objid`/`objsubid` are `pg_locks`' own columns, for joins.
pub fn to_json(lock: &LockInfo) -> Value {
    let (classid, objid, objsubid) = lock.key.pg_locks_ids();
    let time = |t: Option<SystemTime>| t.map(|t| rfc3339(t, true));
    json!({
        "key": key_arg(lock.key),
        "name": lock.name,
        "classid": classid,
        "objid": objid,
        "objsubid": objsubid,
        "mode": mode_str(lock.mode),
        "granted": lock.granted,
        "state": if lock.granted { "held" } else { "waiting" },
        "scope": lock.scope.map(|s| scope_str(Some(s))),
        "pid": lock.pid,
        "application_name": lock.application_name,
        "user": lock.user,
        "client_addr": lock.client_addr.map(|a| a.to_string()),
        "client_port": lock.client_port,
        "backend_start": time(lock.backend_start),
        "transaction_start": time(lock.transaction_start),
        "backend_state": lock.state,
        "held_since": time(lock.held_since),
        "wait_start": time(lock.wait_start),
        "blocked_by": lock.blocked_by,
        "semaphore": lock.semaphore.map(|at| json!({"slot": at.slot, "permits": at.permits})),
    })
}

const HEADERS: [&str; 11] = [
    "LOCK",
    "KEY",
    "MODE",
    "SCOPE",
    "STATE",
    "PID",
    "APPLICATION",
    "CLIENT",
    "SINCE",
    "FOR",
    "BLOCKED BY",
];

/// The human table: one row per lock and backend, columns padded to fit.
pub fn table(locks: &[LockInfo], now: SystemTime) -> String {
    let rows: Vec<[String; 11]> = locks
        .iter()
        .map(|lock| {
            let since = if lock.granted {
                lock.held_since
            } else {
                lock.wait_start
            };
            [
                match (&lock.name, lock.semaphore) {
                    (_, Some(_)) => lock.label(),
                    (Some(name), None) => name.clone(),
                    (None, None) => "-".to_owned(),
                },
                key_arg(lock.key),
                mode_str(lock.mode).to_owned(),
                scope_str(lock.scope).to_owned(),
                if lock.granted { "held" } else { "waiting" }.to_owned(),
                lock.pid.map_or("-".to_owned(), |p| p.to_string()),
                lock.application_name
                    .clone()
                    .filter(|a| !a.is_empty())
                    .unwrap_or_else(|| "-".to_owned()),
                match (lock.client_addr, lock.client_port) {
                    (Some(addr), Some(port)) if port > 0 => format!("{addr}:{port}"),
                    (Some(addr), _) => addr.to_string(),
                    (None, Some(-1)) | (None, None) if lock.pid.is_some() => "local".to_owned(),
                    _ => "-".to_owned(),
                },
                since.map_or("-".to_owned(), |t| rfc3339(t, false)),
                match (since, lock.granted, lock.backend_start) {
                    (Some(t), _, _) => ago(t, now),
                    // Held for no longer than the holder has been connected.
                    (None, true, Some(connected)) => format!("<={}", ago(connected, now)),
                    _ => "-".to_owned(),
                },
                if lock.blocked_by.is_empty() {
                    "-".to_owned()
                } else {
                    lock.blocked_by
                        .iter()
                        .map(|p| p.to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                },
            ]
        })
        .collect();
    let mut widths = HEADERS.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    let mut line = |cells: &[&str]| {
        let mut out = String::new();
        for (i, (cell, width)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<width$}  "));
            }
        }
        text.push_str(out.trim_end());
        text.push('\n');
    };
    line(&HEADERS);
    for row in &rows {
        line(&row.each_ref().map(String::as_str));
    }
    text
}
