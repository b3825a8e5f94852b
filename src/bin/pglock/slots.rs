//! Whether a waiter may keep a connection while it waits: the server's free connection slots.
//!
//! A waiter in the server's lock queue holds one connection for as long as it waits. A fleet
//! that starts together can hold every slot that way, and the holder's own command (the
//! migration that needs a connection of its own) is then refused: the fleet stalls. With
//! `--wait-mode auto`, a waiter queues only while the server keeps [`headroom`] slots free for
//! others, counting every connection open at that moment (the other waiters deciding included),
//! and polls without a connection otherwise.

use tokio_postgres::Client;

use crate::args::WaitMode;
use crate::output::Output;

/// How a waiter waits, once chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Waiting {
    /// In the server's lock queue, on the connection it has.
    Queue,
    /// Without a connection between attempts.
    Poll,
}

/// The slots that must stay free for a waiter to queue: a tenth of `max_connections`, and at
/// least 5.
pub fn headroom(max_connections: i32) -> i32 {
    (max_connections / 10).max(5)
}

/// The connection slots still free to this role, and `max_connections`. Superusers may use the
/// slots reserved for them; other roles may not.
const FREE_SLOTS: &str = "SELECT current_setting('max_connections')::int \
     - CASE WHEN r.rolsuper THEN 0 \
       ELSE current_setting('superuser_reserved_connections')::int \
          + coalesce(nullif(current_setting('reserved_connections', true), '')::int, 0) END \
     - (SELECT count(*)::int FROM pg_stat_activity WHERE backend_type = 'client backend'), \
     current_setting('max_connections')::int \
     FROM pg_roles r WHERE r.rolname = current_user";

/// Chooses how to wait: as `mode` says, or for `auto` by the free slots seen on `client` (the
/// waiter's own connection, idle). Says on stderr when `auto` chooses to poll.
pub async fn choose(mode: WaitMode, client: &Client, label: &str, out: &Output) -> Waiting {
    match mode {
        WaitMode::Queue => Waiting::Queue,
        WaitMode::Poll => Waiting::Poll,
        WaitMode::Auto => {
            let row = match client.query_one(FREE_SLOTS, &[]).await {
                Ok(row) => row,
                Err(error) => {
                    out.verbose(format_args!(
                        "cannot count the server's free connection slots ({error}): waiting in its queue"
                    ));
                    return Waiting::Queue;
                }
            };
            let (free, max): (i32, i32) = (row.get(0), row.get(1));
            let needed = headroom(max);
            if free >= needed {
                out.verbose(format_args!(
                    "{free} of {max} connection slots free: waiting for {label} in the server's queue"
                ));
                Waiting::Queue
            } else {
                out.info(format_args!(
                    "only {free} of {max} connection slots free (fewer than {needed}): waiting for \
                     {label} without holding a connection, trying again every few seconds"
                ));
                Waiting::Poll
            }
        }
    }
}

/// Chooses how to wait when the free slots cannot be counted: as `mode` says, and in the queue
/// for `auto`.
pub fn choose_without_asking(mode: WaitMode) -> Waiting {
    match mode {
        WaitMode::Poll => Waiting::Poll,
        WaitMode::Queue | WaitMode::Auto => Waiting::Queue,
    }
}
