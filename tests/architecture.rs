//! The module structure ARCHITECTURE.md describes: no import circle between pgnear's top-level
//! modules (a module's own files may use each other), and the leaves use nothing of pgnear's
//! but other leaves. Read from the source, so that a new `use` that closes a circle fails here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Modules that everything may use and that use only each other.
const LEAVES: &[&str] = &["error", "lsn", "region", "role", "shutdown"];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level modules each module's files name through `crate::` (test modules aside).
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let rel = file.strip_prefix(&src).expect("under src");
        let first = rel.components().next().expect("a path");
        let module = first
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        if module == "lib" || module == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("a source file");
        let text = text.split("#[cfg(test)]").next().unwrap_or_default();
        let uses = graph.entry(module.clone()).or_default();
        for (at, _) in text.match_indices("crate::") {
            let rest = &text[at + "crate::".len()..];
            let names: Vec<&str> = match rest.strip_prefix('{') {
                Some(group) => group
                    .split('}')
                    .next()
                    .unwrap_or_default()
                    .split(',')
                    .filter_map(|p| p.trim().split("::").next())
                    .collect(),
                None => rest.split("::").next().into_iter().collect(),
            };
            for name in names {
                let name: String = name
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() && name != module && name.chars().all(|c| !c.is_uppercase()) {
                    uses.insert(name);
                }
            }
        }
    }
    graph
}

#[test]
fn no_import_circle_between_modules() {
    let graph = imports();
    assert!(graph.contains_key("session") && graph.contains_key("backend"));
    // Depth-first search; a module met again while still on the path closes a circle.
    fn visit<'a>(
        m: &'a str,
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) {
        if let Some(at) = path.iter().position(|p| *p == m) {
            panic!("import circle: {} -> {m}", path[at..].join(" -> "));
        }
        if !done.insert(m) {
            return;
        }
        path.push(m);
        for next in graph.get(m).into_iter().flatten() {
            visit(next, graph, path, done);
        }
        path.pop();
    }
    let mut done = BTreeSet::new();
    for m in graph.keys() {
        visit(m, &graph, &mut Vec::new(), &mut done);
    }
}

#[test]
fn leaves_use_only_leaves() {
    let graph = imports();
    for leaf in LEAVES {
        let uses = graph
            .get(*leaf)
            .unwrap_or_else(|| panic!("no module {leaf}"));
        let others: Vec<&String> = uses
            .iter()
            .filter(|u| !LEAVES.contains(&u.as_str()))
            .collect();
        assert!(others.is_empty(), "leaf {leaf} uses {others:?}");
    }
    // Metrics use only leaves and the pure router's Reason.
    let metrics = &graph["metrics"];
    assert!(
        metrics
            .iter()
            .all(|u| LEAVES.contains(&u.as_str()) || u == "router"),
        "metrics uses {metrics:?}"
    );
    assert!(
        graph["router"].iter().all(|u| LEAVES.contains(&u.as_str())),
        "router uses {:?}",
        graph["router"]
    );
}
