//! The command line: subcommands, their options, and what they resolve to.

use std::ffi::OsString;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use pglock::{AdvisoryKey, DatabaseUrl};

use crate::{exit, format};

const EXAMPLES: &str = "\
Examples:
  # Run migrations in one container at a time; the others wait, then find nothing to do.
  pglock run migrations -- alembic upgrade head

  # Skip the job if another instance is running it (exit 75), or give up after 30 s.
  pglock run -n nightly-report -- ./report.sh
  pglock run --timeout 30s nightly-report -- ./report.sh

  # At most three exports at once across the fleet; each knows its slot in PGLOCK_SLOT.
  pglock run --slots 3 nightly-export -- ./export.sh

  # Run celery beat on exactly one instance; another takes over if it goes away.
  pglock leader beat -- celery --app shop beat

  # Who holds which lock, and who waits?
  pglock status
  pglock status --json";

#[derive(Parser, Debug)]
#[command(
    name = "pglock",
    version,
    about = "Run a command under a PostgreSQL advisory lock, like flock(1) across machines.",
    long_about = "Run a command under a PostgreSQL advisory lock, like flock(1) across machines.\n\n\
        Every instance that runs `pglock run NAME -- COMMAND` against the same database takes \
        the same lock: one runs COMMAND at a time, the others wait (or give up, with -n or \
        --timeout). The lock is held by pglock's database session: if that session ends \
        (the backend is terminated, the network fails), pglock stops the command.",
    after_help = EXAMPLES,
    after_long_help = format!("{EXAMPLES}\n\n{}", exit::HELP),
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command takes.
#[derive(Args, Debug)]
pub struct Global {
    /// PostgreSQL connection string: a libpq URL (postgresql://user:password@host:5432/db), a
    /// SQLAlchemy URL (postgresql+psycopg2://…, +psycopg, +asyncpg, +pg8000), a Django or JDBC
    /// URL (jdbc:postgresql://host/db?user=…), or libpq key=value pairs; the password is never
    /// printed
    #[arg(
        long,
        env = "DATABASE_URL",
        hide_env_values = true,
        global = true,
        value_name = "URL"
    )]
    database_url: Option<String>,

    /// How long to keep trying while the server refuses connections for a passing reason (too
    /// many clients, starting up, restarting, not reachable yet); a --timeout shorter than this
    /// bounds it too
    #[arg(
        long,
        global = true,
        default_value = "60s",
        value_parser = format::parse_duration,
        value_name = "DURATION"
    )]
    pub connect_timeout: Duration,

    /// Print nothing but errors (no progress while waiting)
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,

    /// Print more: connection, acquisition, child pid, signals forwarded, and the library's
    /// tracing events (acquire, wait, grant, release, loss, leadership); -vv adds trace events
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

impl Global {
    /// The connection string, read; or the usage exit code after saying what is wrong (never
    /// showing the password).
    pub fn database_url(&self) -> Result<DatabaseUrl, i32> {
        match &self.database_url {
            Some(url) if !url.trim().is_empty() => DatabaseUrl::parse(url).map_err(|error| {
                eprintln!("pglock: {error}");
                exit::USAGE
            }),
            _ => {
                eprintln!(
                    "pglock: no database given: pass --database-url URL or set DATABASE_URL \
                     (e.g. postgresql://user@host:5432/db)"
                );
                Err(exit::USAGE)
            }
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Take the lock, run COMMAND, release the lock when it exits; exit with its status
    #[command(after_long_help = exit::HELP)]
    Run(RunArgs),
    /// Run COMMAND only while this instance is the leader; stop it when leadership is lost,
    /// campaign again; the fencing term is in PGLOCK_TERM
    #[command(after_long_help = exit::HELP)]
    Leader(LeaderArgs),
    /// Show the advisory locks on the database: holders, waiters, who waits for whom
    Status(StatusArgs),
}

/// Which lock: a name, or a numeric key.
#[derive(Args, Debug)]
pub struct Target {
    /// The lock's name; every instance using the same name shares one lock (the key is derived
    /// from the name: see AdvisoryKey::from_name)
    #[arg(required_unless_present = "key", value_name = "NAME")]
    pub name: Option<String>,

    /// A numeric key instead of a name: one 64-bit integer (42) or a pair of 32-bit integers
    /// (1,2), to share a lock with other programs that use pg_advisory_lock directly
    #[arg(
        long,
        value_parser = format::parse_key,
        conflicts_with = "name",
        value_name = "KEY",
        allow_hyphen_values = true
    )]
    pub key: Option<AdvisoryKey>,
}

