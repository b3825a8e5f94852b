//! The fenced code blocks of the docs, and the marks that say which are recipes.
//!
//! A block is marked by an HTML comment on the line before its fence, invisible on the
//! rendered page:
//!
//! - `<!-- recipe -->`: a recipe, run by the test of its language (`sh`: `shell.rs`, `cron`:
//!   `cron.rs`, `python`: `python.rs`);
//! - `<!-- file: PATH -->`: a copy of the file `PATH` (from the repository's root), which must
//!   be equal to it byte for byte; the file's own tests run it;
//! - `<!-- excerpt: PATH -->`: lines of the file `PATH`, which must all be in it, in order
//!   (comment lines of the block, which say what was left out, excepted).
//!
//! Every block a user would copy to run (see [`copyable`]) must carry one of them.

use std::path::{Path, PathBuf};

/// The documents whose blocks are checked: README.md, docs/*.md and the examples' READMEs.
pub fn documents() -> Vec<PathBuf> {
    let root = root();
    let mut documents = vec![root.join("README.md")];
    for dir in ["docs", "examples"] {
        let mut found: Vec<PathBuf> = walk(&root.join(dir))
            .into_iter()
            .filter(|path| path.extension().is_some_and(|e| e == "md"))
            .filter(|path| dir == "docs" || path.file_name().is_some_and(|n| n == "README.md"))
            .collect();
        found.sort();
        documents.extend(found);
    }
    documents
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

/// The repository's root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// How a block is marked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mark {
    Recipe,
    File(String),
    Excerpt(String),
}

/// One fenced code block.
#[derive(Clone, Debug)]
pub struct Block {
    /// The document, relative to the repository's root, and the line of the opening fence.
    pub place: String,
    pub lang: String,
    pub mark: Option<Mark>,
    /// The block's lines, without the fences' indentation, each ending in a newline.
    pub text: String,
}

impl Block {
    /// The lines of the block.
    pub fn lines(&self) -> impl Iterator<Item = &str> {
        self.text.lines()
    }
}

/// Every fenced block of `document`.
pub fn blocks_of(document: &Path) -> Vec<Block> {
    let text =
        std::fs::read_to_string(document).unwrap_or_else(|e| panic!("{}: {e}", document.display()));
    let name = document
        .strip_prefix(root())
        .unwrap_or(document)
        .display()
        .to_string();
    let mut blocks = Vec::new();
    let mut lines = text.lines().enumerate();
    let mut previous: Option<&str> = None;
    while let Some((number, line)) = lines.next() {
        let trimmed = line.trim_start();
        let Some(lang) = trimmed.strip_prefix("```") else {
            if !line.trim().is_empty() {
                previous = Some(line.trim());
            }
            continue;
        };
        let indent = line.len() - trimmed.len();
        let mut body = String::new();
        for (_, inner) in lines.by_ref() {
            if inner.trim_start().starts_with("```") {
                break;
            }
            body.push_str(inner.get(indent..).unwrap_or(inner.trim_start()));
            body.push('\n');
        }
        blocks.push(Block {
            place: format!("{name}:{}", number + 1),
            lang: lang.trim().to_ascii_lowercase(),
            mark: previous.and_then(mark),
            text: body,
        });
        previous = None;
    }
    blocks
}

fn mark(line: &str) -> Option<Mark> {
    let inner = line.strip_prefix("<!--")?.strip_suffix("-->")?.trim();
    if inner == "recipe" {
        return Some(Mark::Recipe);
    }
    if let Some(path) = inner.strip_prefix("file:") {
        return Some(Mark::File(path.trim().to_owned()));
    }
    inner
        .strip_prefix("excerpt:")
        .map(|path| Mark::Excerpt(path.trim().to_owned()))
}

/// Every block of every document.
pub fn all_blocks() -> Vec<Block> {
    documents().iter().flat_map(|d| blocks_of(d)).collect()
}

/// The recipes in `lang`, in document order.
pub fn recipes(lang: &str) -> Vec<Block> {
    all_blocks()
        .into_iter()
        .filter(|b| b.mark == Some(Mark::Recipe) && b.lang == lang)
        .collect()
}

/// The programs whose invocation makes a shell block something to copy and run.
const RUN: [&str; 8] = [
    "pglock",
    "alembic",
    "celery",
    "uvicorn",
    "gunicorn",
    "python",
    "python3",
    "migrate-then",
];

