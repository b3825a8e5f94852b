//! `pglock`: run any program under a PostgreSQL advisory lock or a leadership, like `flock(1)`
//! across machines. See docs/cli.md.

mod child;
mod connect;
mod exit;
mod format;
mod leader;
mod run;
mod status;
mod wait;

use std::ffi::OsString;
use std::fmt;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use pglock::AdvisoryKey;

const EXAMPLES: &str = "\
Examples:
  # Run migrations in one container at a time; the others wait, then find nothing to do.
  pglock run migrations -- alembic upgrade head

  # Skip the job if another instance is running it (exit 75), or give up after 30 s.
  pglock run -n nightly-report -- ./report.sh
  pglock run --timeout 30s nightly-report -- ./report.sh

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
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

/// Options every command takes.
#[derive(Args, Debug)]
pub struct Global {
    /// PostgreSQL connection URL, e.g. postgres://user:password@host:5432/db?sslmode=require
    /// (the password is never printed)
    #[arg(
        long,
        env = "DATABASE_URL",
        hide_env_values = true,
        global = true,
        value_name = "URL"
    )]
    database_url: Option<String>,

    /// Print nothing but errors (no progress while waiting)
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,

    /// Print more: connection, acquisition, child pid, signals forwarded, and the library's
    /// tracing events (acquire, wait, grant, release, loss, leadership); -vv adds trace events
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
}

impl Global {
    /// The database URL, or the usage exit code after saying how to give one.
    pub fn database_url(&self) -> Result<String, i32> {
        match &self.database_url {
            Some(url) if !url.trim().is_empty() => Ok(url.clone()),
            _ => {
                eprintln!(
                    "pglock: no database given: pass --database-url URL or set DATABASE_URL \
                     (e.g. postgres://user@host:5432/db)"
                );
                Err(exit::USAGE)
            }
        }
    }
}

#[derive(Subcommand, Debug)]
enum Command {
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
    name: Option<String>,

    /// A numeric key instead of a name: one 64-bit integer (42) or a pair of 32-bit integers
    /// (1,2), to share a lock with other programs that use pg_advisory_lock directly
    #[arg(
        long,
        value_parser = format::parse_key,
        conflicts_with = "name",
        value_name = "KEY",
        allow_hyphen_values = true
    )]
    key: Option<AdvisoryKey>,
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
    stop_signal: i32,

    /// How long the command has to exit after the stop signal before SIGKILL
    #[arg(long, default_value = "10s", value_parser = format::parse_duration, value_name = "DURATION")]
    kill_after: Duration,

    /// Keep the command in pglock's process group and the terminal's foreground (interactive
    /// commands); the terminal then signals it directly and pglock forwards only SIGTERM,
    /// SIGUSR1 and SIGUSR2
    #[arg(long)]
    foreground: bool,

    /// application_name of pglock's sessions [default: "pglock run NAME" or "pglock leader
    /// NAME"; a URL's own application_name is kept]
    #[arg(long, value_name = "NAME")]
    application_name: Option<String>,

    /// How often to report who holds the lock while waiting
    #[arg(long, default_value = "10s", value_parser = format::parse_duration, value_name = "DURATION")]
    progress_every: Duration,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    target: Target,

    /// Give up if the lock is busy instead of waiting
    #[arg(
        short = 'n',
        long = "nonblock",
        visible_alias = "nb",
        conflicts_with = "timeout"
    )]
    nonblock: bool,

    /// Give up if the lock is still busy after DURATION (10, 1.5, 250ms, 30s, 5m, 1h); 0 is
    /// like -n [default: wait forever]
    #[arg(short = 'w', long, value_parser = format::parse_duration, value_name = "DURATION")]
    timeout: Option<Duration>,

    /// Take the lock in shared mode: any number of shared holders together, none while an
    /// exclusive holder runs
    #[arg(short, long)]
    shared: bool,

    /// Exit code when the lock could not be had (-n busy, --timeout expired)
    #[arg(short = 'E', long, default_value_t = exit::CONFLICT, value_name = "CODE")]
    conflict_exit_code: u8,

    #[command(flatten)]
    child: ChildArgs,

    /// The command to run, after `--`. It gets PGLOCK_NAME, PGLOCK_KEY and PGLOCK_MODE in its
    /// environment
    #[arg(last = true, required = true, value_name = "COMMAND")]
    command: Vec<OsString>,
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
    name: String,

    /// When to run the command again after it exits on its own (pglock steps down, waits
    /// --restart-delay, and campaigns again: another instance may take over)
    #[arg(long, value_enum, default_value_t = Restart::OnFailure, value_name = "POLICY")]
    restart: Restart,

    /// Pause before campaigning again after the command exited
    #[arg(long, default_value = "1s", value_parser = format::parse_duration, value_name = "DURATION")]
    restart_delay: Duration,

    /// The table that keeps the fencing terms, as TABLE or SCHEMA.TABLE [default:
    /// pglock_leader_terms, created on first use]
    #[arg(long, value_parser = parse_term_table, value_name = "TABLE")]
    term_table: Option<pglock::TermTable>,

    #[command(flatten)]
    child: ChildArgs,

    /// The command to run, after `--`. It gets PGLOCK_NAME, PGLOCK_TERM (the fencing term, a
    /// number that grows with every new leader) and PGLOCK_KEY in its environment
    #[arg(last = true, required = true, value_name = "COMMAND")]
    command: Vec<OsString>,
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
    json: bool,

    /// Show only this lock (repeatable)
    #[arg(long, value_name = "NAME")]
    name: Vec<String>,

    /// Show only this key (repeatable): 42 or 1,2
    #[arg(long, value_parser = format::parse_key, value_name = "KEY", allow_hyphen_values = true)]
    key: Vec<AdvisoryKey>,

    /// A lock name to recognise in the listing without filtering on it (repeatable); names of
    /// locks held by `pglock run/leader` are recognised anyway
    #[arg(long, value_name = "NAME")]
    known: Vec<String>,
}

