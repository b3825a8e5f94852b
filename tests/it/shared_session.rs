//! A `Session` shared by several tasks: no task's acquisition, abandoned or not, may weaken
//! another's lock or disturb another's statements.

use std::os::unix::process::ExitStatusExt;
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
///
/// Transaction scope needs a [`dedicated`](Session::dedicated) session; two tasks using one
/// anyway may disturb each other's statements (as the declaration says), but never pglock's
/// mutual exclusion, which is what this checks.
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
        let session = db.dedicated_session().await;
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

/// The same scenario in a program built with `-C panic=abort`, as an application built with
/// `panic = "abort"` is (`tests/fixtures/panic_abort/closed_session_drop.rs`): it must exit 0.
/// Its control run, a panic in a spawned task, must die of SIGABRT, which shows that the build
/// aborts at a panic rather than letting tokio catch it.
#[tokio::test]
async fn guards_of_a_closed_session_dropped_together_in_a_panic_abort_build() {
    let program = build_with_panic_abort("closed_session_drop");
    let control = tokio::process::Command::new(&program)
        .arg("--panic-in-a-task")
        .output()
        .await
        .unwrap();
    assert_eq!(
        control.status.signal(),
        Some(SIGABRT),
        "the control run of a panic=abort build ended with {}:\n{}",
        control.status,
        String::from_utf8_lossy(&control.stdout)
    );
    let db = TestDb::new("shared_closed_drop_abort").await;
    let run = tokio::process::Command::new(&program)
        .arg(db.url())
        .output()
        .await
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr),
    );
    assert!(
        run.status.success() && stdout.contains("dropped"),
        "the panic=abort program ended with {}:\n{stdout}\n{stderr}",
        run.status
    );
    db.assert_no_locks().await;
}

/// SIGABRT, the signal of `std::process::abort`.
const SIGABRT: i32 = 6;

