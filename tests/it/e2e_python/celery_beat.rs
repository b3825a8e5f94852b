//! `pglock leader beat -- celery -A beat_app beat` in three instances: one beat sends, the
//! others stand by; SIGKILL the leader's whole process tree and another takes over; SIGTERM
//! stops them all.
//!
//! PostgreSQL is also the broker, through kombu's SQLAlchemy transport, so what the beats sent
//! is in the database: every message in `kombu_message`, in insertion order (`id`), with the
//! sending process in Celery's `origin` header and, from the app's publish hook
//! (`tests/fixtures/celery/beat_app.py`), its send time and pglock's fencing term. "Never two
//! senders at once" is then: in id order, each origin's messages form one unbroken run, and
//! each run's sends all come before the next run's first one.

use std::os::unix::process::ExitStatusExt as _;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::harness::TestDb;

use super::database::FreshDatabase;
use super::process::{alive, cpu_time, Process};
use super::{fixture, Scratch, Venv};

const INSTANCES: usize = 3;

/// The leadership's name, as in the README.
const NAME: &str = "beat";

/// How often a standby reports who leads (`--progress-every`): short, so that the standbys
/// stand by for several intervals before the leader is killed.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// How long the standbys stand by, queued, before the leader is killed: 5 progress intervals.
/// The leader has led for longer: its beat has started and sent first.
const STAND_BY_FOR: Duration = Duration::from_secs(5);

/// How soon after the leader's SIGKILL a standby must lead. On loopback the kernel closes the
/// dead process's socket at once and the server, which waits on it, ends the session, freeing
/// the lock; the first standby in the server's queue is granted it then, and its campaign writes
/// the next term (a few round trips). That takes milliseconds; the bound leaves the rest of it
/// to a loaded 2-core machine's scheduling. It stays below every timeout-based path (the
/// probes' 2 s detection bound, the server's 1 s `client_connection_check_interval`, the
/// standby's 10 s queue round, TCP keepalives), so a take-over that waited on one of those fails.
const TAKEOVER_WITHIN: Duration = Duration::from_secs(3);

/// How soon a beat that starts sends: Python imports Celery and connects (about 0.6 s on an
/// idle machine here), then its 1 s schedule comes due. The margin is for a loaded machine; on
/// one loaded enough that the first beat took longer than half of this, the bound for the next
/// one is twice what the first took (Python's start-up is not what the test checks).
const BEAT_SENDS_WITHIN: Duration = Duration::from_secs(10);

/// Bounds that keep a broken run from hanging, not timing targets.
const START_BOUND: Duration = Duration::from_secs(30);
const EXIT_BOUND: Duration = Duration::from_secs(20);

/// At most this share of a standby's time may go to its CPU, plus one report's worth.
const STANDBY_CPU_SHARE: f64 = 0.02;
const STANDBY_CPU_SLACK: Duration = Duration::from_millis(30);

/// One message a beat sent, as kombu stored it.
#[derive(Clone, Debug)]
struct Sent {
    /// Shown in failure messages: the order kombu stored the messages in.
    #[allow(dead_code)]
    id: i32,
    origin: String,
    /// Seconds since the Unix epoch.
    sent_at: f64,
    term: i64,
}

/// Everything the beats sent so far, in insertion order.
async fn sent(db: &TestDb) -> Vec<Sent> {
    // kombu creates its tables when the first beat connects.
    let exists: bool = db
        .admin()
        .query_one("SELECT to_regclass('kombu_message') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    if !exists {
        return Vec::new();
    }
    db.admin()
        .query(
            "SELECT id, payload::json #>> '{headers,origin}', \
             (payload::json #>> '{headers,sent_at}')::float8, \
             (payload::json #>> '{headers,pglock_term}')::int8 \
             FROM kombu_message ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| Sent {
            id: row.get(0),
            origin: row.get(1),
            sent_at: row.get(2),
            term: row.get(3),
        })
        .collect()
}

