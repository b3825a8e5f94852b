//! The connection strings services already have, given to `pglock` as `DATABASE_URL`: every
//! form connects, `-v` says what was understood, and no message ever shows the password.

use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use crate::cli::unique;

const SECRET: &str = "S3cret-pw";

/// Runs `pglock` with `url` as `DATABASE_URL`: (exit code, stderr).
async fn pglock(url: &str, args: &[&str]) -> (i32, String) {
    let child = Command::new(env!("CARGO_BIN_EXE_pglock"))
        .args(args)
        .env("DATABASE_URL", url)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start pglock");
    let output = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .expect("pglock ends within 20 s")
        .unwrap();
    (
        output.status.code().expect("pglock exits"),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The local test server in every form a service may hold it (trust authentication: the
/// password is sent and ignored), with what `-v` must say about each.
fn forms(port: u16) -> Vec<(String, &'static str)> {
    let host = "127.0.0.1";
    vec![
        (format!("postgresql://postgres:{SECRET}@{host}:{port}/test"), "a libpq URL"),
        (format!("postgres://postgres:{SECRET}@{host}:{port}/test"), "a libpq URL"),
        (
            format!("host={host} port={port} dbname=test user=postgres password='{SECRET} x'"),
            "key-value",
        ),
        (
            format!("postgresql+psycopg2://postgres:{SECRET}@{host}:{port}/test"),
            "driver psycopg2",
        ),
        (
            format!("postgresql+psycopg://postgres:{SECRET}@{host}:{port}/test?sslmode=prefer"),
            "driver psycopg",
        ),
        (
            format!("postgresql+asyncpg://postgres:{SECRET}@{host}:{port}/test?ssl=disable&prepared_statement_cache_size=0"),
            "driver asyncpg",
        ),
        (
            format!("postgresql+pg8000://postgres:{SECRET}@{host}:{port}/test"),
            "driver pg8000",
        ),
        (
            format!("postgresql+psycopg2://postgres:{SECRET}@/test?host={host}:{port}"),
            "driver psycopg2",
        ),
        (format!("pgsql://postgres:{SECRET}@{host}:{port}/test"), "a Django URL"),
        (
            format!("jdbc:postgresql://{host}:{port}/test?user=postgres&password={SECRET}&ApplicationName=jvm&prepareThreshold=0"),
            "a JDBC URL",
        ),
    ]
}

#[tokio::test]
async fn every_form_connects_and_verbose_says_what_was_understood() {
    let name = unique("url-forms");
    for (url, form) in forms(5432) {
        let (code, stderr) = pglock(&url, &["-v", "run", &name, "--", "true"]).await;
        assert_eq!(code, 0, "{url}: {stderr}");
        let database = stderr
            .lines()
            .find(|line| line.starts_with("pglock: database: "))
            .unwrap_or_else(|| panic!("-v names the database: {stderr}"));
        assert!(
            database.contains("database test") && database.contains(form),
            "{database}"
        );
        assert!(database.contains("password given (hidden)"), "{database}");
        assert!(!stderr.contains(SECRET), "{stderr}");
    }
}

#[tokio::test]
async fn no_message_shows_the_password() {
    let name = unique("url-secret");
    // Unreachable (nothing listens on port 1): the driver's error is printed, the password never.
    for (url, _) in forms(1) {
        for verbosity in [None, Some("-v"), Some("-vv")] {
            let mut args: Vec<&str> = verbosity.into_iter().collect();
            args.extend([
                "--connect-timeout",
                "0",
                "run",
                "-w",
                "2",
                &name,
                "--",
                "true",
            ]);
            let (code, stderr) = pglock(&url, &args).await;
            assert_eq!(code, 69, "{url}: {stderr}");
            assert!(!stderr.contains(SECRET), "{url}: {stderr}");
            assert!(
                stderr.contains("***") || url.starts_with("host="),
                "shows the target with its password hidden: {stderr}"
            );
        }
    }
    // Strings that cannot be read, or name a parameter pglock cannot honour: usage errors
    // that name the parameter, never the password.
    for (url, named) in [
        (
            format!(
                "postgresql+psycopg2://root:{SECRET}@127.0.0.1:5432/test?client_encoding=latin1"
            ),
            "client_encoding",
        ),
        (
            format!("postgresql://root:{SECRET}@127.0.0.1/test?gssencmode=require"),
            "gssencmode",
        ),
        (
            format!("postgresql://root:{SECRET}@127.0.0.1/test?bogus=1"),
            "bogus",
        ),
        (
            format!("jdbc:postgresql://127.0.0.1/test?password={SECRET}&sslcert=/c.pem"),
            "sslcert",
        ),
        (format!("mysql://root:{SECRET}@127.0.0.1/test"), "mysql"),
        (format!("root:{SECRET}@127.0.0.1/test"), "neither a URL"),
        (format!("host=127.0.0.1 password='{SECRET}"), "unterminated"),
        (
            format!("postgresql://root:{SECRET}@127.0.0.1:notaport/test"),
            "port",
        ),
    ] {
        let (code, stderr) = pglock(&url, &["run", &name, "--", "true"]).await;
        assert_eq!(code, 64, "{url}: {stderr}");
        assert!(stderr.contains(named), "names {named}: {stderr}");
        assert!(!stderr.contains(SECRET), "{url}: {stderr}");
    }
}

#[tokio::test]
async fn without_a_host_the_local_socket_serves() {
    if !std::path::Path::new("/var/run/postgresql/.s.PGSQL.5432").exists() {
        eprintln!("SKIPPED: no PostgreSQL socket in /var/run/postgresql");
        return;
    }
    let name = unique("url-socket");
    for url in [
        "postgresql+psycopg2://postgres@/test",
        "postgresql://postgres@%2Fvar%2Frun%2Fpostgresql/test",
        "postgresql+psycopg2://postgres@/test?host=/var/run/postgresql",
    ] {
        let (code, stderr) = pglock(url, &["run", &name, "--", "true"]).await;
        assert_eq!(code, 0, "{url}: {stderr}");
    }
}
