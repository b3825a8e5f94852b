//! What `pglock run` and `pglock leader` set up before they contact the server: the name their
//! sessions show in `pg_stat_activity`, the `--http` endpoints and the signal handlers.

use std::net::SocketAddr;

use crate::child::Signals;
use crate::connect::AppName;
use crate::exit;
use crate::http::{self, Role, State};
use crate::output::Output;

/// One `pglock run` or `pglock leader` process, set up.
pub struct Instance {
    /// The `application_name` of its sessions.
    pub session_name: SessionName,
    /// What the `--http` endpoints report.
    pub state: State,
    /// The signals pglock forwards to its command.
    pub signals: Signals,
}

impl Instance {
    /// Starts the endpoints and installs the signal handlers; on failure, says why and gives the
    /// exit code.
    pub async fn start(
        command: &str,
        label: &str,
        http: Option<SocketAddr>,
        role: Role,
        out: &Output,
    ) -> Result<Self, i32> {
        let state = http::start(http, role, out).await?;
        let signals = Signals::install().map_err(|error| {
            out.error(format_args!("cannot install signal handlers: {error}"));
            exit::SOFTWARE
        })?;
        Ok(Instance {
            session_name: SessionName(pglock::introspect::application_name(command, label)),
            state,
            signals,
        })
    }
}

/// `pglock run NAME` or `pglock leader NAME` (see [`pglock::introspect::application_name`]).
pub struct SessionName(String);

impl SessionName {
    /// The `application_name` of the instance's sessions: `--application-name` if given, else
    /// this one unless the connection string sets its own.
    pub fn app<'a>(&'a self, forced: Option<&'a str>) -> AppName<'a> {
        match forced {
            Some(name) => AppName::Forced(name),
            None => AppName::Default(&self.0),
        }
    }
}
