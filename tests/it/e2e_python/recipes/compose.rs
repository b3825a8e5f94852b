//! The shop's `docker-compose.yml` and `Dockerfile`, checked as far as a machine without a
//! container engine can:
//!
//! - the compose file parses (PyYAML, with its `<<` merges; `${VAR:?message}` interpolated), its
//!   database is the PostgreSQL major version the tests run, its database health check asks
//!   over TCP and passes here, and `app`, `worker` and `beat` each have a restart policy, a
//!   health check and an init;
//! - the Dockerfile's `COPY` sources exist (in the shop, and in the build context `pglock`, which
//!   the compose file points at this repository), what its first stage copies is enough for
//!   Cargo to load pglock's workspace, both stages are of one Debian release, and the shop's
//!   `requirements.txt` pins what the tests' venv pins;
//! - then the services run outside containers: each service's `command`, as many replicas as
//!   `deploy.replicas` says, all started together, with the service's `environment`, except the
//!   addresses (`DATABASE_URL`: the test database; `CELERY_BROKER_URL`: the test's Redis;
//!   `UVICORN_PORT`: a free port per replica, as each container has its own) and `/tmp` (a
//!   directory per replica, in `TMPDIR` and in the command's arguments). Every replica's health
//!   check `test` must pass, the migrations run once, an order posted to an app is confirmed by
//!   the worker, one beat leads; SIGTERM to each replica's process (`docker stop`) ends it with
//!   the status docs/python.md gives, and nothing is left: no process, no lock.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::super::database::FreshDatabase;
use super::super::process::{alive, Process};
use super::docs::root;
use super::{
    advisory_locks, alembic_version, assert_gone, assert_no_advisory_locks, example, free_port,
    prerequisites, same_form, wait_for_line, Redis, Shop, HEAD, RUN_BOUND, START_BOUND, STOP_BOUND,
};
use crate::harness::{database_url, TestDb};

/// The compose file, parsed by PyYAML (the venv's), with `${...}` interpolated.
pub fn compose(shop: &Shop) -> Value {
    let mut command = std::process::Command::new(shop.path(".venv/bin/python"));
    command
        .arg("-c")
        .arg("import json, sys, yaml; json.dump(yaml.safe_load(open(sys.argv[1])), sys.stdout)")
        .arg(example().join("docker-compose.yml"));
    let output = command.output().expect("run python");
    assert!(
        output.status.success(),
        "docker-compose.yml does not parse: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut value: Value = serde_json::from_slice(&output.stdout).unwrap();
    interpolate(&mut value);
    value
}

/// Compose's interpolation of `${NAME}`, `${NAME:-default}`, `${NAME:?message}` and `$$`, with
/// a password for `SHOP_DB_PASSWORD` (the only variable the file uses; the test's own
/// `DATABASE_URL` replaces the URL that holds it).
fn interpolate(value: &mut Value) {
    match value {
        Value::String(text) => {
            let mut out = String::new();
            let mut rest = text.as_str();
            while let Some(at) = rest.find('$') {
                out.push_str(&rest[..at]);
                rest = &rest[at..];
                if let Some(after) = rest.strip_prefix("$$") {
                    out.push('$');
                    rest = after;
                    continue;
                }
                let end = rest.find('}').expect("a closed ${...}");
                let expression = &rest[2..end];
                let name = expression.split(':').next().unwrap();
                assert_eq!(name, "SHOP_DB_PASSWORD", "an unknown variable in {text}");
                out.push_str("secret");
                rest = &rest[end + 1..];
            }
            out.push_str(rest);
            *text = out;
        }
        Value::Array(items) => items.iter_mut().for_each(interpolate),
        Value::Object(map) => map.values_mut().for_each(interpolate),
        _ => {}
    }
}

/// One service of the compose file, as the test runs it.
pub struct Service {
    pub name: String,
    pub command: Vec<String>,
    pub environment: Vec<(String, String)>,
    pub replicas: usize,
    pub healthcheck: Vec<String>,
}

impl Service {
    pub fn of(compose: &Value, name: &str) -> Service {
        let service = &compose["services"][name];
        assert!(service.is_object(), "no service {name}");
        let strings = |value: &Value| -> Vec<String> {
            value
                .as_array()
                .unwrap_or_else(|| panic!("{name}: {value} is not a list (exec form)"))
                .iter()
                .map(|v| v.as_str().expect("a string").to_owned())
                .collect()
        };
        let environment = service["environment"]
            .as_object()
            .map(|map| {
                map.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().expect("a string value").to_owned()))
                    .collect()
            })
            .unwrap_or_default();
        Service {
            name: name.to_owned(),
            command: strings(&service["command"]),
            environment,
            replicas: service["deploy"]["replicas"].as_u64().unwrap_or(1) as usize,
            healthcheck: strings(&service["healthcheck"]["test"]),
        }
    }

    /// The environment of replica `tmp` (its own `/tmp`), with the test's addresses.
    fn environment(
        &self,
        database: &FreshDatabase,
        redis: Option<&Redis>,
        tmp: &Path,
    ) -> Vec<(String, String)> {
        let mut environment: Vec<(String, String)> = self
            .environment
            .iter()
            .map(|(name, value)| {
                let value = match name.as_str() {
                    "DATABASE_URL" => same_form(database, value),
                    "CELERY_BROKER_URL" => redis.map_or(value.clone(), Redis::url),
                    "UVICORN_PORT" => free_port().to_string(),
                    _ => value.clone(),
                };
                (name.clone(), value)
            })
            .collect();
        environment.push(("TMPDIR".into(), tmp.display().to_string()));
        environment
    }

    /// Replica `index`'s command: the service's `command`, run in the shop with its
    /// environment.
    pub fn replica(
        &self,
        shop: &Shop,
        database: &FreshDatabase,
        redis: Option<&Redis>,
        index: usize,
    ) -> Replica {
        let tmp = shop.path(&format!("tmp/{}-{index}", self.name));
        std::fs::create_dir_all(&tmp).unwrap();
        let environment = self.environment(database, redis, &tmp);
        let url = &environment
            .iter()
            .find(|(n, _)| n == "DATABASE_URL")
            .unwrap()
            .1;
        let mut command = shop.command(&self.command[0], url);
        command.args(self.command[1..].iter().map(|arg| own_tmp(arg, &tmp)));
        command.envs(environment.iter().map(|(n, v)| (n, v)));
        Replica {
            process: Process::spawn(format!("{} #{index}", self.name), command),
            environment,
        }
    }
}

