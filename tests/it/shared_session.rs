//! A `Session` shared by several tasks: no task's acquisition, abandoned or not, may weaken
//! another's lock or disturb another's statements.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pglock::{AdvisoryLock, AdvisoryLockGuard, Error, LockScope, Session};

use crate::harness::TestDb;

/// Task A of the race below: abandons transaction-scoped `try_lock`s of `key` on `session` at
/// their first poll until `stop`, counting them in `abandoned`.
fn abandon_transactions(
    session: &Arc<Session>,
    key: pglock::AdvisoryKey,
    stop: Arc<AtomicBool>,
    abandoned: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<()> {
    let lock = AdvisoryLock::new(session, key).scope(LockScope::Transaction);
    tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            match tokio::time::timeout(Duration::ZERO, lock.try_lock()).await {
                Err(_) => {
                    abandoned.fetch_add(1, Ordering::Relaxed);
                }
                // Finished at the first poll: granted, or the session's transaction was taken.
                Ok(Ok(guard)) => drop(guard),
                Ok(Err(Error::TransactionInProgress)) => {}
                Ok(Err(error)) => panic!("task A: {error:?}"),
            }
            tokio::task::yield_now().await;
        }
    })
}

/// Task B of the race below: takes `key` with transaction scope on `session` and, while it
/// holds it, asks another connection (`other`) for it, until `until`; returns the rounds held.
async fn hold_and_check(
    session: Arc<Session>,
    other: deadpool_postgres::Pool,
    key: pglock::AdvisoryKey,
    until: tokio::time::Instant,
) -> usize {
    let lock = AdvisoryLock::new(&session, key).scope(LockScope::Transaction);
    let on_other = AdvisoryLock::new(&other, key);
    let mut held_rounds = 0;
    while tokio::time::Instant::now() < until {
        let guard = match lock.try_lock().await {
            Ok(Some(guard)) => guard,
            // Task A's attempt holds the session's transaction for the moment.
            Err(Error::TransactionInProgress) => {
                tokio::task::yield_now().await;
                continue;
            }
            other => panic!("task B: {other:?}"),
        };
        held_rounds += 1;
        let taken_elsewhere = on_other.try_lock().await.unwrap();
        assert!(
            taken_elsewhere.is_none(),
            "round {held_rounds}: another session was granted the key while task B's guard \
             held it (guard reports lost: {})",
            AdvisoryLockGuard::is_lost(&guard)
        );
        AdvisoryLockGuard::commit(guard).await.unwrap();
    }
    held_rounds
}

/// An abandoned transaction-scoped attempt's `ROLLBACK` is queued before the session's
/// transaction reservation is freed: another task's `BEGIN` + lock can never run inside the
/// abandoned transaction and be rolled back with it, leaving a guard that holds nothing.
///
/// On each of four sessions, task A abandons transaction-scoped `try_lock`s at their first
/// poll, over and over; task B takes another key with transaction scope on the same session
/// and, while it holds it, asks a second connection for that key, which must find it busy.
/// More tasks than cores, so that a thread can be preempted inside the handover.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_abandoned_transaction_attempt_never_ends_another_tasks_transaction() {
    let db = TestDb::new("shared_txn_race").await;
    let stop = Arc::new(AtomicBool::new(false));
    let abandoned = Arc::new(AtomicUsize::new(0));
    // The defect showed within 0.1 to 2.5 s with one pair of tasks.
    let until = tokio::time::Instant::now() + Duration::from_secs(4);
    let mut a_tasks = Vec::new();
    let mut b_tasks = Vec::new();
    let mut sessions = Vec::new();
    for _ in 0..4 {
        let session = db.session().await;
        a_tasks.push(abandon_transactions(
            &session,
            db.key(),
            stop.clone(),
            abandoned.clone(),
        ));
        b_tasks.push(tokio::spawn(hold_and_check(
            session.clone(),
            db.pool(1),
            db.key(),
            until,
        )));
        sessions.push(session);
    }
    let mut held_rounds = 0;
    for task in b_tasks {
        held_rounds += task.await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    for task in a_tasks {
        task.await.unwrap();
    }
    let abandoned = abandoned.load(Ordering::Relaxed);
    eprintln!("{held_rounds} rounds held, {abandoned} attempts abandoned");
    assert!(held_rounds > 0, "task B never held its key");
    assert!(abandoned > 0, "task A never abandoned an attempt");
    drop(sessions);
    db.assert_no_locks().await;
}

/// The environment variable that makes [`guards_of_a_closed_session_dropped_together`] run its
/// scenario in a child process where any panic aborts.
const ABORT_ON_PANIC: &str = "PGLOCK_TEST_ABORT_ON_PANIC";

/// Two guards of one `Session` whose backend was terminated, dropped together once the
/// connection has closed: their unlocks go out as one batched statement, whose first poll finds
/// the connection closed and finishes it. Nothing may panic, in any thread.
///
/// The scenario runs in a child process (this test binary, running this test alone) with a
/// panic hook that aborts, as a binary built with `panic = "abort"` does at any panic: tokio
/// would otherwise catch a panic in a background task and the test would not see it. The
/// child's exit status tells.
#[test]
fn guards_of_a_closed_session_dropped_together() {
    if std::env::var_os(ABORT_ON_PANIC).is_some() {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            previous(info);
            std::process::abort();
        }));
        // One thread: the unlocks' task runs only once the dropping task yields, so that both
        // drops are in by then and go out together.
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(drop_guards_of_a_closed_session());
        return;
    }
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "shared_session::guards_of_a_closed_session_dropped_together",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ABORT_ON_PANIC, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the child process ended with {}:\n{stdout}\n{stderr}",
        output.status
    );
    // The child ran the scenario (and not zero tests).
    assert!(stdout.contains("1 passed"), "{stdout}\n{stderr}");
}

async fn drop_guards_of_a_closed_session() {
    let db = TestDb::new("shared_closed_drop").await;
    let session = db.session().await;
    let first = AdvisoryLock::new(&session, db.key()).lock().await.unwrap();
    let second = AdvisoryLock::new(&session, db.key()).lock().await.unwrap();
    db.terminate_and_wait(AdvisoryLockGuard::backend_pid(&first))
        .await;
    tokio::time::timeout(Duration::from_secs(5), async {
        while !session.is_closed() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the session sees its connection closed");
    drop((first, second));
    // The unlocks' tasks run (and finish) on the runtime meanwhile.
    tokio::time::timeout(Duration::from_secs(5), async {
        while session.held_count() > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the keys' reservations are gone");
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(session);
    db.assert_no_locks().await;
}
