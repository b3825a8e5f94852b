//! The introspection API against a known set of holders and waiters.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use pglock::introspect::{Introspect, LockInfo};
use pglock::{AdvisoryKey, AdvisoryLock, AdvisoryLockGuard, LockMode, LockScope};
use rand::Rng;

use crate::harness::TestDb;

/// The fields of a row that are fully determined by the setup.
#[derive(Debug, PartialEq, Eq)]
struct Row {
    key: AdvisoryKey,
    name: Option<String>,
    mode: LockMode,
    granted: bool,
    scope: Option<LockScope>,
    pid: i32,
    blocked_by: Vec<i32>,
}

fn row(lock: &LockInfo) -> Row {
    let mut blocked_by = lock.blocked_by.clone();
    blocked_by.sort_unstable();
    Row {
        key: lock.key,
        name: lock.name.clone(),
        mode: lock.mode,
        granted: lock.granted,
        scope: lock.scope,
        pid: lock.pid.expect("no prepared transactions here"),
        blocked_by,
    }
}

/// The order `Introspect` promises: by key as `pg_locks` stores it.
fn key_order(key: AdvisoryKey) -> (i16, u32, u32) {
    let (classid, objid, objsubid) = key.pg_locks_ids();
    (objsubid, classid, objid)
}

#[tokio::test]
async fn lists_holders_and_waiters_exactly() {
    let db = TestDb::new("introspect_exact").await;
    let pool = db.pool(8);
    let name = format!("introspect-{:08x}", rand::thread_rng().gen::<u32>());
    let named = AdvisoryKey::from_name(&name);
    let pair = AdvisoryKey::Pair(rand::thread_rng().gen(), rand::thread_rng().gen());
    let in_transaction = db.key();
    let raw = db.key();

    // `named`: one exclusive holder, then an exclusive and a shared waiter, in that order.
    let holder = AdvisoryLock::new(&pool, &name).lock().await.unwrap();
    let first_waiter = tokio::spawn({
        let lock = AdvisoryLock::new(&pool, named);
        async move { drop(lock.lock().await.unwrap()) }
    });
    db.wait_for_waiters(named, 1, Duration::from_secs(5)).await;
    let second_waiter = tokio::spawn({
        let lock = AdvisoryLock::new(&pool, named);
        async move { drop(lock.lock_shared().await.unwrap()) }
    });
    db.wait_for_waiters(named, 2, Duration::from_secs(5)).await;
    let waiter_pids = {
        let rows = Introspect::new()
            .key(named)
            .fetch(db.admin())
            .await
            .unwrap();
        rows.iter()
            .filter(|l| !l.granted)
            .map(|l| l.pid.unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(waiter_pids.len(), 2);

    // `pair`: two shared holders.
    let shared_a = AdvisoryLock::new(&pool, pair).lock_shared().await.unwrap();
    let shared_b = AdvisoryLock::new(&pool, pair).lock_shared().await.unwrap();

    // `in_transaction`: a transaction-scoped holder (its transaction stays open).
    let xact = AdvisoryLock::new(&pool, in_transaction)
        .scope(LockScope::Transaction)
        .lock()
        .await
        .unwrap();

    // `raw`: a session lock taken by hand inside a transaction that went on to other work,
    // so its scope cannot be told.
    let raw_client = db.client().await;
    raw_client
        .batch_execute(&format!(
            "BEGIN; SELECT pg_advisory_lock({}); SELECT 1",
            match raw {
                AdvisoryKey::Single(k) => k,
                AdvisoryKey::Pair(..) => unreachable!(),
            }
        ))
        .await
        .unwrap();
    let raw_pid: i32 = raw_client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);

    let listed = Introspect::new()
        .key(name.as_str())
        .key(pair)
        .key(in_transaction)
        .key(raw)
        .fetch(db.admin())
        .await
        .unwrap();

    let holder_pid = AdvisoryLockGuard::backend_pid(&holder);
    let mut shared_pids = [
        AdvisoryLockGuard::backend_pid(&shared_a),
        AdvisoryLockGuard::backend_pid(&shared_b),
    ];
    shared_pids.sort_unstable();
    let mut expected = vec![
        Row {
            key: named,
            name: Some(name.clone()),
            mode: LockMode::Exclusive,
            granted: true,
            scope: Some(LockScope::Session),
            pid: holder_pid,
            blocked_by: vec![],
        },
        Row {
            key: named,
            name: Some(name.clone()),
            mode: LockMode::Exclusive,
            granted: false,
            scope: Some(LockScope::Session),
            pid: waiter_pids[0],
            blocked_by: vec![holder_pid],
        },
        Row {
            key: named,
            name: Some(name.clone()),
            mode: LockMode::Shared,
            granted: false,
            scope: Some(LockScope::Session),
            pid: waiter_pids[1],
            // Behind the exclusive holder and the exclusive waiter queued ahead of it.
            blocked_by: {
                let mut pids = vec![holder_pid, waiter_pids[0]];
                pids.sort_unstable();
                pids
            },
        },
    ];
    for pid in shared_pids {
        expected.push(Row {
            key: pair,
            name: None,
            mode: LockMode::Shared,
            granted: true,
            scope: Some(LockScope::Session),
            pid,
            blocked_by: vec![],
        });
    }
    expected.push(Row {
        key: in_transaction,
        name: None,
        mode: LockMode::Exclusive,
        granted: true,
        scope: Some(LockScope::Transaction),
        pid: AdvisoryLockGuard::backend_pid(&xact),
        blocked_by: vec![],
    });
    expected.push(Row {
        key: raw,
        name: None,
        mode: LockMode::Exclusive,
        granted: true,
        scope: None,
        pid: raw_pid,
        blocked_by: vec![],
    });
    // Keys in pg_locks order; within a key the order above (holders by pid, waiters by queue).
    expected.sort_by_key(|r| key_order(r.key));
    assert_eq!(listed.iter().map(row).collect::<Vec<_>>(), expected);

    // What pg_stat_activity adds.
    for lock in &listed {
        assert_eq!(lock.application_name.as_deref(), Some(db.app.as_str()));
        assert_eq!(lock.user.as_deref(), Some("postgres"));
        assert_eq!(
            lock.client_addr,
            Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            "{lock:?}"
        );
        assert!(lock.client_port.is_some_and(|p| p > 0));
        assert!(lock.backend_start.is_some());
        if lock.granted {
            assert_eq!(lock.wait_start, None);
            assert!(lock.blocked_by.is_empty());
        } else {
            assert!(lock.wait_start.is_some(), "{lock:?}");
            assert_eq!(lock.state.as_deref(), Some("active"));
        }
        match (lock.granted, lock.key == raw) {
            // pglock's holders are idle since the statement that took the lock.
            (true, false) => {
                let since = lock.held_since.expect("pglock holder's grant time");
                assert!(since >= lock.backend_start.unwrap());
            }
            _ => assert_eq!(lock.held_since, None, "{lock:?}"),
        }
    }
    let waits: Vec<_> = listed.iter().filter_map(|l| l.wait_start).collect();
    assert!(waits[0] <= waits[1], "waiters in queue order");
    let xact_row = listed.iter().find(|l| l.key == in_transaction).unwrap();
    assert_eq!(xact_row.state.as_deref(), Some("idle in transaction"));
    assert!(xact_row.transaction_start.is_some());
    let named_row = listed.iter().find(|l| l.key == named).unwrap();
    assert_eq!(named_row.label(), name);
    let raw_row = listed.iter().find(|l| l.key == raw).unwrap();
    assert_eq!(raw_row.label(), raw.to_string());

    // Unfiltered, the same rows are among all the database's advisory locks.
    let everything = Introspect::new().fetch(db.admin()).await.unwrap();
    for lock in &listed {
        assert!(
            everything
                .iter()
                .any(|l| l.pid == lock.pid && l.key == lock.key),
            "{lock:?} missing from the unfiltered listing"
        );
    }

    drop(raw_client);
    drop(xact);
    drop(shared_a);
    drop(shared_b);
    drop(holder);
    tokio::time::timeout(Duration::from_secs(10), async {
        first_waiter.await.unwrap();
        second_waiter.await.unwrap();
    })
    .await
    .expect("the waiters get the lock once the holder lets go");
    // Guards release in the background: the listing empties within moments.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !Introspect::new()
        .key(name.as_str())
        .fetch(db.admin())
        .await
        .unwrap()
        .is_empty()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} still listed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    db.assert_no_locks().await;
}