/// `/tmp/...` in an argument is the replica's own `/tmp`.
fn own_tmp(arg: &str, tmp: &Path) -> String {
    match arg.strip_prefix("/tmp/") {
        Some(rest) => tmp.join(rest).display().to_string(),
        None => arg.to_owned(),
    }
}

/// A running replica.
pub struct Replica {
    pub process: Process,
    environment: Vec<(String, String)>,
}

impl Replica {
    fn variable(&self, name: &str) -> &str {
        &self.environment.iter().find(|(n, _)| n == name).unwrap().1
    }

    /// Runs the health check `test` (`CMD` or `CMD-SHELL`) as Docker would in this replica's
    /// container: its environment, its working directory. Whether it passed, and its output.
    async fn check(&self, shop: &Shop, test: &[String]) -> (bool, String) {
        let mut command = match test[0].as_str() {
            "CMD" => {
                let mut command = shop.command(&test[1], self.variable("DATABASE_URL"));
                command.args(&test[2..]);
                command
            }
            "CMD-SHELL" => shop.sh(&test[1], self.variable("DATABASE_URL")),
            other => panic!("a health check of kind {other}"),
        };
        command.envs(self.environment.iter().map(|(n, v)| (n, v)));
        let mut check = Process::spawn(format!("health check {test:?}"), command);
        let status = check.exit(RUN_BOUND).await;
        (status.success(), check.output())
    }
}

