//! The problem pglock solves, for real: several instances of a service start at once and each
//! runs its schema migrations (refinery, which takes no lock of its own) on a fresh schema.
//!
//! Round 1 runs them as they are: they race. Round 2 runs them under one pglock advisory lock:
//! one migrates, the others wait, then find nothing left to do. Each instance is a process of
//! its own, and all of them are released at the same instant.
//!
//! ```sh
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/test cargo run -p migrate-demo --release -- --instances 6
//! ```

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};
use pglock::{AdvisoryLock, AdvisoryLockGuard, Session};
use tokio_postgres::{Client, NoTls};

mod embedded {
    refinery::embed_migrations!("migrations");
}

#[derive(Parser, Debug)]
#[command(
    name = "migrate-demo",
    about = "Several instances run refinery migrations at once: without a lock, then with pglock."
)]
struct Cli {
    /// PostgreSQL to run against (a scratch schema is created and dropped)
    #[arg(
        long,
        env = "DATABASE_URL",
        hide_env_values = true,
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    database_url: String,

    /// How many instances start at once
    #[arg(long, default_value_t = 6)]
    instances: usize,

    /// Which rounds to run
    #[arg(long, value_enum, default_value_t = Rounds::Both)]
    rounds: Rounds,

    /// Start from a schema already migrated to this version (a later deploy), instead of an
    /// empty one
    #[arg(long)]
    from_version: Option<i32>,

    /// Keep the scratch schemas afterwards, to look at them
    #[arg(long)]
    keep: bool,

