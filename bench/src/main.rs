//! pglock's benchmark suite: every figure is measured in the same run, interleaved in rounds,
//! and reported as a ratio to a baseline of the same round, so that the noise of a shared
//! machine cancels out as far as it can.
//!
//! ```sh
//! cargo run --release -p pglock-bench -- --rounds 7 --sample-ms 300 --json bench.json
//! ```
//!
//! The database is `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/test`). The
//! suite uses random keys and cleans up after itself. It is not a test: it never fails on a
//! figure.

mod alloc;
mod cases;
mod cycles;
mod report;

use std::time::Duration;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let current_thread = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    };
    match args.first().map(String::as_str) {
        // One loop, for callgrind (see `bench/instructions.sh`).
        Some("cycles") => return current_thread().block_on(cycles::main(&args[1..])),
        // The second process of scenario 4.
        Some("contender") => return current_thread().block_on(cases::contender_main(&args[1..])),
        _ => {}
    }
    let mut config = report::Config::default();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = || it.next().cloned().expect("option needs a value");
        match arg.as_str() {
            "--rounds" => config.rounds = value().parse().expect("--rounds N"),
            "--sample-ms" => {
                config.sample = Duration::from_millis(value().parse().expect("--sample-ms N"))
            }
            "--json" => config.json = Some(value()),
            "--only" => config.only = Some(value()),
            "--threads" => config.threads = value().parse().expect("--threads N"),
            "--help" | "-h" => {
                println!(
                    "usage: pglock-bench [--rounds N] [--sample-ms MS] [--threads N] [--json FILE] [--only SUBSTRING]\n\
                     \x20      pglock-bench cycles LOOP N   (for callgrind; LOOP one of {:?})",
                    cycles::LOOPS
                );
                return;
            }
            other => panic!("unknown argument {other}; try --help"),
        }
    }
    // One runtime thread by default: on a small machine the server's backends need the other
    // cores, and a single thread keeps the client's CPU figures free of cross-thread wakeups.
    let runtime = if config.threads <= 1 {
        current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.threads)
            .enable_all()
            .build()
            .expect("runtime")
    };
    runtime.block_on(report::run(config));
}