#[tokio::test]
async fn compose_file_and_dockerfile_hold_together() {
    let Some((venv, _)) = prerequisites(false).await else {
        return;
    };
    let shop = Shop::new(venv, "compose-file");
    let compose = compose(&shop);

    // PostgreSQL: the version the tests run, and a health check that asks over TCP.
    let db = &compose["services"]["db"];
    let image = db["image"].as_str().unwrap();
    let client = crate::harness::connect(&database_url()).await;
    let version: String = client
        .query_one("SHOW server_version_num", &[])
        .await
        .unwrap()
        .get(0);
    let major = version.parse::<u32>().unwrap() / 10000;
    assert_eq!(
        image,
        format!("postgres:{major}"),
        "the tests run PostgreSQL {major}"
    );
    let test: Vec<&str> = db["healthcheck"]["test"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(&test[..2], ["CMD", "pg_isready"]);
    assert!(
        test.windows(2).any(|w| w == ["--host", "127.0.0.1"]),
        "over TCP: {test:?}"
    );
    let server: tokio_postgres::Config = database_url().parse().unwrap();
    let port = server.get_ports().first().copied().unwrap_or(5432);
    let ready = std::process::Command::new(test[1])
        .args(&test[2..])
        .env("PGPORT", port.to_string())
        .output()
        .expect("run pg_isready");
    assert!(ready.status.success(), "{test:?}: {ready:?}");

    for name in ["app", "worker", "beat"] {
        let service = &compose["services"][name];
        assert_eq!(service["restart"], "unless-stopped", "{name}");
        assert_eq!(service["init"], true, "{name}");
        assert!(service["healthcheck"]["test"].is_array(), "{name}");
        assert_eq!(
            service["depends_on"]["db"]["condition"], "service_healthy",
            "{name}"
        );
        let context = service["build"]["additional_contexts"]["pglock"]
            .as_str()
            .unwrap_or_else(|| panic!("{name}: no build context pglock"));
        assert_eq!(
            example().join(context).canonicalize().unwrap(),
            root().canonicalize().unwrap(),
            "{name}: the context pglock is this repository"
        );
    }

    // The Dockerfile: its sources exist; its first stage's copy loads as a Cargo workspace;
    // both stages on one Debian release.
    let dockerfile = std::fs::read_to_string(example().join("Dockerfile")).unwrap();
    let scratch = super::super::Scratch::new("dockerfile");
    let stage_src = scratch.path("src");
    let mut releases = Vec::new();
    for line in dockerfile.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.first() {
            Some(&"FROM") => releases.push(words[1].rsplit('-').next().unwrap().to_owned()),
            Some(&"COPY") => {
                let (from, paths) = match words[1].strip_prefix("--from=") {
                    Some(from) => (Some(from), &words[2..]),
                    None => (None, &words[1..]),
                };
                let (sources, destination) = paths.split_at(paths.len() - 1);
                for source in sources {
                    match from {
                        Some("pglock") => {
                            let source_path = root().join(source);
                            assert!(source_path.exists(), "{line}: {source} is not in pglock");
                            // Relative to the stage's WORKDIR; a file into a directory
                            // keeps its name, a directory's contents go to the destination.
                            let destination = destination[0];
                            let target = if destination.ends_with('/') || destination == "." {
                                stage_src
                                    .join(destination)
                                    .join(Path::new(source).file_name().unwrap())
                            } else {
                                stage_src.join(destination)
                            };
                            copy_source(&source_path, &target);
                        }
                        Some(_) => {}
                        None => assert!(
                            example().join(source).exists(),
                            "{line}: {source} is not in the shop"
                        ),
                    }
                }
            }
            _ => {}
        }
    }
    assert_eq!(releases.len(), 2, "{dockerfile}");
    assert_eq!(releases[0], releases[1], "one Debian release: {releases:?}");
    let metadata = std::process::Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .arg("--manifest-path")
        .arg(stage_src.join("Cargo.toml"))
        .output()
        .expect("run cargo metadata");
    assert!(
        metadata.status.success(),
        "the Dockerfile's first stage copies too little for Cargo: {}",
        String::from_utf8_lossy(&metadata.stderr)
    );

    // The image installs the versions the tests run.
    let pinned = pins(&root().join(".ci/python-requirements.txt"));
    for pin in pins(&example().join("requirements.txt")) {
        assert!(
            pinned.contains(&pin),
            "requirements.txt pins {pin}, the tests' venv does not"
        );
    }
}

/// `name==version` lines, names normalised, extras dropped.
fn pins(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| {
            let (name, version) = line.split_once("==").expect("pinned");
            let name = name
                .split('[')
                .next()
                .unwrap()
                .to_ascii_lowercase()
                .replace('_', "-");
            format!("{name}=={version}")
        })
        .collect()
}

/// Copies a file or a directory tree (without `target/`) to `to`.
fn copy_source(from: &Path, to: &Path) {
    if from.is_dir() {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            if entry.file_name() == "target" {
                continue;
            }
            copy_source(&entry.path(), &to.join(entry.file_name()));
        }
    } else {
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(from, to).unwrap();
    }
}

