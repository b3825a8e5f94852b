//! What pglock says on stderr: levels, errors with their causes and exit codes, the library's
//! tracing events, and the one rule over all of them: the password never appears, whatever a
//! dependency's message contains.

use std::fmt;
use std::io::Write;

use pglock::{DatabaseUrl, Error};

use crate::exit;

/// Shorter passwords are not searched for in messages: they would match inside ordinary words.
/// pglock's own messages never contain a password, whatever its length.
const SHORTEST_SCRUBBED: usize = 4;

/// Messages on stderr, by level.
pub struct Output {
    pub quiet: bool,
    pub verbose: bool,
    scrubber: Scrubber,
}

impl Output {
    pub fn new(quiet: bool, verbose: bool, url: Option<&DatabaseUrl>) -> Self {
        Output {
            quiet,
            verbose,
            scrubber: Scrubber::for_url(url),
        }
    }

    /// Progress and notable events: shown unless `-q`.
    pub fn info(&self, message: fmt::Arguments<'_>) {
        if !self.quiet {
            self.print(message);
        }
    }

    /// Details: shown with `-v`.
    pub fn verbose(&self, message: fmt::Arguments<'_>) {
        if self.verbose {
            self.print(message);
        }
    }

    /// Failures: always shown.
    pub fn error(&self, message: fmt::Arguments<'_>) {
        self.print(message);
    }

    fn print(&self, message: fmt::Arguments<'_>) {
        eprintln!("pglock: {}", self.scrubber.scrub(message.to_string()));
    }

    /// What removes the password from text shown elsewhere (the `--http` answers).
    pub fn scrubber(&self) -> Scrubber {
        self.scrubber.clone()
    }

    /// Prints `error` with its causes and returns the exit code that classifies it.
    pub fn report_error(&self, error: &Error) -> i32 {
        self.error(format_args!("{}", with_causes(error)));
        match error {
            Error::Connect { .. } | Error::Tls { .. } => exit::CANNOT_CONNECT,
            // The pool's connection failed: the server refused the login or could not be
            // reached.
            Error::Pool(deadpool_postgres::PoolError::Backend(_)) => exit::CANNOT_CONNECT,
            Error::Config(_) => exit::USAGE,
            _ => exit::SOFTWARE,
        }
    }

    /// Prints pglock's `tracing` events on stderr: DEBUG with `-v`, TRACE with `-vv`.
    pub fn print_library_events(&self, verbosity: u8) {
        let level = if verbosity > 1 {
            tracing::Level::TRACE
        } else {
            tracing::Level::DEBUG
        };
        let scrubber = self.scrubber.clone();
        let _ = tracing_subscriber::fmt()
            .with_writer(move || ScrubbedStderr {
                scrubber: scrubber.clone(),
                line: Vec::new(),
            })
            .with_max_level(level)
            .with_ansi(false)
            .try_init();
    }
}

/// `error` followed by the causes its message does not already include ("error connecting to
/// server: Connection refused (os error 111)").
pub fn with_causes(error: &dyn std::error::Error) -> String {
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

/// Replaces the connection string's password, as given and percent-encoded, by `***`.
#[derive(Clone, Default)]
pub struct Scrubber {
    secrets: Vec<String>,
}

impl Scrubber {
    fn for_url(url: Option<&DatabaseUrl>) -> Self {
        let Some(password) = url
            .and_then(|url| url.get("password"))
            .filter(|p| p.len() >= SHORTEST_SCRUBBED)
        else {
            return Scrubber::default();
        };
        let mut secrets = vec![password.to_owned(), percent_encoded(password)];
        secrets.dedup();
        // The longest first, so that no shorter form leaves part of a longer one.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        Scrubber { secrets }
    }

    pub fn scrub(&self, mut text: String) -> String {
        for secret in &self.secrets {
            if text.contains(secret.as_str()) {
                text = text.replace(secret.as_str(), "***");
            }
        }
        text
    }
}

fn percent_encoded(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Stderr for tracing's formatter, which writes each event whole: the event is collected, then
/// scrubbed and written when the writer is dropped.
struct ScrubbedStderr {
    scrubber: Scrubber,
    line: Vec<u8>,
}

impl Write for ScrubbedStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.line.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for ScrubbedStderr {
    fn drop(&mut self) {
        let text = String::from_utf8_lossy(&self.line).into_owned();
        let _ = std::io::stderr().write_all(self.scrubber.scrub(text).as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrubs_the_password_in_every_form() {
        let url: DatabaseUrl = "postgresql://u:p%40ss%20w0rd@h/db".parse().unwrap();
        let scrubber = Scrubber::for_url(Some(&url));
        assert_eq!(
            scrubber.scrub("a p@ss w0rd b p%40ss%20w0rd c".to_owned()),
            "a *** b *** c"
        );
        let short: DatabaseUrl = "postgresql://u:abc@h/db".parse().unwrap();
        assert_eq!(
            Scrubber::for_url(Some(&short)).scrub("abc".to_owned()),
            "abc"
        );
    }
}
