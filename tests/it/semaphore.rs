//! Counting semaphores: at most N holders, FIFO waiters, no busy polling, and everything a lock
//! guarantees (cancel safety, timeouts, panics, loss), checked with `pg_locks` at the end.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pglock::{AdvisoryKey, AdvisoryLockGuard, HealthCheck, LossReason, Semaphore};
use tokio::time::Instant;

use crate::harness::{drop_after_polls, TestDb};

/// A semaphore name no other test uses.
fn name(db: &TestDb, what: &str) -> String {
    format!("{}-{what}", db.app)
}

/// The slots of `sem` held now by any session (from `pg_locks`), and whether its gate is held.
async fn slot_holders(db: &TestDb, sem: &Semaphore) -> (Vec<(u32, i32)>, bool) {
    let mut slots = Vec::new();
    for slot in 0..sem.permits() {
        for pid in db.holders(sem.slot_key(slot)).await {
            slots.push((slot, pid));
        }
    }
    let gate = !db.holders(sem.gate_key()).await.is_empty();
    (slots, gate)
}

/// Waits (up to 5 s) until the semaphore's gate is free: the head waiter releases it in the
/// background once it has its slot.
async fn gate_released(db: &TestDb, sem: &Semaphore) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !db.holders(sem.gate_key()).await.is_empty() {
        assert!(Instant::now() < deadline, "the gate stays held");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn one_statement_takes_exactly_one_slot_in_order() {
    let db = TestDb::new("sem_one_slot").await;
    let pool = db.pool(4);
    let sem = Semaphore::new(&pool, &name(&db, "s"), 5);
    let first = sem.acquire().await.unwrap();
    assert_eq!(first.slot(), 0);
    assert_eq!(first.permits(), 5);
    gate_released(&db, &sem).await;
    // All five slots were free: the search took the first and stopped there.
    let pid = AdvisoryLockGuard::backend_pid(&first);
    assert_eq!(slot_holders(&db, &sem).await, (vec![(0, pid)], false));
    let second = sem.try_acquire().await.unwrap().expect("a free slot");
    assert_eq!(second.slot(), 1);
    let second_pid = AdvisoryLockGuard::backend_pid(&second);
    gate_released(&db, &sem).await;
    assert_eq!(
        slot_holders(&db, &sem).await,
        (vec![(0, pid), (1, second_pid)], false)
    );
    // A freed slot is taken again first.
    first.release().await.unwrap();
    let third = sem.acquire().await.unwrap();
    assert_eq!(third.slot(), 0);
    drop((second, third));
    db.assert_no_locks().await;
}

#[test]
fn keys_are_pairs_apart_from_named_locks() {
    let space = AdvisoryKey::semaphore_space("exports");
    assert_eq!(space, -2_128_988_261);
    assert!(matches!(
        AdvisoryKey::from_name("exports"),
        AdvisoryKey::Single(_)
    ));
}

/// Eleven tasks on three slots, each taking a permit four times: never more than three hold
/// one at once, never two the same slot, and at some point three do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_n_holders_and_distinct_slots() {
    let db = TestDb::new("sem_exclusion").await;
    let pool = db.pool(16);
    let sem = Semaphore::new(&pool, &name(&db, "s"), 3);
    let inside = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let slots = Arc::new(Mutex::new(HashSet::new()));
    let mut tasks = Vec::new();
    for _ in 0..11 {
        let (sem, inside, most, slots) = (sem.clone(), inside.clone(), most.clone(), slots.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..4 {
                let permit = sem.acquire().await.unwrap();
                assert!(
                    slots.lock().unwrap().insert(permit.slot()),
                    "slot taken twice"
                );
                let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
                inside.fetch_sub(1, Ordering::SeqCst);
                slots.lock().unwrap().remove(&permit.slot());
                permit.release().await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(most.load(Ordering::SeqCst), 3);
    db.assert_no_locks().await;
}

/// Waiters that reach the queue one after another get their slots in that order, and a
/// `try_acquire` does not overtake them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_are_served_in_arrival_order() {
    let db = TestDb::new("sem_fifo").await;
    let pool = db.pool(12);
    let sem = Semaphore::new(&pool, &name(&db, "s"), 2);
    let held = [sem.acquire().await.unwrap(), sem.acquire().await.unwrap()];
    gate_released(&db, &sem).await;
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut waiters = Vec::new();
    for id in 0..6 {
        let (waiter, order) = (sem.clone(), order.clone());
        waiters.push(tokio::spawn(async move {
            let permit = waiter.acquire().await.unwrap();
            order.lock().unwrap().push(id);
            // Held long enough that two grants are always 50 ms apart (see below), far more
            // than the time between a grant and its record.
            tokio::time::sleep(Duration::from_millis(150)).await;
            permit.release().await.unwrap();
        }));
        // The first becomes the head (holds the gate), the others queue behind it in turn.
        if id == 0 {
            let deadline = Instant::now() + Duration::from_secs(5);
            while db.holders(sem.gate_key()).await.is_empty() {
                assert!(Instant::now() < deadline, "the first waiter holds the gate");
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        } else {
            db.wait_for_waiters(sem.gate_key(), id, Duration::from_secs(5))
                .await;
        }
    }
    // Someone waits: a try gives up, free slot or not.
    let [first, second] = held;
    drop(first);
    assert!(sem.try_acquire().await.unwrap().is_none());
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(second);
    for waiter in waiters {
        waiter.await.unwrap();
    }
    assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3, 4, 5]);
    db.assert_no_locks().await;
}

#[tokio::test]
async fn busy_is_none_and_timeouts_leave_nothing() {
    let db = TestDb::new("sem_busy").await;
    let pool = db.pool(8);
    let sem = Semaphore::new(&pool, &name(&db, "s"), 2);
    let a = sem.acquire().await.unwrap();
    let b = sem.acquire().await.unwrap();
    gate_released(&db, &sem).await;
    assert!(sem.try_acquire().await.unwrap().is_none());
    // Timed out at the head of the queue (the search), and behind a head (the gate's wait).
    let timeout = Duration::from_millis(300);
    let started = Instant::now();
    let (first, second) = tokio::join!(sem.try_acquire_for(timeout), async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        sem.try_acquire_until(Instant::now() + timeout).await
    });
    let elapsed = started.elapsed();
    assert!(first.unwrap().is_none() && second.unwrap().is_none());
    assert!(elapsed >= timeout, "{elapsed:?}");
    // The search's window is cut to the deadline: the head answers within a round trip or
    // a few of the search's 5 ms pauses of it (generous for a loaded machine).
    assert!(
        elapsed < timeout + Duration::from_millis(50) + Duration::from_secs(1),
        "{elapsed:?}"
    );
    let pids = [
        AdvisoryLockGuard::backend_pid(&a),
        AdvisoryLockGuard::backend_pid(&b),
    ];
    let (slots, gate) = slot_holders(&db, &sem).await;
    assert_eq!(slots, vec![(0, pids[0]), (1, pids[1])]);
    assert!(!gate, "a timed-out waiter left the gate held");
    assert!(db.waiters(sem.gate_key()).await.is_empty());
    // A slot freed during a timed wait is taken.
    let freed = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        a.release().await.unwrap();
    });
    let permit = sem
        .try_acquire_for(Duration::from_secs(5))
        .await
        .unwrap()
        .expect("the freed slot");
    assert_eq!(permit.slot(), 0);
    freed.await.unwrap();
    drop((permit, b));
    db.assert_no_locks().await;
}