#[tokio::test]
async fn compose_services_run_outside_containers() {
    let Some((venv, Some(redis))) = prerequisites(true).await else {
        return;
    };
    let shop = Shop::new(venv, "compose");
    let compose = compose(&shop);
    let database = FreshDatabase::create("recipes_compose").await;
    let db = TestDb::on_server(&database.url("postgresql"), "recipes_compose").await;
    let services: Vec<Service> = ["app", "worker", "beat"]
        .iter()
        .map(|name| Service::of(&compose, name))
        .collect();

    // `docker compose up`: every replica starts at once.
    let started = Instant::now();
    let mut replicas: Vec<(usize, Replica)> = Vec::new();
    for (which, service) in services.iter().enumerate() {
        for index in 0..service.replicas {
            replicas.push((
                which,
                service.replica(&shop, &database, Some(&redis), index),
            ));
        }
    }
    assert_eq!(
        replicas.len(),
        5,
        "two apps, a worker, two beats as docs/python.md says"
    );

    // Every replica becomes healthy, as its health check says. The check runs once the
    // replica says it has started (each check is a Python process: polling before that would
    // only slow the start-up down).
    let checks = replicas.iter().map(|(which, replica)| {
        let (shop, service) = (&shop, &services[*which]);
        async move {
            let started_line = match service.name.as_str() {
                "app" => "Application startup complete",
                "worker" => " ready.",
                _ => "pglock: ",
            };
            wait_for_line(&replica.process, started_line, START_BOUND).await;
            let deadline = Instant::now() + START_BOUND;
            loop {
                let (healthy, output) = replica.check(shop, &service.healthcheck).await;
                if healthy {
                    break;
                }
                assert!(
                    Instant::now() < deadline && alive(replica.process.pid()),
                    "{} never healthy: {output}\n{:?}",
                    replica.process.label,
                    replica.process
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            eprintln!(
                "{} healthy {:?} after the start",
                replica.process.label,
                started.elapsed()
            );
        }
    });
    futures_util::future::join_all(checks).await;
    eprintln!(
        "all replicas healthy {:?} after they started",
        started.elapsed()
    );

    // The replicas that migrate did so once; one beat leads.
    let migrated: Vec<&str> = replicas
        .iter()
        .filter(|(_, r)| !r.process.lines_with("Running upgrade  -> 0001").is_empty())
        .map(|(_, r)| r.process.label.as_str())
        .collect();
    assert_eq!(migrated.len(), 1, "migrated by {migrated:?}");
    assert_eq!(alembic_version(&db).await.as_deref(), Some(HEAD));
    let beats: Vec<&Replica> = replicas
        .iter()
        .filter(|(which, _)| services[*which].name == "beat")
        .map(|(_, r)| r)
        .collect();
    // One leads (it says so once its term is recorded, just after `pglock status` shows the
    // lock held), the other stands by.
    let deadline = Instant::now() + START_BOUND;
    let leading: Vec<bool> = loop {
        let leading: Vec<bool> = beats
            .iter()
            .map(|r| !r.process.lines_with("pglock: leading beat").is_empty())
            .collect();
        if leading.contains(&true) || Instant::now() > deadline {
            break leading;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        leading.iter().filter(|l| **l).count(),
        1,
        "{:?}",
        beats.iter().map(|b| &b.process).collect::<Vec<_>>()
    );
    // The leader's beat is past its start-up (its SIGTERM handler installed) before the stop.
    for (beat, leads) in beats.iter().zip(&leading) {
        if *leads {
            wait_for_line(&beat.process, "beat: Starting", START_BOUND).await;
        }
    }

    // An order posted to an app is confirmed by the worker, through Redis.
    let app = &replicas
        .iter()
        .find(|(w, _)| services[*w].name == "app")
        .unwrap()
        .1;
    let port: u16 = app.variable("UVICORN_PORT").parse().unwrap();
    let response = post(port, "/orders", r#"{"item": "socks"}"#).await;
    assert!(response.starts_with("HTTP/1.1 201"), "{response}");
    let deadline = Instant::now() + START_BOUND;
    loop {
        let confirmed: i64 = db
            .admin()
            .query_one("SELECT count(confirmed_at) FROM orders", &[])
            .await
            .unwrap()
            .get(0);
        if confirmed == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the order was never confirmed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // `docker stop`: SIGTERM to each replica's process; the standing-by beat first, so that
    // it cannot take over from the leader as it steps down.
    let (standbys, others): (Vec<_>, Vec<_>) = replicas.into_iter().partition(|(w, r)| {
        services[*w].name == "beat" && r.process.lines_with("pglock: leading beat").is_empty()
    });
    for group in [standbys, others] {
        let mut stopping = Vec::new();
        for (which, replica) in group {
            let tree = replica.process.tree();
            replica.process.signal("TERM");
            stopping.push((which, replica, tree));
        }
        for (which, mut replica, tree) in stopping {
            let status = super::exit_code(replica.process.exit(STOP_BOUND).await);
            let expected = match services[which].name.as_str() {
                // uvicorn re-raises SIGTERM once it has shut down.
                "app" => 143,
                "worker" => 0,
                // The leader exits with its beat's status; a standby with 128 + 15.
                _ if replica
                    .process
                    .lines_with("pglock: leading beat")
                    .is_empty() =>
                {
                    143
                }
                _ => 0,
            };
            assert_eq!(
                status, expected,
                "{}: {:?}",
                replica.process.label, replica.process
            );
            assert_gone(&tree, STOP_BOUND).await;
        }
    }
    assert_eq!(advisory_locks(&db).await, 0);
    assert_no_advisory_locks(&db).await;
    db.assert_no_locks().await;
    drop(db);
    database.drop_now().await;
}

/// `POST path` with a JSON body to 127.0.0.1:`port`; the whole response.
async fn post(port: u16, path: &str, body: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the app");
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(RUN_BOUND, stream.read_to_string(&mut response))
        .await
        .expect("the app answers")
        .unwrap();
    response
}
