//! Many held locks on few connections: `LockSet`, pipelining, the server's lock table limit.

use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use pglock::{AdvisoryKey, AdvisoryLock, AdvisoryLockGuard, Error, LockSet, WaitStrategy};
use tokio::time::Instant;

use crate::harness::{drop_after_polls, TestDb};
use crate::support::ThrowawayCluster;

async fn lock_set(db: &TestDb, sessions: usize) -> LockSet {
    let mut all = Vec::new();
    for _ in 0..sessions {
        all.push(db.session().await);
    }
    LockSet::from_sessions(all)
        .unwrap()
        .wait_strategy(WaitStrategy::Poll {
            initial: Duration::from_millis(2),
            max: Duration::from_millis(20),
        })
        .unwrap()
}

#[tokio::test]
async fn holds_thousands_of_keys_on_four_connections() {
    let db = TestDb::new("lockset_many").await;
    let set = lock_set(&db, 4).await;
    let base: i64 = match db.key() {
        AdvisoryKey::Single(k) => k & !0xffff,
        AdvisoryKey::Pair(..) => unreachable!(),
    };
    let keys: Vec<i64> = (0..2_000).map(|i| base + i).collect();
    let mut pending: FuturesUnordered<_> = keys.iter().map(|k| set.try_lock(*k)).collect();
    let mut guards = Vec::new();
    while let Some(result) = pending.next().await {
        guards.push(result.unwrap().expect("a fresh key is free"));
    }
    drop(pending);
    assert_eq!(set.held(), keys.len());
    assert_eq!(db.sessions().await, 4);
    assert_eq!(db.locks().await.len(), keys.len());
    // Every session got a share.
    for session in set.sessions() {
        assert!(session.held_count() > 300, "{}", session.held_count());
    }
    // Another connection sees them held; the set refuses to stack one.
    let outsider = db.pool(1);
    assert!(AdvisoryLock::new(&outsider, keys[7])
        .try_lock()
        .await
        .unwrap()
        .is_none());
    // Held by the set itself: busy, without stacking it.
    assert!(set.try_lock(keys[7]).await.unwrap().is_none());
    assert_eq!(db.holders(keys[7].into()).await.len(), 1);
    drop(guards);
    db.assert_no_locks().await;
    assert_eq!(set.held(), 0);
}