#[tokio::test]
async fn names_registered_or_from_the_application_name() {
    let db = TestDb::new("introspect_names").await;
    let name = format!("introspect-app-{:08x}", rand::thread_rng().gen::<u32>());
    let key = AdvisoryKey::from_name(&name);
    // A holder that looks like the pglock command: its application_name carries the name.
    let url = format!(
        "{}{}application_name=pglock%20run%20{name}",
        crate::harness::database_url(),
        if crate::harness::database_url().contains('?') {
            '&'
        } else {
            '?'
        }
    );
    let session = std::sync::Arc::new(pglock::Session::connect(&url).await.unwrap());
    let guard = AdvisoryLock::new(session.clone(), key)
        .lock()
        .await
        .unwrap();
    // A waiter of this test, whose own application_name says nothing.
    let pool = db.pool(1);
    let waiter = tokio::spawn({
        let lock = AdvisoryLock::new(&pool, key);
        async move { drop(lock.lock().await.unwrap()) }
    });
    db.wait_for_waiters(key, 1, Duration::from_secs(5)).await;

    let listed = Introspect::new().key(key).fetch(db.admin()).await.unwrap();
    assert_eq!(listed.len(), 2);
    assert!(listed[0].is_pglock_command());
    assert!(!listed[1].is_pglock_command());
    // Both rows of the key get the name the holder's application_name told.
    assert!(listed.iter().all(|l| l.name.as_deref() == Some(&name)));

    // A registered name works for any key, without filtering.
    let other = format!("registered-{name}");
    let other_guard = AdvisoryLock::new(db.pool(1), other.as_str())
        .lock()
        .await
        .unwrap();
    let listed = Introspect::new()
        .name(other.as_str())
        .fetch(db.admin())
        .await
        .unwrap();
    let row = listed
        .iter()
        .find(|l| l.key == AdvisoryKey::from_name(&other))
        .expect("the registered lock is listed");
    assert_eq!(row.name.as_deref(), Some(other.as_str()));
    assert!(listed.len() >= 3, "unfiltered: {listed:?}");
    let only = Introspect::new()
        .name(other.as_str())
        .only()
        .fetch(db.admin())
        .await
        .unwrap();
    assert_eq!(only.len(), 1);

    drop(other_guard);
    drop(guard);
    tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .unwrap()
        .unwrap();
    drop(session);
    db.assert_no_locks().await;
}
