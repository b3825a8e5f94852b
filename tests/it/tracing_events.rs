//! pglock's `tracing` events: emitted with the documented fields, seen by whatever subscriber
//! the application installs (here a minimal one that records them).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use pglock::{AdvisoryLock, AdvisoryLockGuard, LockScope, WaitStrategy};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

use crate::harness::{drop_after_polls, TestDb};

#[derive(Clone, Debug)]
struct Recorded {
    target: String,
    level: tracing::Level,
    fields: BTreeMap<String, String>,
}

impl Recorded {
    fn message(&self) -> &str {
        self.fields.get("message").map_or("", String::as_str)
    }

    fn field(&self, name: &str) -> &str {
        self.fields
            .get(name)
            .map_or_else(|| panic!("no field {name} in {self:?}"), String::as_str)
    }
}

/// A span's name and fields.
type SpanRecord = (String, BTreeMap<String, String>);

/// Records every event and the names of the spans created.
#[derive(Clone, Default)]
struct Recorder {
    events: Arc<Mutex<Vec<Recorded>>>,
    spans: Arc<Mutex<Vec<SpanRecord>>>,
}

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

thread_local! {
    /// Set by a test that wants only WARN and ERROR events on its thread (a current-thread
    /// runtime runs all its tasks there), as an application filtering pglock's DEBUG out.
    static WARN_ONLY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

impl Subscriber for Recorder {
    /// "Sometimes" for every call site, so that `enabled` is asked at each event and span, and
    /// may answer for the calling thread.
    fn register_callsite(&self, _: &'static Metadata<'static>) -> tracing::subscriber::Interest {
        tracing::subscriber::Interest::sometimes()
    }

    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        !WARN_ONLY.with(|warn_only| warn_only.get()) || *metadata.level() <= tracing::Level::WARN
    }

    fn new_span(&self, span: &Attributes<'_>) -> Id {
        let mut fields = BTreeMap::new();
        span.record(&mut Fields(&mut fields));
        let mut spans = self.spans.lock().unwrap();
        spans.push((span.metadata().name().to_owned(), fields));
        Id::from_u64(spans.len() as u64)
    }

    fn record(&self, _: &Id, _: &Record<'_>) {}

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let mut fields = BTreeMap::new();
        event.record(&mut Fields(&mut fields));
        self.events.lock().unwrap().push(Recorded {
            target: event.metadata().target().to_owned(),
            level: *event.metadata().level(),
            fields,
        });
    }

    fn enter(&self, _: &Id) {}

    fn exit(&self, _: &Id) {}
}

/// The process-wide recorder; each test reads only the events of its own keys.
///
/// A global subscriber rather than a scoped one (`set_default`): when tests share a process
/// (`cargo test` runs them as threads), tracing caches each call site's interest for all threads,
/// and a thread without the scoped subscriber can leave a call site disabled for the test that
/// has one, so its events are lost.
fn recorder() -> Recorder {
    static GLOBAL: OnceLock<Recorder> = OnceLock::new();
    GLOBAL
        .get_or_init(|| {
            let recorder = Recorder::default();
            tracing::subscriber::set_global_default(recorder.clone())
                .expect("no other test installs a global subscriber");
            recorder
        })
        .clone()
}