#[tokio::test]
async fn a_wait_never_blocks_the_other_locks_of_its_session() {
    let db = TestDb::new("lockset_wait").await;
    let set = lock_set(&db, 1).await;
    let outsider_pool = db.pool(1);
    let busy = db.key();
    let outside = AdvisoryLock::new(&outsider_pool, busy)
        .lock()
        .await
        .unwrap();
    let waiting = {
        let set = set.clone();
        tokio::spawn(async move { set.lock(busy).await })
    };
    tokio::time::sleep(Duration::from_millis(30)).await;
    // The one session of the set still serves other keys at once.
    let started = Instant::now();
    let mut others = Vec::new();
    for _ in 0..20 {
        others.push(set.try_lock(db.key()).await.unwrap().expect("free key"));
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(
        db.waiters(busy).await.is_empty(),
        "polling never queues in the server"
    );
    AdvisoryLockGuard::unlock(outside).await.unwrap();
    let guard = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the poller gets the key once free")
        .unwrap()
        .unwrap();
    drop(guard);
    drop(others);
    assert!(matches!(
        set.clone().wait_strategy(WaitStrategy::Block),
        Err(Error::Config(_))
    ));
    db.assert_no_locks().await;
}

#[tokio::test]
async fn cancelled_acquisitions_leave_nothing() {
    let db = TestDb::new("lockset_cancel").await;
    let set = lock_set(&db, 2).await;
    let outsider_pool = db.pool(1);
    let busy = db.key();
    let outside = AdvisoryLock::new(&outsider_pool, busy)
        .lock()
        .await
        .unwrap();
    for polls in 1..=8 {
        assert!(drop_after_polls(set.lock(busy), polls).await.is_none());
        assert!(
            drop_after_polls(set.try_lock_for(busy, Duration::from_secs(5)), polls)
                .await
                .is_none()
        );
    }
    AdvisoryLockGuard::unlock(outside).await.unwrap();
    // Free keys: a try_lock dropped after any number of polls leaves no lock behind.
    for polls in 1..=4 {
        let key = db.key();
        if let Some(result) = drop_after_polls(set.try_lock(key), polls).await {
            drop(result.unwrap());
        }
    }
    db.assert_no_locks().await;
    // And the key itself can be taken again once the abandoned attempts are cleaned up.
    let deadline = Instant::now() + Duration::from_secs(5);
    let guard = loop {
        match set.try_lock(busy).await {
            Ok(Some(guard)) => break guard,
            Ok(None) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            other => panic!("{other:?}"),
        }
    };
    drop(guard);
    db.assert_no_locks().await;
}

#[tokio::test]
async fn relocking_right_after_a_drop_on_a_session_takes_no_extra_round_trip() {
    let db = TestDb::new("session_relock").await;
    let session = db.session().await;
    let key = db.key();
    let lock = AdvisoryLock::new(session.clone(), key);
    for _ in 0..50 {
        // The release is queued ahead of the next request on the same connection, so the key
        // may be asked for again at once.
        drop(lock.lock().await.unwrap());
    }
    let guard = lock.lock().await.unwrap();
    AdvisoryLockGuard::unlock(guard).await.unwrap();
    // PostgreSQL's count for the key is back to zero: no stacked lock survived.
    assert!(db.holders(key).await.is_empty());
    db.assert_no_locks().await;
}

/// The advisory locks granted on a server, as `(pid, objid)`: the keys, for the small keys the
/// full-table test uses.
async fn granted_advisory_locks(admin: &tokio_postgres::Client) -> Vec<(i32, i64)> {
    admin
        .query(
            "SELECT pid, objid::int8 FROM pg_locks WHERE locktype = 'advisory' AND granted",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

/// A throwaway server with a tiny lock table: fill it, get the typed error, lose nothing.
#[tokio::test]
async fn a_full_lock_table_is_a_typed_error_and_loses_nothing() {
    let db = TestDb::new("lockset_oom").await;
    // The lock table is shared by every session of a server: fill a throwaway one, never the
    // shared server the other tests use.
    let cluster = ThrowawayCluster::builder()
        .setting("max_locks_per_transaction", 10)
        .max_connections(10)
        .start()
        .await;
    // Connected before the table fills (a new connection needs no lock table entry, but keep
    // the test independent of that).
    let admin = crate::harness::connect(&cluster.url()).await;
    let set = Arc::new(LockSet::connect(&cluster.url(), 2).await.unwrap());
    let mut held = Vec::new();
    let mut failure = None;
    let mut failed_keys = Vec::new();
    'fill: for batch in 0..200i64 {
        let mut pending: FuturesUnordered<_> = (0..100)
            .map(|i| {
                let attempt = set.try_lock(batch * 100 + i);
                async move { (batch * 100 + i, attempt.await) }
            })
            .collect();
        while let Some((key, result)) = pending.next().await {
            match result {
                Ok(Some(guard)) => held.push(guard),
                Ok(None) => panic!("nobody else uses this server"),
                Err(e) => {
                    failed_keys.push(key);
                    failure.get_or_insert(e);
                }
            }
        }
        if failure.is_some() {
            break 'fill;
        }
    }
    let failure = failure.expect("a tiny lock table fills up");
    eprintln!(
        "the throwaway server took {} locks before: {failure}",
        held.len()
    );
    assert!(
        matches!(failure, Error::OutOfLockMemory { .. }),
        "{failure:?}"
    );
    assert!(
        failure.to_string().contains("max_locks_per_transaction"),
        "{failure}"
    );
    // Every lock granted before the failure is still held, on the server as in the set.
    let count = |admin: tokio_postgres::Client| async move {
        let n: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        (admin, n as usize)
    };
    // Failed attempts are settled in the background (an unknown outcome is checked and
    // undone); once they are, the server holds exactly the granted locks.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut admin = admin;
    loop {
        let (back, on_server) = count(admin).await;
        admin = back;
        if on_server == held.len() {
            break;
        }
        if Instant::now() >= deadline {
            let rows = granted_advisory_locks(&admin).await;
            let mine: std::collections::HashSet<i64> = held
                .iter()
                .map(|g| match AdvisoryLockGuard::key(g) {
                    AdvisoryKey::Single(k) => k,
                    AdvisoryKey::Pair(..) => unreachable!(),
                })
                .collect();
            let extra: Vec<(i32, i64, bool)> = rows
                .into_iter()
                .filter(|(_, k)| !mine.contains(k))
                .map(|(pid, k)| (pid, k, failed_keys.contains(&k)))
                .collect();
            panic!(
                "the server holds {on_server} locks, the set {}: extra (pid, key, failed) {extra:?}",
                held.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The set counts failed attempts until their cleanup is over.
    let deadline = Instant::now() + Duration::from_secs(5);
    while set.held() != held.len() {
        assert!(
            Instant::now() < deadline,
            "the set counts {} keys, {} are held",
            set.held(),
            held.len()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(held.len() >= 100, "held {}", held.len());
    // Freeing some room makes the set usable again.
    held.truncate(held.len() - 50);
    let deadline = Instant::now() + Duration::from_secs(5);
    let extra = loop {
        match set.try_lock(1_000_000i64).await {
            Ok(Some(guard)) => break guard,
            Err(Error::OutOfLockMemory { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            other => panic!("{other:?}"),
        }
    };
    drop(extra);
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut admin = admin;
    loop {
        let (back, n) = count(admin).await;
        admin = back;
        if n == 0 {
            break;
        }
        if Instant::now() >= deadline {
            // A lock left now was stacked: taken twice by one session, released once.
            let rows = granted_advisory_locks(&admin).await;
            panic!("{n} locks left on the throwaway server, (pid, key): {rows:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    db.assert_no_locks().await;
}

/// Waits until the set holds nothing (releases on drop are confirmed in the background), then
/// checks that the server agrees.
async fn all_released(db: &TestDb, set: &LockSet) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while set.held() != 0 {
        assert!(Instant::now() < deadline, "{} still held", set.held());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    db.assert_no_locks().await;
}

/// The session's last statement, as `pg_stat_activity` shows it.
async fn last_statement(db: &TestDb, backend_pid: i32) -> String {
    db.admin()
        .query_one(
            "SELECT query FROM pg_stat_activity WHERE pid = $1",
            &[&backend_pid],
        )
        .await
        .unwrap()
        .get(0)
}

/// Concurrent `try_lock`s of one session go out together, and the batch answers each request
/// its own way: granted (for both key forms), busy, or already held by the set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_batch_answers_each_request_its_own_way() {
    let db = TestDb::new("lockset_batch").await;
    let set = lock_set(&db, 1).await;
    let outsider_pool = db.pool(1);
    let busy = db.key();
    let outside = AdvisoryLock::new(&outsider_pool, busy)
        .lock()
        .await
        .unwrap();
    let already = db.key();
    let first = set.try_lock(already).await.unwrap().expect("free key");
    let session_pid = AdvisoryLockGuard::backend_pid(&first);
    let singles: Vec<AdvisoryKey> = (0..100).map(|_| db.key()).collect();
    let pair_base: i32 = rand::random();
    let pairs: Vec<AdvisoryKey> = (0..100).map(|i| AdvisoryKey::Pair(pair_base, i)).collect();
    let free: Vec<AdvisoryKey> = singles.iter().chain(&pairs).copied().collect();
    let results = futures_util::future::join_all(
        free.iter()
            .chain([&busy, &already])
            .map(|k| set.try_lock(*k)),
    )
    .await;
    // The last thing the session ran was a statement for many keys at once.
    let statement = last_statement(&db, session_pid).await;
    assert!(statement.contains("unnest"), "{statement}");
    let mut results = results.into_iter();
    let guards: Vec<AdvisoryLockGuard> = results
        .by_ref()
        .take(free.len())
        .map(|result| result.unwrap().expect("a free key is granted"))
        .collect();
    assert!(matches!(results.next(), Some(Ok(None))), "busy key");
    assert!(
        matches!(results.next(), Some(Ok(None))),
        "a key the set holds is busy"
    );
    for (guard, key) in guards.iter().zip(&free) {
        assert_eq!(AdvisoryLockGuard::key(guard), *key);
        assert_eq!(AdvisoryLockGuard::backend_pid(guard), session_pid);
    }
    // The outsider holds the busy key; the set's one session holds the rest.
    let on_server: Vec<_> = db
        .locks()
        .await
        .into_iter()
        .filter(|(_, key, _, _)| *key != busy)
        .collect();
    assert_eq!(on_server.len(), free.len() + 1);
    assert!(on_server
        .iter()
        .all(|(pid, _, mode, granted)| *pid == session_pid && mode == "ExclusiveLock" && *granted));
    assert_eq!(set.held(), free.len() + 1);
    // Each guard releases its own key.
    AdvisoryLockGuard::unlock(guards.into_iter().nth(3).unwrap())
        .await
        .unwrap();
    drop(first);
    drop(outside);
    all_released(&db, &set).await;
}

/// Requests abandoned at any point of a batch (queued, on the wire, answered but unread) leave
/// no lock behind, and the keys can be taken again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_abandoned_around_a_batch_leave_nothing() {
    let db = TestDb::new("lockset_batch_cancel").await;
    let set = lock_set(&db, 2).await;
    let mut all_keys = Vec::new();
    for round in 0..24 {
        let keys: Vec<AdvisoryKey> = (0..40).map(|_| db.key()).collect();
        all_keys.extend(keys.iter().copied());
        let everything = futures_util::future::join_all(keys.iter().map(|k| set.try_lock(*k)));
        if round % 2 == 0 {
            // Dropped after a few polls of all of them together.
            if let Some(results) = drop_after_polls(everything, 1 + round / 2).await {
                drop(results);
            }
        } else {
            // Some answers read, the rest dropped wherever they are.
            let mut pending: FuturesUnordered<_> = keys.iter().map(|k| set.try_lock(*k)).collect();
            drop(everything);
            let mut kept = Vec::new();
            for _ in 0..round % 7 {
                if let Some(result) = pending.next().await {
                    kept.push(result.unwrap().expect("free key"));
                }
            }
            drop(pending);
            drop(kept);
        }
    }
    all_released(&db, &set).await;
    // Every key is free again, on the server and in the set.
    let guards = futures_util::future::join_all(all_keys.iter().map(|k| set.try_lock(*k))).await;
    for guard in guards {
        drop(guard.unwrap().expect("free again"));
    }
    all_released(&db, &set).await;
}

/// Many keys waited for at once poll through their session's batches: nothing queues in the
/// server, a deadline ends a wait busy, and every waiter gets its key once it is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_waiting_keys_poll_together() {
    let db = TestDb::new("lockset_poll_batch").await;
    let set = lock_set(&db, 1).await;
    let outsider = db.session().await;
    let keys: Vec<AdvisoryKey> = (0..50).map(|_| db.key()).collect();
    let mut outside = Vec::new();
    for key in keys.iter().copied() {
        outside.push(AdvisoryLock::new(&outsider, key).lock().await.unwrap());
    }
    let also_busy = db.key();
    outside.push(
        AdvisoryLock::new(&outsider, also_busy)
            .lock()
            .await
            .unwrap(),
    );
    let waiting: Vec<_> = keys
        .iter()
        .map(|key| {
            let (set, key) = (set.clone(), *key);
            tokio::spawn(async move { set.lock(key).await })
        })
        .collect();
    let started = Instant::now();
    let timeout = Duration::from_millis(60);
    assert!(set
        .try_lock_for(also_busy, timeout)
        .await
        .unwrap()
        .is_none());
    assert!(started.elapsed() >= timeout, "{:?}", started.elapsed());
    for key in &keys {
        assert!(db.waiters(*key).await.is_empty(), "polling never queues");
    }
    assert!(waiting.iter().all(|task| !task.is_finished()));
    drop(outside);
    let mut guards = Vec::new();
    for task in waiting {
        let guard = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("every waiter gets its key once free")
            .unwrap()
            .unwrap();
        guards.push(guard);
    }
    assert_eq!(set.held(), keys.len());
    drop(guards);
    all_released(&db, &set).await;
}

/// The session's backend is terminated while batches are on the wire: every request ends,
/// granted or with `ConnectionLost`, nothing hangs, and the set lets go of every key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_killed_under_its_batches_ends_every_request() {
    let db = TestDb::new("lockset_batch_killed").await;
    let set = lock_set(&db, 1).await;
    let first = set.try_lock(db.key()).await.unwrap().expect("free key");
    let backend_pid = AdvisoryLockGuard::backend_pid(&first);
    let requests: Vec<_> = (0..300)
        .map(|_| {
            let (set, key) = (set.clone(), db.key());
            tokio::spawn(async move { set.try_lock(key).await })
        })
        .collect();
    db.terminate(backend_pid).await;
    let mut lost = 0;
    let mut granted = Vec::new();
    for request in requests {
        let result = tokio::time::timeout(Duration::from_secs(10), request)
            .await
            .expect("no request outlives its connection")
            .unwrap();
        match result {
            Ok(Some(guard)) => granted.push(guard),
            Err(Error::ConnectionLost { .. }) => lost += 1,
            other => panic!("{other:?}"),
        }
    }
    eprintln!("{} granted before the kill, {lost} lost", granted.len());
    assert!(
        matches!(
            set.try_lock(db.key()).await,
            Err(Error::ConnectionLost { .. })
        ),
        "the session is gone"
    );
    drop(granted);
    drop(first);
    db.wait_backend_gone(backend_pid).await;
    all_released(&db, &set).await;
}

/// Two sets (as two processes would have) and many tasks fight over a few keys with batched
/// `try_lock`s, polling `lock`s and drops of several guards at once: no key is ever held by two
/// guards, and nothing is left held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_requests_and_releases_keep_mutual_exclusion() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let db = TestDb::new("lockset_exclusion").await;
    let sets = [lock_set(&db, 2).await, lock_set(&db, 2).await];
    let keys: Arc<Vec<AdvisoryKey>> = Arc::new((0..12).map(|_| db.key()).collect());
    let owned: Arc<Vec<AtomicBool>> = Arc::new((0..12).map(|_| AtomicBool::new(false)).collect());
    let grants = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut tasks = Vec::new();
    for task in 0..16usize {
        let set = sets[task % 2].clone();
        let (keys, owned, grants) = (keys.clone(), owned.clone(), grants.clone());
        tasks.push(tokio::spawn(async move {
            let mut round = task;
            while Instant::now() < deadline {
                round += 1;
                // Three keys at once, taken together and dropped together.
                let picked: Vec<usize> = (0..3).map(|i| (round * 5 + i * 7 + task) % 12).collect();
                let attempts = picked.iter().map(|&i| {
                    let set = set.clone();
                    let key = keys[i];
                    async move {
                        if round % 4 == 0 {
                            set.try_lock_for(key, Duration::from_millis(30)).await
                        } else {
                            set.try_lock(key).await
                        }
                    }
                });
                let results = futures_util::future::join_all(attempts).await;
                let mut held = Vec::new();
                for (&i, result) in picked.iter().zip(results) {
                    match result {
                        Ok(Some(guard)) => {
                            assert!(
                                !owned[i].swap(true, Ordering::SeqCst),
                                "key {i} granted to two guards"
                            );
                            grants.fetch_add(1, Ordering::Relaxed);
                            held.push((i, guard));
                        }
                        Ok(None) => {}
                        Err(other) => panic!("{other:?}"),
                    }
                }
                tokio::task::yield_now().await;
                for (i, _) in &held {
                    owned[*i].store(false, Ordering::SeqCst);
                }
                drop(held);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert!(grants.load(Ordering::Relaxed) > 100, "{grants:?}");
    for set in &sets {
        all_released(&db, set).await;
    }
}
