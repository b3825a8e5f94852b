//! Who holds a lock, in a line for people: looked up on a connection pglock already has.

use std::time::SystemTime;

use pglock::introspect::{Introspect, LockInfo};
use pglock::{AdvisoryKey, LockMode};
use tokio_postgres::Client;

use crate::format::{ago, rfc3339};

/// `pid 4242 (pglock run migrations, from 10.0.3.7) since … (41s), 2 waiting`, or `None` when
/// the lookup fails (it is only ever for a report).
pub async fn who_holds(client: &Client, key: AdvisoryKey) -> Option<String> {
    let locks = Introspect::new().key(key).fetch(client).await.ok()?;
    let now = SystemTime::now();
    let holders: Vec<&LockInfo> = locks.iter().filter(|l| l.granted).collect();
    let waiters = locks.iter().filter(|l| !l.granted).count();
    let held_by = if holders.is_empty() {
        "a session that just let go".to_owned()
    } else {
        holders
            .iter()
            .map(|holder| describe_holder(holder, now))
            .collect::<Vec<_>>()
            .join("; ")
    };
    let queue = match waiters {
        0 => String::new(),
        1 => ", 1 waiting".to_owned(),
        n => format!(", {n} waiting"),
    };
    Some(format!("{held_by}{queue}"))
}

/// `pid 4242 (pglock run migrations, 10.1.2.3) since 2024-05-01T12:00:00Z (1m 05s)`.
pub fn describe_holder(holder: &LockInfo, now: SystemTime) -> String {
    let mut text = match holder.pid {
        Some(pid) => format!("pid {pid}"),
        None => "a prepared transaction".to_owned(),
    };
    let mut about = Vec::new();
    if let Some(app) = holder.application_name.as_deref().filter(|a| !a.is_empty()) {
        about.push(app.to_owned());
    }
    if let Some(addr) = holder.client_addr {
        about.push(format!("from {addr}"));
    }
    if !about.is_empty() {
        text.push_str(&format!(" ({})", about.join(", ")));
    }
    if holder.mode == LockMode::Shared {
        text.push_str(" shared");
    }
    match (holder.held_since, holder.backend_start) {
        (Some(since), _) => text.push_str(&format!(
            " since {} ({})",
            rfc3339(since, false),
            ago(since, now)
        )),
        (None, Some(connected)) => text.push_str(&format!(
            ", connected since {} ({})",
            rfc3339(connected, false),
            ago(connected, now)
        )),
        (None, None) => {}
    }
    text
}