/// Whether a user would copy `block` to run it: Python, crontab, compose and Dockerfile blocks
/// always; shell blocks that run one of [`RUN`] (not, say, `cargo install pglock`).
pub fn copyable(block: &Block) -> bool {
    match block.lang.as_str() {
        "python" | "py" | "cron" | "crontab" | "yaml" | "yml" | "dockerfile" => true,
        "sh" | "bash" | "shell" | "console" => block.lines().any(runs_a_tool),
        _ => false,
    }
}

/// Whether a shell line runs one of [`RUN`] as a command (first word, or after `&&`, `||`,
/// `;`, `|`, `exec`, `--`, or variable assignments).
fn runs_a_tool(line: &str) -> bool {
    let code = line
        .split(" #")
        .next()
        .unwrap_or("")
        .replace(';', " ; ")
        .replace('|', " | ");
    let mut command_position = true;
    for word in code.split_whitespace() {
        if word.starts_with('#') && command_position {
            return false;
        }
        let at_command = command_position;
        command_position = matches!(word, "&&" | "&" | ";" | "|" | "exec" | "--" | "then" | "do")
            || (at_command && word.contains('=') && !word.starts_with('-'));
        if at_command && RUN.contains(&word.trim_start_matches("./")) {
            return true;
        }
    }
    false
}

#[test]
fn every_copyable_snippet_is_a_checked_recipe() {
    let mut problems = Vec::new();
    let mut counted = [0usize; 3];
    for block in all_blocks() {
        match (&block.mark, copyable(&block)) {
            (None, true) => problems.push(format!(
                "{}: a `{}` block to copy has no mark (<!-- recipe -->, <!-- file: PATH -->, \
                 <!-- excerpt: PATH -->): add one, and a test for it",
                block.place, block.lang
            )),
            (Some(Mark::Recipe), _) => {
                counted[0] += 1;
                if !matches!(block.lang.as_str(), "sh" | "cron" | "python") {
                    problems.push(format!(
                        "{}: no test runs `{}` recipes",
                        block.place, block.lang
                    ));
                }
            }
            (Some(Mark::File(path)), _) => {
                counted[1] += 1;
                match std::fs::read_to_string(root().join(path)) {
                    Ok(file) if file == block.text => {}
                    Ok(file) => problems.push(format!(
                        "{}: differs from {path}: {}",
                        block.place,
                        first_difference(&block.text, &file)
                    )),
                    Err(error) => problems.push(format!("{}: {path}: {error}", block.place)),
                }
            }
            (Some(Mark::Excerpt(path)), _) => {
                counted[2] += 1;
                match std::fs::read_to_string(root().join(path)) {
                    Ok(file) => {
                        let mut rest = file.lines();
                        for line in block.lines() {
                            let line = line.trim_end();
                            if line.is_empty() || line.trim_start().starts_with('#') {
                                continue;
                            }
                            if !rest.any(|l| l.trim_end() == line) {
                                problems.push(format!(
                                    "{}: `{line}` is not in {path} (in this order)",
                                    block.place
                                ));
                                break;
                            }
                        }
                    }
                    Err(error) => problems.push(format!("{}: {path}: {error}", block.place)),
                }
            }
            (None, false) => {}
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    eprintln!(
        "{} recipes, {} copies of files, {} excerpts in {} documents",
        counted[0],
        counted[1],
        counted[2],
        documents().len()
    );
    assert!(counted.iter().all(|n| *n > 0), "{counted:?}");
}

fn first_difference(doc: &str, file: &str) -> String {
    for (number, (a, b)) in doc.lines().zip(file.lines()).enumerate() {
        if a != b {
            return format!("line {}: the doc has {a:?}, the file {b:?}", number + 1);
        }
    }
    format!(
        "the doc has {} lines, the file {}",
        doc.lines().count(),
        file.lines().count()
    )
}

#[test]
fn marks_and_commands_are_recognised() {
    assert!(runs_a_tool("pglock run x -- true"));
    assert!(runs_a_tool("export A=b; pglock status"));
    assert!(runs_a_tool("FOO=1 alembic upgrade head"));
    assert!(runs_a_tool("cd /srv && exec uvicorn a:b"));
    assert!(!runs_a_tool("cargo install pglock"));
    assert!(!runs_a_tool("# pglock run x"));
    assert!(!runs_a_tool("cargo run -p migrate-demo -- --instances 6"));
    assert_eq!(mark("<!-- recipe -->"), Some(Mark::Recipe));
    assert_eq!(mark("<!-- file: a/b -->"), Some(Mark::File("a/b".into())));
    assert_eq!(mark("<!-- other -->"), None);
}
