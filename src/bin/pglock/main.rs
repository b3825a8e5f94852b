//! `pglock`: run any program under a PostgreSQL advisory lock or a leadership, like `flock(1)`
//! across machines. See docs/cli.md.

mod args;
mod child;
mod connect;
mod exit;
mod format;
mod holders;
mod http;
mod instance;
mod leader;
mod output;
mod run;
mod slot_wait;
mod slots;
mod standby;
mod status;
mod supervise;
mod wait;

use clap::Parser;

use crate::args::{Cli, Command};
use crate::connect::Database;
use crate::output::Output;

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
    let url = match cli.global.database_url() {
        Ok(url) => url,
        Err(code) => std::process::exit(code),
    };
    let out = Output::new(cli.global.quiet, cli.global.verbose > 0, Some(&url));
    if cli.global.verbose > 0 {
        out.print_library_events(cli.global.verbose);
    }
    out.verbose(format_args!("database: {}", url.describe()));
    let db = Database::new(url, cli.global.connect_timeout);
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
            Command::Run(args) => run::run(&db, args, &out).await,
            Command::Leader(args) => leader::leader(&db, args, &out).await,
            Command::Status(args) => status::status(&db, args, &out).await,
        }
    });
    // Background tasks (a release being confirmed) end with the runtime; the connection closes,
    // which ends the server session and so frees anything still held.
    drop(runtime);
    std::process::exit(code);
}