/// Messages on stderr, by level.
pub struct Output {
    pub quiet: bool,
    pub verbose: bool,
}

impl Output {
    /// Progress and notable events: shown unless `-q`.
    pub fn info(&self, message: fmt::Arguments<'_>) {
        if !self.quiet {
            eprintln!("pglock: {message}");
        }
    }

    /// Details: shown with `-v`.
    pub fn verbose(&self, message: fmt::Arguments<'_>) {
        if self.verbose {
            eprintln!("pglock: {message}");
        }
    }

    /// Failures: always shown.
    pub fn error(&self, message: fmt::Arguments<'_>) {
        eprintln!("pglock: {message}");
    }
}

/// Prints pglock's `tracing` events on stderr: DEBUG with `-v`, TRACE with `-vv`.
fn print_library_events(verbosity: u8) {
    let level = if verbosity > 1 {
        tracing::Level::TRACE
    } else {
        tracing::Level::DEBUG
    };
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(level)
        .with_ansi(false)
        .try_init();
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let code = if error.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            };
            let _ = error.print();
            std::process::exit(code);
        }
    };
    let out = Output {
        quiet: cli.global.quiet,
        verbose: cli.global.verbose > 0,
    };
    if cli.global.verbose > 0 {
        print_library_events(cli.global.verbose);
    }
    // One thread: the command is spawned from it (its parent-death signal follows this thread),
    // and pglock has little to do while it waits.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            out.error(format_args!("cannot start the async runtime: {error}"));
            std::process::exit(exit::SOFTWARE);
        }
    };
    let code = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => run::run(&cli.global, args, &out).await,
            Command::Leader(args) => leader::leader(&cli.global, args, &out).await,
            Command::Status(args) => status::status(&cli.global, args, &out).await,
        }
    });
    // Background tasks (a release being confirmed) end with the runtime; the connection closes,
    // which ends the server session and so frees anything still held.
    drop(runtime);
    std::process::exit(code);
}