    #[command(subcommand)]
    instance: Option<InstanceCommand>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Rounds {
    Both,
    Unlocked,
    Locked,
}

#[derive(Subcommand, Debug)]
enum InstanceCommand {
    /// One instance (started by the demo itself)
    #[command(hide = true)]
    Instance {
        #[arg(long)]
        schema: String,
        #[arg(long)]
        lock: bool,
    },
}

/// What one instance reports, as one line on its stdout.
#[derive(Debug)]
enum Outcome {
    Ok {
        applied: Vec<String>,
        waited: Duration,
    },
    Failed(String),
}

fn main() {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    if let Some(InstanceCommand::Instance { schema, lock }) = &cli.instance {
        let line = runtime.block_on(instance(&cli.database_url, schema, *lock));
        println!("{line}");
        return;
    }
    let code = runtime.block_on(demo(&cli));
    std::process::exit(code);
}

/// One instance: connect, say "ready", wait for "go", migrate (under the lock or not), report.
async fn instance(url: &str, schema: &str, lock: bool) -> String {
    match instance_inner(url, schema, lock).await {
        Ok((applied, waited)) => format!(
            "ok {} {}",
            waited.as_micros(),
            if applied.is_empty() {
                "-".to_owned()
            } else {
                applied.join(",")
            }
        ),
        Err(message) => format!("failed {}", message.replace('\n', " ")),
    }
}

async fn instance_inner(
    url: &str,
    schema: &str,
    lock: bool,
) -> Result<(Vec<String>, Duration), String> {
    let mut client = connect(url, "migrate-demo instance").await?;
    client
        .batch_execute(&format!("SET search_path TO {schema}"))
        .await
        .map_err(|e| chain(&e))?;
    // The lock lives on a session of its own: refinery needs the migrating client by `&mut`.
    // Only this task uses it, so it is declared dedicated: its wait queues in the server and
    // gets the lock as soon as it is free, instead of polling.
    let session = if lock {
        Some(Arc::new(
            Session::connect(&with_app(url, "migrate-demo lock"))
                .await
                .map_err(|e| chain(&e))?
                .dedicated(),
        ))
    } else {
        None
    };
    println!("ready");
    let mut go = String::new();
    std::io::stdin()
        .read_line(&mut go)
        .map_err(|e| e.to_string())?;

    let started = Instant::now();
    let guard = match &session {
        Some(session) => Some(
            AdvisoryLock::new(session.clone(), format!("migrate-demo:{schema}"))
                .lock()
                .await
                .map_err(|e| chain(&e))?,
        ),
        None => None,
    };
    let waited = started.elapsed();
    let result = embedded::migrations::runner().run_async(&mut client).await;
    if let Some(guard) = guard {
        AdvisoryLockGuard::unlock(guard)
            .await
            .map_err(|e| chain(&e))?;
    }
    let report = result.map_err(|e| chain(&e))?;
    let applied = report
        .applied_migrations()
        .iter()
        .map(|m| format!("V{}", m.version()))
        .collect();
    Ok((applied, waited))
}

/// Both rounds, and the summary. Exit status 0 when the locked round is all green.
async fn demo(cli: &Cli) -> i32 {
    let admin = match connect(&cli.database_url, "migrate-demo").await {
        Ok(client) => client,
        Err(error) => {
            eprintln!(
                "cannot connect to {}: {error}\nset DATABASE_URL to a PostgreSQL you may create schemas in",
                pglock::redact_url(&cli.database_url)
            );
            return 2;
        }
    };
    let version: String = admin
        .query_one("SHOW server_version", &[])
        .await
        .map(|row| row.get(0))
        .unwrap_or_else(|_| "?".to_owned());
    let migrations = embedded::migrations::runner().get_migrations().len();
    let run_id = format!("{:08x}", std::process::id() ^ nanos());
    println!(
        "{} instances start at the same instant, each running {} refinery migrations",
        cli.instances, migrations
    );
    println!(
        "on PostgreSQL {version} at {}\n",
        pglock::redact_url(&cli.database_url)
    );

    let mut locked_ok = true;
    if cli.rounds != Rounds::Locked {
        let schema = format!("pglock_demo_{run_id}_unlocked");
        println!("Round 1: without a lock (schema {schema})");
        let summary = round(cli, &admin, &schema, false, migrations).await;
        println!("  => {summary}\n");
    }
    if cli.rounds != Rounds::Unlocked {
        let schema = format!("pglock_demo_{run_id}_locked");
        println!("Round 2: under pglock's advisory lock (schema {schema})");
        let summary = round(cli, &admin, &schema, true, migrations).await;
        locked_ok = summary.all_ok && summary.exactly_once;
        println!("  => {summary}\n");
    }
    if cli.rounds == Rounds::Unlocked {
        0
    } else if locked_ok {
        println!(
            "With pglock every instance succeeded and each migration was applied exactly once."
        );
        0
    } else {
        println!("The locked round did not go as it should: see above.");
        1
    }
}

struct Summary {
    succeeded: usize,
    instances: usize,
    history_rows: i64,
    distinct_versions: i64,
    migrations: usize,
    accounts: Option<i64>,
    all_ok: bool,
    exactly_once: bool,
    elapsed: Duration,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} of {} instances succeeded ({} failed) in {} ms; refinery_schema_history: {} rows, {} distinct versions (of {})",
            self.succeeded,
            self.instances,
            self.instances - self.succeeded,
            self.elapsed.as_millis(),
            self.history_rows,
            self.distinct_versions,
            self.migrations
        )?;
        if let Some(accounts) = self.accounts {
            write!(f, "; accounts: {accounts} rows")?;
        }
        if self.all_ok && self.exactly_once {
            write!(f, "; every migration applied exactly once")?;
        }
        Ok(())
    }
}

