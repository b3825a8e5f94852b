//! The exit codes of the `pglock` command. Documented in `--help` and docs/cli.md: keep the
//! three in step.

/// The command ran and exited 0 (or `pglock status` succeeded).
pub const OK: i32 = 0;
/// Bad arguments: an unknown option, a malformed key or duration, no database URL.
pub const USAGE: i32 = 64;
/// PostgreSQL could not be reached, or refused the login.
pub const CANNOT_CONNECT: i32 = 69;
/// Any other failure of pglock itself: a server error, the connection lost while waiting.
pub const SOFTWARE: i32 = 70;
/// The default code when the lock could not be had: busy with `-n`, or `--timeout` expired.
/// `-E/--conflict-exit-code` changes it.
pub const CONFLICT: u8 = 75;
/// The lock (or leadership) was lost while the command ran: pglock stopped the command.
pub const LOCK_LOST: i32 = 76;
/// The command was found but could not be executed.
pub const CANNOT_EXECUTE: i32 = 126;
/// The command was not found.
pub const NOT_FOUND: i32 = 127;
/// A process that died of signal N is reported as 128 + N, as shells do.
pub const SIGNAL_BASE: i32 = 128;

/// The table shown at the end of `--help`.
pub const HELP: &str = "\
Exit codes:
  0..=255  the command's own exit status (pglock run)
  128+N    the command died of signal N (e.g. 143 for SIGTERM), or pglock was
           interrupted by signal N while it waited for the lock
  64       bad arguments (usage error, missing DATABASE_URL)
  69       cannot connect to PostgreSQL
  70       other database or internal error (e.g. connection lost while waiting)
  75       lock busy (-n) or timed out (--timeout); change with -E/--conflict-exit-code
  76       lock or leadership lost while the command ran: the command was stopped
  126      the command could not be executed
  127      the command was not found";
