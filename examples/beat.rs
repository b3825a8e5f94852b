//! A singleton scheduler ("beat"): several instances start at once, exactly one ticks, and when
//! the leader dies another takes over within the detection bound. Every tick is written with
//! the leader's fencing term, and the table rejects a tick from a stale term.
//!
//! ```sh
//! export DATABASE_URL=postgres://postgres@127.0.0.1:5432/test
//! cargo run --example beat -- --instances 3                # three instances in this process
//! cargo run --example beat -- --instances 3 --processes    # three child processes
//! ```
//!
//! Options: `--instances N` (3), `--processes` (run each instance as a child process, and kill
//! the leader's process with SIGKILL as the fault), `--seconds S` (20, then all instances step
//! down), `--fault-every S` (4: then the leader is hit by a fault: its backend terminated, or
//! the instance stopped), `--name NAME` (the leadership's name, `beat`).
//! An instance alone: `cargo run --example beat -- --instance 7` (runs until Ctrl-C).

use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::{Manager, Pool};
use pglock::{AdvisoryLock, AdvisoryLockGuard, HealthCheck, LeaderElection, LeaderState};
use tokio_postgres::NoTls;

/// The term-guarded write: the tick is inserted only if `$2` is still the current term of the
/// leadership `$1`. `FOR SHARE` locks the term row, so a new leader's term update either waits
/// for this insert to commit or is seen by it (and the insert is then rejected).
const GUARDED_TICK: &str = "\
    WITH fence AS (SELECT term FROM pglock_leader_terms WHERE name = $1 FOR SHARE) \
    INSERT INTO beat_ticks (name, term, instance, tick) \
    SELECT $1, $2, $3, $4 FROM fence WHERE fence.term = $2 \
    RETURNING id";

struct Options {
    instances: usize,
    processes: bool,
    seconds: u64,
    fault_every: u64,
    name: String,
    instance: Option<usize>,
}

fn options() -> Options {
    let mut options = Options {
        instances: 3,
        processes: false,
        seconds: 20,
        fault_every: 4,
        name: "beat".to_owned(),
        instance: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| usage(&format!("{arg} needs a value")))
        };
        match arg.as_str() {
            "--instances" => {
                options.instances = value().parse().unwrap_or_else(|_| usage("--instances N"))
            }
            "--processes" => options.processes = true,
            "--seconds" => {
                options.seconds = value().parse().unwrap_or_else(|_| usage("--seconds S"))
            }
            "--fault-every" => {
                options.fault_every = value().parse().unwrap_or_else(|_| usage("--fault-every S"))
            }
            "--name" => options.name = value(),
            "--instance" => {
                options.instance = Some(value().parse().unwrap_or_else(|_| usage("--instance I")))
            }
            _ => usage(&format!("unknown argument {arg}")),
        }
    }
    options
}

fn usage(problem: &str) -> ! {
    eprintln!("{problem}\nusage: beat [--instances N] [--processes] [--seconds S] [--fault-every S] [--name NAME] | --instance I");
    std::process::exit(2)
}

fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

fn pool(size: usize, instance: Option<usize>) -> Pool {
    let mut config: tokio_postgres::Config = database_url().parse().expect("DATABASE_URL");
    config.application_name(&match instance {
        Some(i) => format!("beat-{i}"),
        None => "beat-supervisor".to_owned(),
    });
    Pool::builder(Manager::new(config, NoTls))
        .max_size(size)
        .build()
        .expect("pool")
}

/// Creates the example's table, under an advisory lock so that instances starting together do
/// not race on `CREATE TABLE IF NOT EXISTS`.
async fn create_ticks_table(pool: &Pool) -> pglock::Result<()> {
    let guard = AdvisoryLock::new(pool, "beat-example-ddl").lock().await?;
    guard
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS beat_ticks (
                 id bigserial PRIMARY KEY, name text NOT NULL, term bigint NOT NULL,
                 instance text NOT NULL, tick bigint NOT NULL,
                 at timestamptz NOT NULL DEFAULT clock_timestamp())",
        )
        .await?;
    AdvisoryLockGuard::unlock(guard).await
}