/// A resolved [`Target`].
pub struct Resolved {
    pub key: AdvisoryKey,
    pub name: Option<String>,
    /// The name, or `key 42` for a numeric key.
    pub label: String,
}

impl Target {
    pub fn resolve(&self) -> Resolved {
        match (&self.name, self.key) {
            (_, Some(key)) => Resolved {
                key,
                name: None,
                label: format!("key {}", format::key_arg(key)),
            },
            (Some(name), None) => Resolved {
                key: AdvisoryKey::from_name(name),
                name: Some(name.clone()),
                label: name.clone(),
            },
            (None, None) => unreachable!("clap requires a name or a key"),
        }
    }
}

/// How the command is run and stopped.
#[derive(Args, Debug)]
pub struct ChildArgs {
    /// Signal that asks the command to stop when the lock is lost
    #[arg(long, default_value = "TERM", value_parser = format::parse_signal, value_name = "SIGNAL")]
    pub stop_signal: i32,

    /// How long the command has to exit after the stop signal before SIGKILL
    #[arg(long, default_value = "10s", value_parser = format::parse_duration, value_name = "DURATION")]
    pub kill_after: Duration,

    /// Keep the command in pglock's process group and the terminal's foreground (interactive
    /// commands); the terminal then signals it directly and pglock forwards only SIGTERM,
    /// SIGUSR1 and SIGUSR2
    #[arg(long)]
    pub foreground: bool,
}

/// How pglock's database session is named and waits.
#[derive(Args, Debug)]
pub struct SessionArgs {
    /// application_name of pglock's sessions [default: "pglock run NAME" or "pglock leader
    /// NAME"; a URL's own application_name is kept]
    #[arg(long, value_name = "NAME")]
    pub application_name: Option<String>,

    /// How often to report while waiting: once when the lock is found busy, then every
    /// DURATION (0: only once)
    #[arg(long, default_value = "10s", value_parser = format::parse_duration, value_name = "DURATION")]
    pub progress_every: Duration,

    /// How to wait while the lock is busy: in the server's lock queue, holding one connection
    /// (queue); without a connection between attempts, polling (poll); or queue while the server
    /// has room to spare and poll when its connection slots run short (auto)
    #[arg(long, value_enum, default_value_t = WaitMode::Auto, value_name = "MODE")]
    pub wait_mode: WaitMode,
}

/// How a waiter waits; see docs/cli.md, "Waiting and connection slots".
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum WaitMode {
    /// In the server's lock queue: one connection held while waiting, first come first served,
    /// the lock handed over within a round trip.
    Queue,
    /// No connection between attempts: connect, try, disconnect, pause (up to 2 s).
    Poll,
    /// Queue while the server keeps enough connection slots free, else poll.
    Auto,
}

/// What pglock serves over HTTP while it runs.
#[derive(Args, Debug)]
pub struct HttpArgs {
    /// Serve GET /healthz (200 while the database session is healthy, else 503), /metrics
    /// (Prometheus text format) and, for `pglock leader`, /leader (200 while this instance
    /// leads, else 503) on ADDR: IP:PORT, [IPv6]:PORT, localhost:PORT, or :PORT for every IPv4
    /// interface
    #[arg(long, value_parser = crate::http::parse_addr, value_name = "ADDR")]
    pub http: Option<std::net::SocketAddr>,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub target: Target,

    /// Give up if the lock is busy instead of waiting
    #[arg(
        short = 'n',
        long = "nonblock",
        visible_alias = "nb",
        conflicts_with = "timeout"
    )]
    pub nonblock: bool,

    /// Give up if the lock is still busy after DURATION (10, 1.5, 250ms, 30s, 5m, 1h); 0 is
    /// like -n [default: wait forever]
    #[arg(short = 'w', long, value_parser = format::parse_duration, value_name = "DURATION")]
    pub timeout: Option<Duration>,

    /// Take the lock in shared mode: any number of shared holders together, none while an
    /// exclusive holder runs
    #[arg(short, long)]
    pub shared: bool,

    /// Make NAME a semaphore of N slots: at most N instances run their command at once, each
    /// holding one slot (the child gets PGLOCK_SLOT, 0 to N-1, and PGLOCK_SLOTS); waiters queue
    /// in arrival order. Every instance must give the same N for a name
    #[arg(
        long,
        value_name = "N",
        value_parser = clap::value_parser!(u32).range(1..=i32::MAX as i64),
        conflicts_with_all = ["shared", "key"],
    )]
    pub slots: Option<u32>,

    /// Exit code when the lock could not be had (-n busy, --timeout expired)
    #[arg(short = 'E', long, default_value_t = exit::CONFLICT, value_name = "CODE")]
    pub conflict_exit_code: u8,

    #[command(flatten)]
    pub child: ChildArgs,

    #[command(flatten)]
    pub session: SessionArgs,

    #[command(flatten)]
    pub serve: HttpArgs,

    /// The command to run, after `--`. It gets PGLOCK_NAME, PGLOCK_KEY and PGLOCK_MODE in its
    /// environment (and PGLOCK_SLOT, PGLOCK_SLOTS with --slots)
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