/// Every acquisition dropped after 1..=8 polls, with the slots free and with them busy, on a
/// pool, a dedicated session and a shared session: nothing is left held or queued, and the
/// pool's connections come back clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_acquisitions_leave_nothing() {
    let db = TestDb::new("sem_cancel").await;
    let pool = db.pool(4);
    let dedicated = db.dedicated_session().await;
    let shared = db.session().await;
    let name = name(&db, "s");
    let sems = [
        Semaphore::new(&pool, &name, 2),
        Semaphore::new(&dedicated, &name, 2),
        Semaphore::new(&shared, &name, 2),
    ];
    let other = db.pool(2);
    let blocker = Semaphore::new(&other, &name, 2);
    let mut completed = 0;
    for busy in [false, true] {
        let held = if busy {
            Some([
                blocker.acquire().await.unwrap(),
                blocker.acquire().await.unwrap(),
            ])
        } else {
            None
        };
        for polls in 1..=8 {
            for sem in &sems {
                for kind in 0..3 {
                    let outcome = match kind {
                        0 => drop_after_polls(sem.acquire(), polls)
                            .await
                            .map(|r| r.map(Some)),
                        1 => drop_after_polls(sem.try_acquire(), polls).await,
                        _ => {
                            drop_after_polls(sem.try_acquire_for(Duration::from_millis(30)), polls)
                                .await
                        }
                    };
                    if let Some(result) = outcome {
                        if result.unwrap().is_some() {
                            completed += 1;
                        }
                    }
                }
            }
            // What is left after the abandoned attempts is cleaned up in the background: only
            // the blocker's slots remain.
            let expected: Vec<u32> = if busy { vec![0, 1] } else { vec![] };
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let (slots, gate) = slot_holders(&db, &blocker).await;
                let slots: Vec<u32> = slots.iter().map(|(slot, _)| *slot).collect();
                let queued = db.waiters(blocker.gate_key()).await;
                if slots == expected && !gate && queued.is_empty() {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "left after {polls} polls (busy: {busy}): {slots:?}, gate {gate}, {queued:?}"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        drop(held);
    }
    assert!(
        completed > 0,
        "some acquisitions complete within a few polls"
    );
    db.assert_no_locks().await;
    // Every source still works, and the pool's connections hold nothing.
    for sem in &sems {
        let permit = sem.acquire().await.unwrap();
        permit.release().await.unwrap();
    }
    db.assert_no_locks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_the_critical_section_frees_the_slot() {
    let db = TestDb::new("sem_panic").await;
    let pool = db.pool(4);
    let sem = Semaphore::new(&pool, &name(&db, "s"), 1);
    let task = {
        let sem = sem.clone();
        tokio::spawn(async move {
            let _permit = sem.acquire().await.unwrap();
            panic!("the work failed");
        })
    };
    assert!(task.await.unwrap_err().is_panic());
    let permit = sem
        .try_acquire_for(Duration::from_secs(5))
        .await
        .unwrap()
        .expect("the panicked task's slot is free again");
    drop(permit);
    db.assert_no_locks().await;
}

/// Two permits of one semaphore on one shared session hold two slots (the session's own slot
/// is never granted to it twice), and a third finds none.
#[tokio::test]
async fn permits_on_one_session_hold_distinct_slots() {
    let db = TestDb::new("sem_session").await;
    for session in [db.session().await, db.dedicated_session().await] {
        let sem = Semaphore::new(&session, &name(&db, "s"), 2);
        let a = sem.acquire().await.unwrap();
        let b = sem.acquire().await.unwrap();
        assert_eq!((a.slot(), b.slot()), (0, 1));
        assert!(sem.try_acquire().await.unwrap().is_none());
        assert!(sem
            .try_acquire_for(Duration::from_millis(100))
            .await
            .unwrap()
            .is_none());
        drop(a);
        let c = sem
            .try_acquire_for(Duration::from_secs(5))
            .await
            .unwrap()
            .expect("the dropped permit's slot");
        assert_eq!(c.slot(), 0);
        drop((b, c));
        db.assert_no_locks().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_backend_is_seen_as_lost_and_its_slot_freed() {
    let db = TestDb::new("sem_loss").await;
    let pool = db.pool(4);
    let health = HealthCheck::new(Duration::from_millis(200), Duration::from_secs(1));
    let sem = Semaphore::new(&pool, &name(&db, "s"), 1).health_check(health);
    let permit = sem.acquire().await.unwrap();
    let mut lost = permit.loss_signal();
    assert!(!permit.is_lost());
    db.terminate_and_wait(AdvisoryLockGuard::backend_pid(&permit))
        .await;
    // Detection bound plus scheduling delay on a loaded machine.
    let bound = health.detection_bound() + Duration::from_secs(1);
    let reason = tokio::time::timeout(bound, lost.lost())
        .await
        .expect("loss seen within the bound");
    assert!(
        matches!(reason, LossReason::ConnectionClosed { .. }),
        "{reason:?}"
    );
    assert!(permit.is_lost());
    let other = sem.try_acquire().await.unwrap().expect("the slot is free");
    assert_eq!(other.slot(), 0);
    assert!(permit.release().await.is_err());
    drop(other);
    db.assert_no_locks().await;
}

/// While every slot stays busy, the waiters cost the server about one statement a second in
/// all (the head's search), however many there are: counted from `pg_stat_activity`, where
/// every statement a backend starts changes its `query_start`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_cost_about_one_statement_a_second() {
    let db = TestDb::new("sem_cost").await;
    let pool = db.pool(8);
    let sem = Semaphore::new(&pool, &name(&db, "s"), 1);
    let holder = sem.acquire().await.unwrap();
    let holder_pid = AdvisoryLockGuard::backend_pid(&holder);
    let mut waiters = Vec::new();
    for _ in 0..5 {
        let sem = sem.clone();
        // Each releases its permit as soon as it has it, so the next one (in queue order)
        // gets it in turn.
        waiters.push(tokio::spawn(async move { sem.acquire().await.map(drop) }));
    }
    db.wait_for_waiters(sem.gate_key(), 4, Duration::from_secs(5))
        .await;
    // Sample every backend of the test (except the holder's) every 10 ms for 3 s: a statement
    // lasting 5 ms or more (the search's shortest, one pause) is seen at least once.
    let window = Duration::from_secs(3);
    let started = Instant::now();
    let mut seen: HashMap<i32, HashSet<String>> = HashMap::new();
    while started.elapsed() < window {
        for row in db
            .admin()
            .query(
                "SELECT pid, query_start::text FROM pg_stat_activity
                 WHERE application_name = $1 AND pid <> $2",
                &[&db.app, &holder_pid],
            )
            .await
            .unwrap()
        {
            seen.entry(row.get(0)).or_default().insert(row.get(1));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The first sample shows each backend's statement in progress: count the ones after it.
    let started_statements: usize = seen.values().map(|starts| starts.len() - 1).sum();
    let per_second = started_statements as f64 / window.as_secs_f64();
    println!("waiters' statements: {started_statements} in {window:?} ({per_second:.2}/s)");
    // One search a second (the window), plus one for a window that straddles the start, plus
    // one for a search that ends early on a loaded machine.
    assert!(
        started_statements <= 3 + 2,
        "{started_statements} statements in {window:?}: {seen:?}"
    );
    drop(holder);
    for waiter in waiters {
        waiter.await.unwrap().unwrap();
    }
    db.assert_no_locks().await;
}
