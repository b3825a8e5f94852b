//! `pglock run --slots N NAME`: a fleet of processes on a semaphore, recording in the database
//! when each command ran and in which slot; `-n` on a full semaphore; `pglock status` naming the
//! slots; a terminated holder's command stopped.

use std::process::Stdio;
use std::time::{Duration, SystemTime};

use pglock::introspect::Introspect;
use tokio::process::Command;

use crate::cli::unique;
use crate::harness::{database_url, TestDb};

/// `pglock` with the test database as `DATABASE_URL`.
fn pglock(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_pglock"));
    command
        .args(args)
        .env("DATABASE_URL", database_url())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// Sixteen `pglock run --slots 3` processes started at once, each command recording its start,
/// end and slot in a table: never more than three ran at once, three did at some point, no two
/// ran in one slot at once, all sixteen ran, and nothing is left locked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_processes_on_three_slots() {
    let db = TestDb::new("cli_sem_fleet").await;
    let name = unique("sem-fleet");
    let table = format!("sem_runs_{}", rand::random::<u32>());
    db.admin()
        .batch_execute(&format!(
            "CREATE TABLE {table} (instance int PRIMARY KEY, slot int, \
             started timestamptz, ended timestamptz)"
        ))
        .await
        .unwrap();
    let instances = 16;
    let mut fleet = Vec::new();
    for instance in 0..instances {
        // The command's own connection records the interval (psql), the work lasts 300 ms.
        let script = format!(
            "psql -q -X -v ON_ERROR_STOP=1 \"$DATABASE_URL\" \
             -c \"INSERT INTO {table} VALUES ({instance}, $PGLOCK_SLOT, clock_timestamp(), NULL)\" \
             -c 'SELECT pg_sleep(0.3)' \
             -c \"UPDATE {table} SET ended = clock_timestamp() WHERE instance = {instance}\""
        );
        let child = pglock(&["run", "--slots", "3", &name, "--", "sh", "-c", &script])
            .spawn()
            .unwrap();
        fleet.push(tokio::spawn(async move {
            tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
                .await
                .expect("pglock ends in time")
                .unwrap()
        }));
    }
    for (instance, ended) in fleet.into_iter().enumerate() {
        let output = ended.await.unwrap();
        assert_eq!(
            output.status.code(),
            Some(0),
            "instance {instance}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let rows = db
        .admin()
        .query(
            &format!("SELECT slot, started, ended FROM {table} ORDER BY started"),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), instances, "every instance ran its command");
    let runs: Vec<(i32, SystemTime, SystemTime)> = rows
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    // At each start, the runs in progress (started before, not ended yet).
    let mut most = 0;
    for (slot, started, _) in &runs {
        assert!((0..3).contains(slot), "slot {slot}");
        let running: Vec<i32> = runs
            .iter()
            .filter(|(_, s, e)| s <= started && e > started)
            .map(|(slot, _, _)| *slot)
            .collect();
        let mut distinct = running.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), running.len(), "one slot twice: {running:?}");
        most = most.max(running.len());
    }
    assert!(most <= 3, "{most} commands ran at once");
    assert_eq!(most, 3, "three commands ran at once at some point");
    db.admin()
        .batch_execute(&format!("DROP TABLE {table}"))
        .await
        .unwrap();
    let left = Introspect::new()
        .semaphore(name.as_str(), 3)
        .fetch(db.admin())
        .await
        .unwrap();
    assert!(left.is_empty(), "left locked: {left:?}");
}

/// With every slot held, `-n` exits 75 at once and `--timeout` after the timeout; `pglock
/// status` shows the holders' slots and the waiter's queue; a holder whose backend is
/// terminated stops its command and exits 76.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_semaphore_status_and_loss() {
    let db = TestDb::new("cli_sem_status").await;
    let name = unique("sem-status");
    let mut holders = Vec::new();
    for _ in 0..2 {
        holders.push(
            pglock(&["run", "--slots", "2", &name, "--", "sleep", "60"])
                .spawn()
                .unwrap(),
        );
    }
    let slots = Introspect::new().semaphore(name.as_str(), 2);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let held = slots.fetch(db.admin()).await.unwrap();
        if held
            .iter()
            .filter(|l| l.granted && l.semaphore.unwrap().slot.is_some())
            .count()
            == 2
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "holders: {held:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let busy = pglock(&["run", "-n", "--slots", "2", &name, "--", "true"])
        .output()
        .await
        .unwrap();
    assert_eq!(busy.status.code(), Some(75));
    let started = tokio::time::Instant::now();
    let timed = pglock(&[
        "run",
        "--timeout",
        "500ms",
        "--slots",
        "2",
        &name,
        "--",
        "true",
    ])
    .output()
    .await
    .unwrap();
    assert_eq!(timed.status.code(), Some(75));
    assert!(started.elapsed() >= Duration::from_millis(500));
    // A waiter at the head of the queue, then the listing.
    let mut waiter = pglock(&["run", "--slots", "2", &name, "--", "true"])
        .spawn()
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let rows = loop {
        let rows = slots.fetch(db.admin()).await.unwrap();
        if rows.iter().any(|l| l.semaphore.unwrap().slot.is_none()) {
            break rows;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no waiter: {rows:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let status = pglock(&["status"]).output().await.unwrap();
    let table = String::from_utf8_lossy(&status.stdout).into_owned();
    for label in [
        format!("{name} [slot 0 of 2]"),
        format!("{name} [slot 1 of 2]"),
        format!("{name} [queue of 2]"),
    ] {
        assert!(table.contains(&label), "{label} missing from:\n{table}");
    }
    // The holder of slot 0 loses its session: its command is stopped, it exits 76, and the
    // waiter gets the slot and runs.
    let pid = rows
        .iter()
        .find(|l| l.semaphore.unwrap().slot == Some(0))
        .and_then(|l| l.pid)
        .unwrap();
    db.terminate_and_wait(pid).await;
    let waited = tokio::time::timeout(Duration::from_secs(30), waiter.wait())
        .await
        .expect("the waiter ran")
        .unwrap();
    assert_eq!(waited.code(), Some(0));
    // The terminated one exits on its own (within its loss detection); the other is killed.
    let mut codes = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while codes.is_empty() && tokio::time::Instant::now() < deadline {
        for holder in &mut holders {
            if let Some(status) = holder.try_wait().unwrap() {
                codes.push(status.code());
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for mut holder in holders {
        if holder.try_wait().unwrap().is_none() {
            holder.start_kill().unwrap();
            holder.wait().await.unwrap();
        }
    }
    assert!(codes.contains(&Some(76)), "{codes:?}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left = slots.fetch(db.admin()).await.unwrap();
        if left.is_empty() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "left: {left:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