/// One instance: campaigns, ticks every 500 ms while it leads, prints what happens.
async fn instance(i: usize, name: String) -> pglock::Result<()> {
    let me = format!("beat-{i}");
    let pool = pool(3, Some(i));
    create_ticks_table(&pool).await?;
    let health = HealthCheck::default();
    let election = LeaderElection::new(&pool, &name)
        .health_check(health)
        .identity(format!("{me} pid {}", std::process::id()));
    println!(
        "{me:<8} started, follower (loss detected within {:?})",
        health.detection_bound()
    );
    let mut state = election.subscribe();
    let watcher = tokio::spawn({
        let me = me.clone();
        async move {
            while state.changed().await.is_ok() {
                match *state.borrow_and_update() {
                    LeaderState::Leader { term } => println!("{me:<8} LEADER, term {term}"),
                    _ => println!("{me:<8} follower"),
                }
            }
        }
    });
    let result = election
        .run(|leader| {
            let (pool, me, name) = (pool.clone(), me.clone(), name.clone());
            async move {
                let mut tick = 0_i64;
                loop {
                    tick += 1;
                    // The tick's work, then its record, guarded by the term.
                    let accepted = match pool.get().await {
                        Ok(client) => client
                            .query_opt(GUARDED_TICK, &[&name, &leader.term(), &me, &tick])
                            .await
                            .map(|row| row.is_some()),
                        Err(e) => {
                            println!(
                                "{me:<8} term {} tick {tick}: no connection ({e})",
                                leader.term()
                            );
                            Ok(false)
                        }
                    };
                    match accepted {
                        Ok(true) => println!("{me:<8} term {} tick {tick}", leader.term()),
                        Ok(false) => println!(
                            "{me:<8} term {} tick {tick} REJECTED: a newer term exists",
                            leader.term()
                        ),
                        Err(e) => {
                            println!("{me:<8} term {} tick {tick} failed: {e}", leader.term())
                        }
                    }
                    // If the leadership is lost, `run` drops this future (here or at any
                    // other `.await`): the task stops, and the instance campaigns again.
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        })
        .await;
    watcher.abort();
    result
}

/// The backend pid that holds the leadership lock now, if any.
async fn leader_backend(admin: &tokio_postgres::Client, key: pglock::AdvisoryKey) -> Option<i32> {
    let (classid, objid, objsubid) = key.pg_locks_ids();
    admin
        .query_opt(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted \
             AND classid = $1::int8::oid AND objid = $2::int8::oid AND objsubid = $3",
            &[&i64::from(classid), &i64::from(objid), &objsubid],
        )
        .await
        .ok()
        .flatten()
        .map(|row| row.get(0))
}

/// The current term and leader of `name`, from the term table.
async fn current(admin: &tokio_postgres::Client, name: &str) -> Option<(i64, String)> {
    admin
        .query_opt(
            "SELECT term, leader FROM pglock_leader_terms WHERE name = $1",
            &[&name],
        )
        .await
        .ok()
        .flatten()
        .map(|row| (row.get(0), row.get(1)))
}

/// Waits until a term above `term` is recorded; prints who took over and how fast.
async fn report_takeover(
    admin: &tokio_postgres::Client,
    name: &str,
    term: Option<i64>,
    since: Instant,
) {
    let deadline = since + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Some((new, leader)) = current(admin, name).await {
            if Some(new) > term {
                println!(
                    "-- {leader} took over in term {new}, {:?} after the fault",
                    since.elapsed()
                );
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!("-- nobody took over within 30 s");
}

#[tokio::main]
async fn main() -> pglock::Result<()> {
    let options = options();
    if let Some(i) = options.instance {
        // One instance, as started by --processes or by hand.
        return tokio::select! {
            result = instance(i, options.name.clone()) => result,
            _ = tokio::signal::ctrl_c() => Ok(()), // dropping `run` steps down
        };
    }
    let supervisor = pool(2, None);
    create_ticks_table(&supervisor).await?;
    let admin = supervisor.get().await?;
    let key = LeaderElection::new(&supervisor, &options.name).lock_key();
    let first_id: i64 = admin
        .query_one("SELECT coalesce(max(id), 0) FROM beat_ticks", &[])
        .await?
        .get(0);
    println!(
        "-- {} instances of '{}' on {}{}",
        options.instances,
        options.name,
        pglock::redact_url(&database_url()),
        if options.processes {
            ", one process each"
        } else {
            ", in this process"
        }
    );

    let mut workers = Workers::start(&options);
    let started = Instant::now();
    let mut next_fault = started + Duration::from_secs(options.fault_every);
    let mut faults = 0;
    while started.elapsed() < Duration::from_secs(options.seconds) {
        tokio::select! {
            _ = tokio::time::sleep_until(next_fault.into()) => {}
            _ = tokio::signal::ctrl_c() => break,
        }
        next_fault += Duration::from_secs(options.fault_every);
        let term = current(&admin, &options.name).await.map(|(t, _)| t);
        let Some((_, leader)) = current(&admin, &options.name).await else {
            continue;
        };
        let Some(index) = leader
            .strip_prefix("beat-")
            .and_then(|s| s.split(' ').next())
            .and_then(|s| s.parse::<usize>().ok())
        else {
            continue;
        };
        let at = Instant::now();
        if options.processes {
            println!("-- fault: SIGKILL to the leader's process ({leader})");
            workers.kill(index).await;
        } else if faults % 2 == 0 {
            let Some(pid) = leader_backend(&admin, key).await else {
                continue;
            };
            println!("-- fault: terminating the leader's backend (pid {pid}, {leader}); it learns of it through its loss signal");
            admin
                .execute("SELECT pg_terminate_backend($1)", &[&pid])
                .await?;
        } else {
            println!("-- fault: stopping the leader ({leader}); it steps down at once");
            workers.kill(index).await;
        }
        faults += 1;
        report_takeover(&admin, &options.name, term, at).await;
        workers.restart_dead(&options);
    }
    println!("-- stopping every instance");
    workers.stop_all().await;

    let row = admin
        .query_one(
            "SELECT count(*), count(DISTINCT term), count(DISTINCT instance), \
             count(*) FILTER (WHERE EXISTS (SELECT 1 FROM beat_ticks g WHERE g.name = t.name \
                 AND g.id > $2 AND g.id < t.id AND g.term > t.term)) \
             FROM beat_ticks t WHERE name = $1 AND id > $2",
            &[&options.name, &first_id],
        )
        .await?;
    let (ticks, terms, instances, stale): (i64, i64, i64, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    println!("-- {faults} faults; {ticks} ticks accepted in {terms} terms from {instances} instances; ticks accepted from a stale term: {stale}");
    Ok(())
}

/// The running instances: tasks in this process, or child processes.
enum Workers {
    Tasks(Vec<Option<tokio::task::JoinHandle<()>>>, Arc<str>),
    Processes(Vec<Option<tokio::process::Child>>, Arc<str>),
}

impl Workers {
    fn start(options: &Options) -> Self {
        let name: Arc<str> = options.name.as_str().into();
        let mut workers = if options.processes {
            Workers::Processes((0..options.instances).map(|_| None).collect(), name)
        } else {
            Workers::Tasks((0..options.instances).map(|_| None).collect(), name)
        };
        workers.restart_dead(options);
        workers
    }

    fn restart_dead(&mut self, _options: &Options) {
        match self {
            Workers::Tasks(tasks, name) => {
                for (i, slot) in tasks.iter_mut().enumerate() {
                    if slot.as_ref().is_none_or(|t| t.is_finished()) {
                        let name = name.to_string();
                        *slot = Some(tokio::spawn(async move {
                            if let Err(e) = instance(i, name).await {
                                println!("beat-{i:<3} stopped: {e}");
                            }
                        }));
                    }
                }
            }
            Workers::Processes(children, name) => {
                for (i, slot) in children.iter_mut().enumerate() {
                    if slot.is_none() {
                        let exe = std::env::current_exe().expect("own path");
                        let child = tokio::process::Command::new(exe)
                            .args(["--instance", &i.to_string(), "--name", name])
                            .kill_on_drop(true)
                            .spawn()
                            .expect("start an instance process");
                        *slot = Some(child);
                    }
                }
            }
        }
    }

    /// Stops instance `i`: a task is dropped (and steps down); a process gets SIGKILL.
    async fn kill(&mut self, i: usize) {
        match self {
            Workers::Tasks(tasks, _) => {
                if let Some(task) = tasks[i].take() {
                    task.abort();
                    let _ = task.await;
                }
            }
            Workers::Processes(children, _) => {
                if let Some(mut child) = children[i].take() {
                    let _ = child.kill().await;
                }
            }
        }
    }

    async fn stop_all(&mut self) {
        let n = match self {
            Workers::Tasks(tasks, _) => tasks.len(),
            Workers::Processes(children, _) => {
                // SIGINT: each child steps down gracefully on Ctrl-C.
                for child in children.iter().flatten() {
                    if let Some(pid) = child.id() {
                        let _ = std::process::Command::new("kill")
                            .args(["-INT", &pid.to_string()])
                            .status();
                    }
                }
                for child in children.iter_mut().flatten() {
                    let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
                }
                return;
            }
        };
        for i in 0..n {
            self.kill(i).await;
        }
    }
}