/// Builds the example `name` with `-C panic=abort` (only the example itself: a crate built to
/// unwind links into a binary that aborts) and gives its executable.
fn build_with_panic_abort(name: &str) -> std::path::PathBuf {
    let output = std::process::Command::new(env!("CARGO"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["rustc", "--quiet", "--example", name])
        .args([
            "--message-format=json-render-diagnostics",
            "--",
            "-C",
            "panic=abort",
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "cargo rustc --example {name} -- -C panic=abort: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|message| message["target"]["name"] == name)
        .find_map(|message| message["executable"].as_str().map(std::path::PathBuf::from))
        .unwrap_or_else(|| panic!("cargo built no executable for the example {name}"))
}

/// A shared session refuses transaction scope before sending anything, with an error that says
/// what to use instead; a dedicated one takes it.
#[tokio::test]
async fn transaction_scope_is_refused_on_a_shared_session() {
    let db = TestDb::new("shared_txn_refused").await;
    let session = db.session().await;
    let key = db.key();
    let lock = AdvisoryLock::new(&session, key).scope(LockScope::Transaction);
    let results = [
        lock.lock().await.map(Some),
        lock.try_lock().await,
        lock.try_lock_for(Duration::from_millis(10)).await,
        lock.try_lock_shared().await,
    ];
    for result in results {
        match result {
            Err(error @ Error::TransactionOnSharedSession { .. }) => {
                let message = error.to_string();
                assert!(message.contains("Session::dedicated()"), "{message}");
                assert!(message.contains("pool"), "{message}");
            }
            other => panic!("expected TransactionOnSharedSession, got {other:?}"),
        }
    }
    assert!(db.holders(key).await.is_empty());
    // Nothing was sent: the session is in no transaction (in the first statement of a
    // transaction, sent as a simple query, the two timestamps are the same).
    let answer = session
        .simple_query("SELECT now() <> statement_timestamp()")
        .await
        .unwrap();
    let in_transaction = answer.iter().find_map(|message| match message {
        tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
        _ => None,
    });
    assert_eq!(in_transaction.as_deref(), Some("f"));
    let dedicated = db.dedicated_session().await;
    let guard = AdvisoryLock::new(&dedicated, key)
        .scope(LockScope::Transaction)
        .lock()
        .await
        .unwrap();
    assert_eq!(
        db.holders(key).await,
        vec![AdvisoryLockGuard::backend_pid(&guard)]
    );
    AdvisoryLockGuard::commit(guard).await.unwrap();
    drop((session, dedicated));
    db.assert_no_locks().await;
}

/// Nothing pglock does on a shared session cancels a statement of another task: thousands of
/// acquisitions abandoned after 0 to 5 ms (waits on a busy key, tries, timeouts, on busy and
/// free keys), beside other tasks' `pg_sleep` and `INSERT` statements on the same session.
/// No user statement fails (57014 or otherwise), no acquisition fails (`Cancelled` or
/// otherwise), and nothing is left held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_statements_beside_abandoned_acquisitions_never_fail() {
    use rand::{Rng, SeedableRng};
    let db = TestDb::new("shared_no_stray_cancel").await;
    let session = db.session().await;
    session
        .batch_execute("CREATE TEMP TABLE shared_session_rows (n int)")
        .await
        .unwrap();
    let pool = db.pool(1);
    let busy = db.key();
    let holder = AdvisoryLock::new(&pool, busy).lock().await.unwrap();
    let seed: u64 = rand::thread_rng().gen();
    eprintln!("seed {seed}");
    const TASKS: usize = 4;
    const PER_TASK: usize = 750;
    let done = Arc::new(AtomicBool::new(false));
    let abandoned = Arc::new(AtomicUsize::new(0));
    let acquirers: Vec<_> = (0..TASKS)
        .map(|t| {
            let (session, abandoned) = (session.clone(), abandoned.clone());
            let shared_free = db.key();
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ t as u64);
            tokio::spawn(async move {
                for i in 0..PER_TASK {
                    let key = match rng.gen_range(0..3) {
                        0 => busy,
                        // A key the tasks of the session contend for among themselves.
                        1 => shared_free,
                        _ => pglock::AdvisoryKey::Single(rng.gen()),
                    };
                    let lock = AdvisoryLock::new(&session, key);
                    let patience = Duration::from_micros(rng.gen_range(0..5_000));
                    let attempt = async {
                        match rng.gen_range(0..3) {
                            0 => lock.lock().await.map(Some),
                            1 => lock.try_lock_for(Duration::from_millis(3)).await,
                            _ => lock.try_lock().await,
                        }
                    };
                    match tokio::time::timeout(patience, attempt).await {
                        Err(_) => {
                            abandoned.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Ok(guard)) => drop(guard),
                        Ok(Err(error)) => panic!("task {t}, acquisition {i}: {error:?}"),
                    }
                }
            })
        })
        .collect();
    let users: Vec<_> = (0..2i32)
        .map(|u| {
            let (session, done) = (session.clone(), done.clone());
            tokio::spawn(async move {
                let mut inserted = 0i64;
                while !done.load(Ordering::Relaxed) {
                    session
                        .batch_execute("SELECT pg_sleep(0.01)")
                        .await
                        .unwrap();
                    session
                        .execute("INSERT INTO shared_session_rows VALUES ($1)", &[&u])
                        .await
                        .unwrap();
                    inserted += 1;
                }
                inserted
            })
        })
        .collect();
    for task in acquirers {
        task.await.expect("no acquisition failed");
    }
    done.store(true, Ordering::Relaxed);
    let mut inserted = 0;
    for task in users {
        inserted += task.await.expect("no user statement failed");
    }
    let rows: i64 = session
        .query_one("SELECT count(*) FROM shared_session_rows", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, inserted, "every insert is there");
    let abandoned = abandoned.load(Ordering::Relaxed);
    eprintln!(
        "{} acquisitions, {abandoned} abandoned, {inserted} inserts",
        TASKS * PER_TASK
    );
    assert!(abandoned > 1_000, "only {abandoned} acquisitions abandoned");
    // The holder alone holds its key; nothing else is held or queued.
    assert_eq!(
        db.holders(busy).await,
        vec![AdvisoryLockGuard::backend_pid(&holder)]
    );
    drop(holder);
    tokio::time::timeout(Duration::from_secs(5), async {
        while session.held_count() > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the session's reservations are gone");
    db.assert_no_locks().await;
}

/// A second task asking a shared session for a key the session holds waits in-process until
/// the first guard is dropped (`lock`), or finds it busy (`try_lock`); the key is never
/// stacked, nothing queues on the server, and a waiter abandoned in-process leaves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_the_session_holds_is_waited_for_in_process() {
    let db = TestDb::new("shared_wait_in_process").await;
    let session = db.session().await;
    let key = db.key();
    let lock = AdvisoryLock::new(&session, key);
    let first = lock.lock().await.unwrap();
    let pid = AdvisoryLockGuard::backend_pid(&first);
    let second = {
        let lock = lock.clone();
        tokio::spawn(async move { lock.lock().await })
    };
    let abandoned = {
        let lock = lock.clone();
        tokio::spawn(async move { lock.lock().await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!second.is_finished() && !abandoned.is_finished());
    assert!(lock.try_lock().await.unwrap().is_none(), "busy for a try");
    assert!(lock
        .try_lock_for(Duration::from_millis(20))
        .await
        .unwrap()
        .is_none());
    // Held once, by the session; nobody waits on the server.
    assert_eq!(db.holders(key).await, vec![pid]);
    assert!(db.waiters(key).await.is_empty());
    abandoned.abort();
    assert!(abandoned.await.unwrap_err().is_cancelled());
    drop(first);
    let second = tokio::time::timeout(Duration::from_secs(5), second)
        .await
        .expect("the waiter is granted once the first guard is gone")
        .unwrap()
        .unwrap();
    assert_eq!(db.holders(key).await, vec![pid]);
    drop(second);
    // The abandoned waiter left nothing: the key is free for the next try at once.
    tokio::time::timeout(Duration::from_secs(5), async {
        while session.held_count() > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the session's reservations are gone");
    let again = lock.try_lock().await.unwrap().expect("free again");
    drop(again);

    // The same for a LockSet.
    let set = pglock::LockSet::from_sessions([session.clone()]).unwrap();
    let held = set.try_lock(key).await.unwrap().expect("free");
    let waiting = {
        let set = set.clone();
        tokio::spawn(async move { set.lock(key).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!waiting.is_finished());
    assert!(set.try_lock(key).await.unwrap().is_none());
    drop(held);
    let granted = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the set's waiter is granted")
        .unwrap()
        .unwrap();
    drop(granted);
    drop((lock, set, session));
    db.assert_no_locks().await;
}