impl Recorder {
    /// pglock's events with this message and key so far.
    fn find(&self, message: &str, key: &str) -> Vec<Recorded> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.target == "pglock" && e.message().starts_with(message))
            .filter(|e| e.fields.get("key").map(String::as_str) == Some(key))
            .cloned()
            .collect()
    }

    async fn wait_for(&self, message: &str, key: &str) -> Recorded {
        for _ in 0..500 {
            if let Some(event) = self.find(message, key).pop() {
                return event;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no event {message:?} for key {key}");
    }
}

#[tokio::test]
async fn acquisitions_and_releases_are_traced() {
    let recorder = recorder();
    let db = TestDb::new("tracing_events").await;
    let pool = db.pool(3);
    let key = db.key();
    let key_text = key.to_string();
    let lock = AdvisoryLock::new(&pool, key);

    let guard = lock.lock().await.unwrap();
    let pid = AdvisoryLockGuard::backend_pid(&guard);
    let granted = recorder.wait_for("advisory lock granted", &key_text).await;
    assert_eq!(granted.level, tracing::Level::DEBUG);
    assert_eq!(granted.field("backend_pid"), pid.to_string());
    assert_eq!(granted.field("mode"), "Exclusive");
    assert_eq!(granted.field("scope"), "Session");
    granted.field("wait_ms").parse::<u64>().unwrap();
    {
        // Each acquisition runs in an `acquire` span carrying the key, created only because a
        // subscriber listens.
        let spans = recorder.spans.lock().unwrap();
        assert!(
            spans
                .iter()
                .any(|(name, fields)| name == "acquire" && fields.get("key") == Some(&key_text)),
            "an acquire span with the key"
        );
    }

    // Busy: a try that gives up.
    assert!(lock.try_lock().await.unwrap().is_none());
    recorder.wait_for("advisory lock busy", &key_text).await;

    // A waiter's wait time, and polling.
    let waiter = AdvisoryLock::new(&pool, key).wait_strategy(WaitStrategy::Poll {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(20),
    });
    let waiting = tokio::spawn(async move { waiter.lock().await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    AdvisoryLockGuard::unlock(guard).await.unwrap();
    let released = recorder.wait_for("advisory lock released", &key_text).await;
    assert_eq!(released.field("how"), "unlock");
    assert_eq!(released.field("backend_pid"), pid.to_string());

    let second = waiting.await.unwrap().unwrap();
    let polls = recorder.find("advisory lock busy, polling again", &key_text);
    assert!(!polls.is_empty(), "polling is traced");
    assert_eq!(polls[0].level, tracing::Level::TRACE);
    let granted = recorder.find("advisory lock granted", &key_text);
    let waited: u64 = granted.last().unwrap().field("wait_ms").parse().unwrap();
    assert!(waited >= 150, "wait_ms = {waited}");

    // Release on drop, in the background.
    let second_pid = AdvisoryLockGuard::backend_pid(&second);
    drop(second);
    let drops = || -> Vec<Recorded> {
        recorder
            .find("advisory lock released", &key_text)
            .into_iter()
            .filter(|e| e.field("how") == "drop")
            .collect()
    };
    for _ in 0..500 {
        if !drops().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let drops = drops();
    assert_eq!(drops.len(), 1, "{drops:?}");
    assert_eq!(drops[0].field("backend_pid"), second_pid.to_string());

    // A transaction-scoped lock, and an abandoned acquisition.
    let xact = AdvisoryLock::new(&pool, key).scope(LockScope::Transaction);
    let guard = xact.lock().await.unwrap();
    let blocked = AdvisoryLock::new(&pool, key);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), blocked.lock())
            .await
            .is_err(),
        "the lock is held"
    );
    recorder
        .wait_for("advisory lock acquisition abandoned", &key_text)
        .await;
    AdvisoryLockGuard::commit(guard).await.unwrap();
    let commits = recorder.find("advisory lock released", &key_text);
    assert_eq!(commits.last().unwrap().field("how"), "commit");

    drop(pool);
    db.assert_no_locks().await;
}

/// The answer of a guard's release on drop is read by the next acquisition on the same session,
/// alongside its own statement. An acquisition dropped before that answer hands the release
/// back to the runtime: it is still read, and reported, once.
#[tokio::test]
async fn a_release_read_by_an_abandoned_acquisition_is_still_reported() {
    let recorder = recorder();
    let db = TestDb::new("tracing_adopted").await;
    let session = db.session().await;
    let (key, other) = (db.key(), db.key());
    let key_text = key.to_string();
    let drops = || {
        recorder
            .find("advisory lock released", &key_text)
            .into_iter()
            .filter(|e| e.field("how") == "drop")
            .count()
    };
    // Both statements prepared on the session, so that an acquisition sends its statement (and
    // takes over the release) on its first poll.
    drop(AdvisoryLock::new(&session, key).lock().await.unwrap());
    drop(AdvisoryLock::new(&session, other).try_lock().await.unwrap());
    let before = drops();
    for polls in 1..=4 {
        let guard = AdvisoryLock::new(&session, key).lock().await.unwrap();
        drop(guard);
        // Its first poll takes over the release just queued; dropped after `polls` polls.
        let outcome = drop_after_polls(AdvisoryLock::new(&session, other).try_lock(), polls).await;
        drop(outcome);
        for _ in 0..500 {
            if drops() >= before + polls {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            drops(),
            before + polls,
            "one release reported per dropped guard"
        );
    }
    db.assert_no_locks().await;
    tokio::time::timeout(Duration::from_secs(5), async {
        while session.held_count() > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the abandoned acquisitions were cleaned up");
}

#[tokio::test]
async fn loss_and_leadership_are_traced() {
    let recorder = recorder();
    let db = TestDb::new("tracing_loss").await;
    let pool = db.pool(3);
    let health = pglock::HealthCheck::new(Duration::from_millis(100), Duration::from_millis(250));

    // A lock lost to an administrator's pg_terminate_backend.
    let key = db.key();
    let key_text = key.to_string();
    let guard = AdvisoryLock::new(&pool, key)
        .health_check(health)
        .lock()
        .await
        .unwrap();
    let pid = AdvisoryLockGuard::backend_pid(&guard);
    let mut loss = AdvisoryLockGuard::loss_signal(&guard);
    db.terminate(pid).await;
    tokio::time::timeout(Duration::from_secs(10), loss.lost())
        .await
        .expect("the loss is detected");
    let lost = recorder.wait_for("advisory lock lost", &key_text).await;
    assert_eq!(lost.level, tracing::Level::WARN);
    assert_eq!(lost.field("backend_pid"), pid.to_string());
    assert!(!lost.field("reason").is_empty());
    drop(guard);

    // A leadership: acquired, then lost the same way, then a new one stepped down.
    let name = format!("tracing-{}", db.key());
    let election = pglock::LeaderElection::new(&pool, name.as_str()).health_check(health);
    let election_key = election.lock_key().to_string();
    let leadership = election.campaign().await.unwrap();
    let acquired = recorder
        .wait_for("leadership acquired", &election_key)
        .await;
    assert_eq!(acquired.level, tracing::Level::INFO);
    assert_eq!(acquired.field("name"), name);
    assert_eq!(acquired.field("term"), leadership.term().to_string());
    let leader_pid: i32 = acquired.field("backend_pid").parse().unwrap();
    db.terminate(leader_pid).await;
    let lost = recorder.wait_for("leadership lost", &election_key).await;
    assert_eq!(lost.level, tracing::Level::WARN);
    assert_eq!(lost.field("term"), leadership.term().to_string());
    drop(leadership);
    assert!(
        recorder
            .find("leadership released", &election_key)
            .is_empty(),
        "a lost leadership is not also reported as released"
    );

    let leadership = election.campaign().await.unwrap();
    let term = leadership.term();
    leadership.step_down().await.unwrap();
    let released = recorder
        .wait_for("leadership released", &election_key)
        .await;
    assert_eq!(released.field("how"), "step_down");
    assert_eq!(released.field("term"), term.to_string());

    drop(pool);
    db.assert_no_locks().await;
}

/// A connection's backend that changed under an acquisition is reported once, at WARN: to a
/// subscriber that filters pglock's DEBUG events out (no `acquire` span is even built then), as
/// to one that takes them all.
#[tokio::test]
async fn a_changed_backend_is_reported_once_at_warn_even_without_debug() {
    let recorder = recorder();
    let db = TestDb::new("tracing_backend_changed").await;
    // Never verified, so a deallocated statement reads as a pooler that moved the session.
    let session = Arc::new(
        pglock::Session::connect(&db.url())
            .await
            .unwrap()
            .always_check_backend(),
    );
    let key = db.key();
    let key_text = key.to_string();
    let lock = AdvisoryLock::new(&session, key);
    AdvisoryLockGuard::unlock(lock.lock().await.unwrap())
        .await
        .unwrap();
    let acquire_spans = || {
        recorder
            .spans
            .lock()
            .unwrap()
            .iter()
            .filter(|(name, fields)| {
                name == "acquire" && fields.get("key").map(String::as_str) == Some(&key_text)
            })
            .count()
    };
    let warnings = || recorder.find("backend changed under advisory lock", &key_text);
    for (round, warn_only) in [(1, true), (2, false)] {
        let spans_before = acquire_spans();
        session.batch_execute("DEALLOCATE ALL").await.unwrap();
        WARN_ONLY.with(|flag| flag.set(warn_only));
        let error = lock.lock().await.unwrap_err();
        WARN_ONLY.with(|flag| flag.set(false));
        assert!(
            matches!(error, pglock::Error::BackendChanged { .. }),
            "{error:?}"
        );
        let found = warnings();
        assert_eq!(found.len(), round, "one warning per failed acquisition");
        assert_eq!(found[round - 1].level, tracing::Level::WARN);
        let spans = acquire_spans() - spans_before;
        assert_eq!(
            spans,
            usize::from(!warn_only),
            "an acquire span only with DEBUG on"
        );
        // The next acquisition prepares the statements again and is granted.
        AdvisoryLockGuard::unlock(lock.lock().await.unwrap())
            .await
            .unwrap();
    }
    db.assert_no_locks().await;
}
