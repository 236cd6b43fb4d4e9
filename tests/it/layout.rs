//! The shape of `src/` (README "Code map"): dependencies between the top-level modules
//! point one way, and only the command line knows clap.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src/ is readable") {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file without comments and without its `#[cfg(test)]` module (tests may
/// reach anywhere).
fn code(text: &str) -> String {
    let text = text.split("#[cfg(test)]\nmod tests").next().unwrap_or(text);
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Top-level module of a file under `src/`: `src/store/gate.rs` -> `store`.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("under src/");
    let first = rel.components().next().expect("non-empty path");
    first
        .as_os_str()
        .to_string_lossy()
        .trim_end_matches(".rs")
        .to_string()
}

/// Top-level modules named after each `crate::` in `code`.
fn uses(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // `use crate::{a::b, c};`
            let group = &group[..group.find('}').unwrap_or(group.len())];
            for item in group.split(',') {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    out.insert(name);
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            out.insert(name);
        }
    }
    out
}

#[test]
fn modules_depend_one_way_and_only_the_command_line_knows_clap() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut clap_users = BTreeSet::new();
    for file in &files {
        let module = module_of(&src, file);
        let text = code(&std::fs::read_to_string(file).expect("source is readable"));
        if text.contains("clap::") || text.contains("use clap") {
            clap_users.insert(module.clone());
        }
        if module == "lib" || module == "main" {
            continue;
        }
        let deps = uses(&text);
        edges
            .entry(module.clone())
            .or_default()
            .extend(deps.into_iter().filter(|d| *d != module));
    }
    assert_eq!(
        clap_users,
        BTreeSet::from(["cli".to_string(), "main".to_string()]),
        "only src/cli/ and src/main.rs may use clap"
    );
    // A dependency A -> B is part of a cycle when A is reachable from B.
    let reachable = |from: &str| {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.to_string()];
        while let Some(m) = todo.pop() {
            for d in edges.get(&m).into_iter().flatten() {
                if seen.insert(d.clone()) {
                    todo.push(d.clone());
                }
            }
        }
        seen
    };
    let cycles: Vec<String> = edges
        .iter()
        .flat_map(|(a, deps)| deps.iter().map(move |b| (a, b)))
        .filter(|(a, b)| reachable(b).contains(*a))
        .map(|(a, b)| format!("{a} -> {b}"))
        .collect();
    assert!(
        cycles.is_empty(),
        "import cycles among src/ modules: {cycles:?}\ngraph: {edges:#?}"
    );
    // The layers of the code map, bottom up: nothing reaches up.
    for (low, high) in [
        ("store", "consume"),
        ("store", "app"),
        ("kafka", "consume"),
        ("model", "store"),
        ("settings", "store"),
        ("consume", "app"),
        ("sink", "app"),
    ] {
        assert!(
            !reachable(low).contains(high),
            "{low} reaches up to {high}: {edges:#?}"
        );
    }
}