async fn round(cli: &Cli, admin: &Client, schema: &str, lock: bool, migrations: usize) -> Summary {
    admin
        .batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}"
        ))
        .await
        .expect("create the scratch schema");
    if let Some(version) = cli.from_version {
        let mut setup = connect(&cli.database_url, "migrate-demo setup")
            .await
            .expect("connect for the setup");
        setup
            .batch_execute(&format!("SET search_path TO {schema}"))
            .await
            .expect("set the search path");
        embedded::migrations::runner()
            .set_target(refinery::Target::Version(version))
            .run_async(&mut setup)
            .await
            .expect("apply the first migrations");
    }
    let exe = std::env::current_exe().expect("the demo's own path");
    let mut children: Vec<(Child, BufReader<std::process::ChildStdout>)> = (0..cli.instances)
        .map(|_| {
            let mut command = Command::new(&exe);
            command
                .env("DATABASE_URL", &cli.database_url)
                .args(["instance", "--schema", schema])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped());
            if lock {
                command.arg("--lock");
            }
            let mut child = command.spawn().expect("start an instance");
            let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
            (child, stdout)
        })
        .collect();
    // Every instance is connected and waiting: release them all at once.
    let mut early = vec![None; children.len()];
    for (i, (_, stdout)) in children.iter_mut().enumerate() {
        let mut line = String::new();
        stdout.read_line(&mut line).expect("read an instance");
        if line.trim() != "ready" {
            early[i] = Some(line);
        }
    }
    let started = Instant::now();
    for (child, _) in &mut children {
        let stdin = child.stdin.as_mut().expect("piped stdin");
        let _ = stdin.write_all(b"go\n").and_then(|()| stdin.flush());
    }
    let mut outcomes = Vec::new();
    for ((mut child, mut stdout), early) in children.into_iter().zip(early) {
        let mut line = early.unwrap_or_default();
        if line.is_empty() {
            stdout.read_line(&mut line).expect("read an instance");
        }
        let _ = child.wait();
        outcomes.push(parse_outcome(line.trim()));
    }
    let elapsed = started.elapsed();

    let mut succeeded = 0;
    for (i, outcome) in outcomes.iter().enumerate() {
        match outcome {
            Outcome::Ok { applied, waited } => {
                succeeded += 1;
                let what = if applied.is_empty() {
                    "ok, nothing left to apply".to_owned()
                } else {
                    format!("ok, applied {}", applied.join(" "))
                };
                if lock {
                    println!(
                        "  instance {}: {what} (waited {} ms for the lock)",
                        i + 1,
                        waited.as_millis()
                    );
                } else {
                    println!("  instance {}: {what}", i + 1);
                }
            }
            Outcome::Failed(message) => println!("  instance {}: FAILED: {message}", i + 1),
        }
    }
    let (history_rows, distinct_versions) = admin
        .query_one(
            &format!(
                "SELECT count(*), count(DISTINCT version) FROM {schema}.refinery_schema_history"
            ),
            &[],
        )
        .await
        .map(|row| (row.get(0), row.get(1)))
        .unwrap_or((0, 0));
    let accounts = admin
        .query_one(&format!("SELECT count(*) FROM {schema}.accounts"), &[])
        .await
        .ok()
        .map(|row| row.get(0));
    let applied_total: usize = outcomes
        .iter()
        .map(|o| match o {
            Outcome::Ok { applied, .. } => applied.len(),
            Outcome::Failed(_) => 0,
        })
        .sum();
    let pending = embedded::migrations::runner()
        .get_migrations()
        .iter()
        .filter(|m| cli.from_version.is_none_or(|from| m.version() > from))
        .count();
    let exactly_once = history_rows == migrations as i64
        && distinct_versions == migrations as i64
        && applied_total == pending
        && accounts == Some(1000);
    if !cli.keep {
        let _ = admin
            .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
            .await;
    }
    Summary {
        succeeded,
        instances: outcomes.len(),
        history_rows,
        distinct_versions,
        migrations,
        accounts,
        all_ok: succeeded == outcomes.len(),
        exactly_once,
        elapsed,
    }
}

fn parse_outcome(line: &str) -> Outcome {
    if let Some(rest) = line.strip_prefix("ok ") {
        let mut parts = rest.splitn(2, ' ');
        let waited = parts
            .next()
            .and_then(|w| w.parse().ok())
            .map(Duration::from_micros)
            .unwrap_or_default();
        let applied = match parts.next() {
            Some("-") | None => Vec::new(),
            Some(list) => list.split(',').map(str::to_owned).collect(),
        };
        Outcome::Ok { applied, waited }
    } else if let Some(message) = line.strip_prefix("failed ") {
        Outcome::Failed(message.to_owned())
    } else {
        Outcome::Failed(format!("the instance said {line:?}"))
    }
}

async fn connect(url: &str, app: &str) -> Result<Client, String> {
    let (client, connection) = tokio_postgres::connect(&with_app(url, app), NoTls)
        .await
        .map_err(|e| chain(&e))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// `url` with `application_name` set, unless it sets one (URL or key-value form).
fn with_app(url: &str, app: &str) -> String {
    if url.contains("application_name") {
        url.to_owned()
    } else if url.contains("://") {
        let sep = if url.contains('?') { '&' } else { '?' };
        format!("{url}{sep}application_name={}", app.replace(' ', "%20"))
    } else {
        format!("{url} application_name='{app}'")
    }
}

/// An error with its causes, on one line (the driver's database errors hide in the source).
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

fn nanos() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default()
}