/// When `pglock leader` runs the command again after it exited on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Restart {
    /// Never: pglock exits with the command's status (and with 76 if leadership is lost)
    Never,
    /// After a non-zero status or a death by signal; a status of 0 ends pglock with 0
    OnFailure,
    /// After any exit
    Always,
}

#[derive(Args, Debug)]
pub struct LeaderArgs {
    /// The leadership's name; the instances that use the same name elect one leader (the lock
    /// key is derived from "leader:NAME")
    #[arg(value_name = "NAME")]
    pub name: String,

    /// When to run the command again after it exits on its own (pglock steps down, waits
    /// --restart-delay, and campaigns again: another instance may take over)
    #[arg(long, value_enum, default_value_t = Restart::OnFailure, value_name = "POLICY")]
    pub restart: Restart,

    /// Pause before campaigning again after the command exited
    #[arg(long, default_value = "1s", value_parser = format::parse_duration, value_name = "DURATION")]
    pub restart_delay: Duration,

    /// The table that keeps the fencing terms, as TABLE or SCHEMA.TABLE [default:
    /// pglock_leader_terms, created on first use]
    #[arg(long, value_parser = parse_term_table, value_name = "TABLE")]
    pub term_table: Option<pglock::TermTable>,

    #[command(flatten)]
    pub child: ChildArgs,

    #[command(flatten)]
    pub session: SessionArgs,

    #[command(flatten)]
    pub serve: HttpArgs,

    /// The command to run, after `--`. It gets PGLOCK_NAME, PGLOCK_TERM (the fencing term, a
    /// number that grows with every new leader) and PGLOCK_KEY in its environment
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

/// `NAME:N`: a semaphore's name (which may contain `:`) and its number of slots.
fn parse_semaphore(text: &str) -> Result<(String, u32), String> {
    let (name, n) = text
        .rsplit_once(':')
        .ok_or_else(|| format!("expected NAME:N (a semaphore and its slots), not {text:?}"))?;
    match n.parse::<u32>() {
        Ok(n) if n >= 1 && n <= i32::MAX as u32 => Ok((name.to_owned(), n)),
        _ => Err(format!(
            "the number of slots in {text:?} must be between 1 and {}",
            i32::MAX
        )),
    }
}

fn parse_term_table(text: &str) -> Result<pglock::TermTable, String> {
    let table = match text.split_once('.') {
        Some((schema, table)) => pglock::TermTable::new(table).in_schema(schema),
        None => pglock::TermTable::new(text),
    };
    table.qualified_name().map_err(|error| error.to_string())?;
    Ok(table)
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Print JSON (for scripts) instead of a table
    #[arg(long)]
    pub json: bool,

    /// Show only this lock (repeatable)
    #[arg(long, value_name = "NAME")]
    pub name: Vec<String>,

    /// Show only this key (repeatable): 42 or 1,2
    #[arg(long, value_parser = format::parse_key, value_name = "KEY", allow_hyphen_values = true)]
    pub key: Vec<AdvisoryKey>,

    /// A lock name to recognise in the listing without filtering on it (repeatable); names of
    /// locks held by `pglock run/leader` are recognised anyway
    #[arg(long, value_name = "NAME")]
    pub known: Vec<String>,

    /// Show only this semaphore, NAME:N for a semaphore NAME of N slots (repeatable): its
    /// holders as `NAME [slot k of N]`, its waiters as `NAME [queue of N]`; semaphores held by
    /// `pglock run --slots` are recognised anyway
    #[arg(long, value_parser = parse_semaphore, value_name = "NAME:N")]
    pub semaphore: Vec<(String, u32)>,
}
