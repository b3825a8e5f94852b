//! A fleet that starts at once against a server with fewer connection slots than instances:
//! refusals are waited out, waiters leave room for the holder's own work, and every instance
//! runs its command alone. Also: a server that is not up yet when the fleet starts.

use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use crate::cli::unique;
use crate::support::{StopMode, ThrowawayCluster};

/// The exit code and stderr of a finished `pglock`.
struct Ended {
    code: Option<i32>,
    stderr: String,
}

/// Runs `pglock` with `url` as `DATABASE_URL`, to the end (at most `within`).
async fn pglock(url: &str, args: &[&str], within: Duration) -> Ended {
    let child = Command::new(env!("CARGO_BIN_EXE_pglock"))
        .args(args)
        .env("DATABASE_URL", url)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start pglock");
    let output = tokio::time::timeout(within, child.wait_with_output())
        .await
        .expect("pglock ends in time")
        .unwrap();
    Ended {
        code: output.status.code(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Forty instances, a server with 20 connection slots (17 for an ordinary role), each instance's
/// command opening a connection of its own for its work (psql), as a migration does.
#[tokio::test]
async fn forty_instances_on_twenty_connection_slots_all_run_alone() {
    let cluster = ThrowawayCluster::builder()
        .max_connections(20)
        .start()
        .await;
    let (admin, connection) = tokio_postgres::connect(&cluster.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    admin
        .batch_execute(
            "CREATE ROLE app LOGIN; \
             CREATE TABLE runs (instance int PRIMARY KEY, started timestamptz, ended timestamptz); \
             GRANT ALL ON runs TO app",
        )
        .await
        .unwrap();
    // The admin session holds a slot too, as monitoring does on real servers.
    let port = cluster.port();
    // Each service's own URL form: SQLAlchemy's for pglock, libpq's for psql.
    let pglock_url = format!("postgresql+psycopg2://app@127.0.0.1:{port}/postgres");
    let psql_url = format!("postgresql://app@127.0.0.1:{port}/postgres");
    let name = unique("fleet");
    let instances = 40;
    let mut fleet = Vec::new();
    for instance in 0..instances {
        let script = format!(
            "psql -q -v ON_ERROR_STOP=1 '{psql_url}' \
             -c 'INSERT INTO runs VALUES ({instance}, clock_timestamp(), NULL)' \
             -c 'SELECT pg_sleep(0.05)' \
             -c 'UPDATE runs SET ended = clock_timestamp() WHERE instance = {instance}'"
        );
        let (url, name) = (pglock_url.clone(), name.clone());
        fleet.push(tokio::spawn(async move {
            let args = [
                "run",
                "--progress-every",
                "1s",
                &name,
                "--",
                "sh",
                "-c",
                &script,
            ];
            pglock(&url, &args, Duration::from_secs(240)).await
        }));
    }
    let mut refused_once = 0;
    let mut polled = 0;
    for (instance, ended) in fleet.into_iter().enumerate() {
        let ended = ended.await.unwrap();
        assert_eq!(
            ended.code,
            Some(0),
            "instance {instance} failed:\n{}\n--- server log\n{}",
            ended.stderr,
            cluster.log()
        );
        // A refusal is said once per run of refusals, and so is the choice to poll.
        assert!(
            ended.stderr.matches("cannot connect yet").count()
                <= 1 + ended.stderr.matches("connected after").count(),
            "{}",
            ended.stderr
        );
        refused_once += usize::from(ended.stderr.contains("cannot connect yet"));
        polled += usize::from(ended.stderr.contains("without holding a connection"));
    }
    eprintln!(
        "{instances} instances: {refused_once} were refused a connection at first, {polled} waited polling"
    );

    // Every command ran, each alone: the intervals recorded in the database never overlap.
    let rows = admin
        .query("SELECT started, ended FROM runs ORDER BY started", &[])
        .await
        .unwrap();
    assert_eq!(rows.len(), instances, "every instance ran its command");
    let intervals: Vec<(std::time::SystemTime, std::time::SystemTime)> =
        rows.iter().map(|row| (row.get(0), row.get(1))).collect();
    for pair in intervals.windows(2) {
        assert!(pair[0].1 <= pair[1].0, "two commands ran at once: {pair:?}");
    }
    let left: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "no advisory lock left");
}

/// The server is down when the instances start (a container fleet whose database starts with
/// it): pglock waits it out within its connect timeout, then runs.
#[tokio::test]
async fn instances_started_before_the_server_wait_for_it() {
    let cluster = ThrowawayCluster::start().await;
    cluster.stop(StopMode::Fast).await;
    let url = format!(
        "postgresql://postgres@127.0.0.1:{}/postgres",
        cluster.port()
    );
    let name = unique("early");
    let waiters: Vec<_> = (0..3)
        .map(|_| {
            let (url, name) = (url.clone(), name.clone());
            tokio::spawn(async move {
                pglock(
                    &url,
                    &["run", "--connect-timeout", "30s", &name, "--", "true"],
                    Duration::from_secs(40),
                )
                .await
            })
        })
        .collect();
    // Down for longer than several of pglock's retry pauses (up to 2 s each).
    tokio::time::sleep(Duration::from_secs(5)).await;
    cluster.start_again().await;
    for waiter in waiters {
        let ended = waiter.await.unwrap();
        assert_eq!(ended.code, Some(0), "{}", ended.stderr);
        assert_eq!(
            ended.stderr.matches("cannot connect yet").count(),
            1,
            "said once: {}",
            ended.stderr
        );
        assert!(ended.stderr.contains("connected after"), "{}", ended.stderr);
    }

    // With a connect timeout shorter than the outage, pglock gives up with 69.
    cluster.stop(StopMode::Fast).await;
    let started = std::time::Instant::now();
    let ended = pglock(
        &url,
        &["run", "--connect-timeout", "2s", &name, "--", "true"],
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(ended.code, Some(69), "{}", ended.stderr);
    assert!(started.elapsed() >= Duration::from_secs(2));
}
