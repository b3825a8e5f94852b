//! Every `python` recipe of the docs, run as a script by the venv's Python, as written; one
//! that defines a key function (`def pglock_key...` or `def pglock_semaphore_space...`,
//! docs/keys.md) must also give the Rust library's key (or semaphore key space) for every name
//! tried, empty and non-ASCII included.

use super::docs::recipes;
use super::prerequisites;
use pglock::AdvisoryKey;

/// Names whose keys the Python key functions must give as `AdvisoryKey::from_name` does.
const NAMES: [&str; 8] = [
    "",
    "migrations",
    "beat",
    "leader:beat",
    "nightly-report",
    "café/ünïcode",
    "日本語のロック",
    "with\\backslash and \"quotes\"",
];

#[tokio::test]
async fn python_recipes_run_as_written() {
    let Some((venv, _)) = prerequisites(false).await else {
        return;
    };
    let blocks = recipes("python");
    assert!(!blocks.is_empty());
    for block in blocks {
        let function = block.lines().find_map(|line| {
            let name = line.strip_prefix("def ")?.split('(').next()?;
            (name.starts_with("pglock_key") || name.starts_with("pglock_semaphore_space"))
                .then(|| name.to_owned())
        });
        let mut script = block.text.clone();
        if let Some(function) = &function {
            script.push_str(&format!(
                "\nimport json, sys\nprint(json.dumps([{function}(n) for n in json.loads(sys.argv[1])]))\n"
            ));
        }
        let output = venv
            .command(venv.dir().join("bin/python"))
            .arg("-c")
            .arg(&script)
            .arg(serde_json::to_string(&NAMES).unwrap())
            .output()
            .await
            .expect("run python");
        assert!(
            output.status.success(),
            "{}: {}",
            block.place,
            String::from_utf8_lossy(&output.stderr)
        );
        if let Some(function) = &function {
            let keys: Vec<i64> = serde_json::from_slice(&output.stdout).unwrap();
            for (name, key) in NAMES.iter().zip(keys) {
                if function.starts_with("pglock_semaphore_space") {
                    assert_eq!(
                        key,
                        i64::from(AdvisoryKey::semaphore_space(name)),
                        "{}: {name:?}",
                        block.place
                    );
                } else {
                    assert_eq!(
                        AdvisoryKey::Single(key),
                        AdvisoryKey::from_name(name),
                        "{}: {name:?}",
                        block.place
                    );
                }
            }
        }
    }
}