/// Waits until `accept` holds for what was sent, at most `within`.
async fn wait_sent(db: &TestDb, within: Duration, accept: impl Fn(&[Sent]) -> bool) -> Vec<Sent> {
    let deadline = Instant::now() + within;
    loop {
        let sent = sent(db).await;
        if accept(&sent) {
            return sent;
        }
        assert!(
            Instant::now() < deadline,
            "not sent within {within:?}; sent so far: {sent:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn seconds(time: SystemTime) -> f64 {
    time.duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

/// The term in a `pglock: leading beat in term N ...` line.
fn led_term(line: &str) -> Option<i64> {
    let rest = line
        .split_once(&format!("pglock: leading {NAME} in term "))?
        .1;
    rest.split_whitespace().next()?.parse().ok()
}

/// Waits until one of `instances` says it leads in a term after `after`: its index, when the
/// test read the line, and the term.
async fn wait_leading(
    instances: &[Option<Process>],
    after: i64,
    within: Duration,
) -> (usize, Instant, i64) {
    let deadline = Instant::now() + within;
    loop {
        for (index, instance) in instances.iter().enumerate() {
            let Some(instance) = instance else { continue };
            for (at, line) in instance.lines() {
                match led_term(&line) {
                    Some(term) if term > after => return (index, at, term),
                    _ => {}
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "nobody led within {within:?}: {instances:#?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The backends waiting for the leadership lock in this database.
async fn queued_standbys(db: &TestDb) -> i64 {
    let (classid, objid, objsubid) =
        pglock::AdvisoryKey::from_name(&format!("leader:{NAME}")).pg_locks_ids();
    db.admin()
        .query_one(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
             AND classid = $1::int8::oid AND objid = $2::int8::oid AND objsubid = $3",
            &[&i64::from(classid), &i64::from(objid), &objsubid],
        )
        .await
        .unwrap()
        .get(0)
}

/// How many progress reports a standby that waited `waited` (from its spawn) may have written:
/// one when it finds someone leading, then one every interval; one more for where the ends
/// fall. Its wait starts only once the process runs and has connected, which on a loaded
/// machine can be up to `STARTUP` after the spawn: that many intervals fewer.
fn expected_reports(waited: Duration) -> std::ops::RangeInclusive<usize> {
    const STARTUP: Duration = Duration::from_secs(3);
    let ticks = |d: Duration| (d.as_secs_f64() / PROGRESS_EVERY.as_secs_f64()).floor() as usize;
    let reports = 1 + ticks(waited);
    (1 + ticks(waited.saturating_sub(STARTUP))).saturating_sub(1)..=reports + 1
}

#[tokio::test]
async fn one_beat_sends_and_another_takes_over() {
    let Some(venv) = Venv::find() else { return };
    let database = FreshDatabase::create("celery_beat").await;
    let db = TestDb::on_server(&database.url("postgresql"), "e2e_celery_beat").await;
    let scratch = Scratch::new("celery-beat");
    let progress_every = format!("{}ms", PROGRESS_EVERY.as_millis());

    // Three replicas of the beat service start at once.
    let spawned_at = Instant::now();
    let mut instances: Vec<Option<Process>> = (0..INSTANCES)
        .map(|instance| {
            let schedule = scratch.path(&format!("schedule-{instance}"));
            let mut command = venv.pglock(
                &database,
                "postgresql+psycopg2",
                &[
                    "leader",
                    "--progress-every",
                    &progress_every,
                    NAME,
                    "--",
                    "celery",
                    "-A",
                    "beat_app",
                    "beat",
                    "--loglevel",
                    "INFO",
                    "--schedule",
                ],
            );
            command
                .arg(&schedule)
                .current_dir(fixture("celery"))
                .env("CELERY_BROKER_URL", database.url("sqla+postgresql"));
            Some(Process::spawn(format!("beat #{instance}"), command))
        })
        .collect();

    // One leads, and its beat sends; the others stand by, queued in the server.
    let (first, first_led_at, first_term) = wait_leading(&instances, 0, START_BOUND).await;
    let first_sent = wait_sent(&db, START_BOUND, |sent| !sent.is_empty()).await;
    let first_origin = first_sent[0].origin.clone();
    let beat_start = first_led_at.elapsed();
    let beat_sends_within = BEAT_SENDS_WITHIN.max(beat_start * 2);
    eprintln!(
        "beat #{first} leads in term {first_term}; its beat's first send {beat_start:?} later"
    );
    let deadline = Instant::now() + START_BOUND;
    while queued_standbys(&db).await < (INSTANCES - 1) as i64 {
        assert!(
            Instant::now() < deadline,
            "the standbys never queued: {instances:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let standbys: Vec<usize> = (0..INSTANCES).filter(|i| *i != first).collect();
    let standby_pids: Vec<u32> = standbys
        .iter()
        .map(|i| instances[*i].as_ref().unwrap().pid())
        .collect();
    let cpu_before: Vec<Duration> = standby_pids.iter().map(|pid| cpu_time(*pid)).collect();
    let standing_since = Instant::now();

    // The leader leads for several progress intervals, alone, and its beat keeps sending.
    tokio::time::sleep(STAND_BY_FOR).await;
    let led = sent(&db).await;
    assert!(
        led.iter()
            .all(|s| s.origin == first_origin && s.term == first_term),
        "one sender, in the leader's term: {led:#?}"
    );
    assert!(led.len() >= 2, "the leader's beat keeps sending: {led:#?}");
    for (index, instance) in instances.iter().enumerate() {
        let leading = instance.as_ref().unwrap().lines_with("pglock: leading");
        assert_eq!(leading.len(), usize::from(index == first), "{instances:#?}");
    }
    // Standing by costs no CPU to speak of, and keeps the standbys' places in the queue.
    let stood = standing_since.elapsed();
    for (pid, before) in standby_pids.iter().zip(&cpu_before) {
        let used = cpu_time(*pid) - *before;
        let allowed = stood.mul_f64(STANDBY_CPU_SHARE) + STANDBY_CPU_SLACK;
        eprintln!("standby pid {pid}: {used:?} of CPU while standing by for {stood:?}");
        assert!(
            used <= allowed,
            "standby {pid} used {used:?} of CPU in {stood:?} (at most {allowed:?})"
        );
    }
    assert_eq!(
        queued_standbys(&db).await,
        (INSTANCES - 1) as i64,
        "{instances:#?}"
    );

    // SIGKILL the leader's whole tree: pglock and its beat.
    let mut leader = instances[first].take().unwrap();
    let leader_tree = leader.tree();
    assert!(
        leader_tree.len() >= 2,
        "pglock and its beat: {leader_tree:?}"
    );
    let killed_at = Instant::now();
    let killed_wall = seconds(SystemTime::now());
    leader.kill_tree();
    let status = leader.exit(EXIT_BOUND).await;
    assert_eq!(status.signal(), Some(9), "{leader:?}");

    // A standby leads within the bound, in a later term; its beat sends.
    let (second, second_led_at, second_term) =
        wait_leading(&instances, first_term, TAKEOVER_WITHIN + START_BOUND).await;
    let took_over = second_led_at.saturating_duration_since(killed_at);
    eprintln!("beat #{second} leads in term {second_term}, {took_over:?} after the SIGKILL");
    assert!(
        took_over <= TAKEOVER_WITHIN,
        "took over {took_over:?} after the leader died (bound {TAKEOVER_WITHIN:?}): {instances:#?}"
    );
    let after_kill = wait_sent(&db, TAKEOVER_WITHIN + beat_sends_within, |sent| {
        sent.iter().any(|s| s.origin != first_origin)
    })
    .await;
    let second_first = after_kill
        .iter()
        .find(|s| s.origin != first_origin)
        .unwrap()
        .clone();
    let resumed = second_first.sent_at - killed_wall;
    eprintln!("the new beat's first send came {resumed:.3} s after the SIGKILL");
    assert!(
        resumed <= (TAKEOVER_WITHIN + beat_sends_within).as_secs_f64(),
        "the new beat sent {resumed:.3} s after the leader died"
    );
    assert!(
        leader_tree.iter().all(|pid| !alive(*pid)),
        "the killed tree is gone: {leader_tree:?}"
    );
    // ... and goes on sending.
    wait_sent(&db, START_BOUND, |sent| {
        sent.iter().filter(|s| s.origin != first_origin).count() >= 2
    })
    .await;

    // The standbys reported at their interval, no more often.
    let remaining = (0..INSTANCES)
        .find(|i| *i != first && *i != second)
        .unwrap();
    for (index, waited) in [
        (second, second_led_at - spawned_at),
        (remaining, spawned_at.elapsed()),
    ] {
        let instance = instances[index].as_ref().unwrap();
        let reports = instance
            .lines()
            .iter()
            .filter(|(at, line)| {
                *at <= spawned_at + waited
                    && line.contains(&format!("standing by for leadership {NAME}"))
            })
            .count();
        let expected = expected_reports(waited);
        eprintln!("beat #{index} stood by for {waited:?} and wrote {reports} progress reports");
        assert!(
            expected.contains(&reports),
            "beat #{index} waited {waited:?} and wrote {reports} progress reports \
             (expected {expected:?} at one every {PROGRESS_EVERY:?}): {instance:?}"
        );
    }

    // SIGTERM stops everyone: the standby first (so that it cannot take over), which exits
    // 128 + 15; then the leader, which passes the signal on to its beat, steps down and exits
    // with the beat's status (0: beat exits cleanly on SIGTERM).
    let mut standby = instances[remaining].take().unwrap();
    standby.signal("TERM");
    let status = standby.exit(EXIT_BOUND).await;
    assert_eq!(status.code(), Some(128 + 15), "{standby:?}");
    let mut leader = instances[second].take().unwrap();
    let leader_tree = leader.tree();
    assert!(
        leader_tree.len() >= 2,
        "pglock and its beat: {leader_tree:?}"
    );
    leader.signal("TERM");
    let status = leader.exit(EXIT_BOUND).await;
    assert_eq!(status.code(), Some(0), "{leader:?}");
    let deadline = Instant::now() + EXIT_BOUND;
    while leader_tree.iter().any(|pid| alive(*pid)) {
        assert!(
            Instant::now() < deadline,
            "a beat outlived its pglock: {leader_tree:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Never two senders at once.
    let all = sent(&db).await;
    let mut runs: Vec<(&str, i64)> = Vec::new();
    for message in &all {
        if runs.last().map(|(origin, _)| *origin) != Some(message.origin.as_str()) {
            assert!(
                !runs.iter().any(|(origin, _)| *origin == message.origin),
                "{} sent again after another beat had sent: {all:#?}",
                message.origin
            );
            runs.push((&message.origin, message.term));
        }
        assert_eq!(
            message.term,
            runs.last().unwrap().1,
            "one term per beat: {all:#?}"
        );
    }
    assert_eq!(
        runs,
        [
            (first_origin.as_str(), first_term),
            (second_first.origin.as_str(), second_term)
        ],
        "{all:#?}"
    );
    let last_of_first = all.iter().rfind(|s| s.origin == first_origin).unwrap();
    assert!(
        last_of_first.sent_at < second_first.sent_at,
        "the beats' sends overlapped in time: {last_of_first:?}, {second_first:?}"
    );
    eprintln!(
        "{} messages: {} from the first beat, {} from the second",
        all.len(),
        all.iter().filter(|s| s.origin == first_origin).count(),
        all.iter().filter(|s| s.origin != first_origin).count()
    );

    let advisory: i64 = db
        .admin()
        .query_one(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(advisory, 0, "advisory locks left in {}", database.name());
    db.assert_no_locks().await;
    drop(db);
    database.drop_now().await;
}
