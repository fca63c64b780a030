//! The crate's module graph runs one way.
//!
//! Reads every file under `src/`, collects which top-level module names
//! which other (`crate::x`, `crate::{x, y}`, `super::` climbing to the
//! root), and fails on:
//!
//! - any cycle between top-level modules (docs/design.md, "Module graph",
//!   gives the layers);
//! - a leaf module depending on anything but the leaves it is allowed;
//! - an edge the design forbids (configuration knowing the server, the
//!   service or a concrete backend; a backend knowing who serves it).
//!
//! Only `use` paths and qualified paths count; comments and doc comments
//! are skipped, so a doc link is not a dependency.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// Modules that depend on no other module of the crate but these.
const LEAVES: &[(&str, &[&str])] = &[
    ("secret", &[]),
    ("id", &["secret"]),
    ("file", &["secret"]),
    ("hardening", &[]),
    ("metrics", &[]),
    ("telemetry", &[]),
    ("envelope", &["id", "secret"]),
    ("kek", &["envelope", "id", "secret"]),
];

/// Edges that must not exist, and why.
const FORBIDDEN_EDGES: &[(&str, &str, &str)] = &[
    (
        "config",
        "server",
        "configuration is plain data the server reads",
    ),
    (
        "config",
        "service",
        "configuration is plain data the service reads",
    ),
    (
        "config",
        "ops",
        "configuration is plain data the ops listener reads",
    ),
    (
        "config",
        "cli",
        "configuration does not know the command line",
    ),
    (
        "keyring",
        "backend",
        "the keyring knows key handles, not key stores",
    ),
    (
        "keyring",
        "server",
        "the keyring does not know who serves it",
    ),
    ("backend", "server", "a backend does not know who serves it"),
    (
        "backend",
        "service",
        "a backend does not know who serves it",
    ),
    (
        "backend",
        "reload",
        "a backend does not know who reloads it",
    ),
    ("backend", "cli", "a backend does not know the command line"),
    (
        "usage",
        "keyring",
        "usage counters are per version number, not per keyring",
    ),
];

/// Paths inside `crate::backend` that only the backend registry (the
/// `backend` module itself) may name: everything else knows backends
/// through the traits and the backend-neutral types.
const CONCRETE_BACKENDS: &[&str] = &["local", "pkcs11"];

/// A backend's own admin command (one that exists only for that backend)
/// is the one file outside `src/backend/` that may name it.
const BACKEND_COMMANDS: &[(&str, &str)] = &[("src/cli/admin/upgrade_token.rs", "pkcs11")];

#[derive(Debug, Clone)]
struct Use {
    from_file: PathBuf,
    line: usize,
    path: Vec<String>,
}

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module path of a file: `src/a.rs` → `[a]`, `src/a/b.rs` → `[a, b]`,
/// `src/lib.rs` and `src/main.rs` → `[]`.
fn module_of(file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src_dir()).unwrap();
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().unwrap();
    let stem = last.trim_end_matches(".rs");
    if !matches!(stem, "lib" | "main" | "mod") {
        parts.push(stem.to_owned());
    }
    parts
}

/// The text with comments blanked out (line structure kept), and string
/// literals blanked too so a message naming `crate::x` is no edge.
fn code_only(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
            i += 2;
            while i < b.len() && !(b[i] == b'*' && b.get(i + 1) == Some(&b'/')) {
                if b[i] == b'\n' {
                    out.push('\n');
                }
                i += 1;
            }
            i += 2;
        } else if b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    i += 1;
                }
                if b.get(i) == Some(&b'\n') {
                    out.push('\n');
                }
                i += 1;
            }
            i += 1;
            out.push_str("\"\"");
        } else if b[i] == b'\'' && b.get(i + 2) == Some(&b'\'') {
            // A char literal such as '"'.
            out.push_str("' '");
            i += 3;
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

fn ident_at(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// Every path a file names from the crate root: `crate::a::b`,
/// `crate::{a::b, c}`, `super::…` climbing past the file's module.
fn uses(file: &Path) -> Vec<Use> {
    let text = code_only(&fs::read_to_string(file).unwrap());
    let module = module_of(file);
    let mut out = Vec::new();
    let line_of = |pos: usize| text[..pos].matches('\n').count() + 1;
    let mut push = |pos: usize, path: Vec<String>| {
        if !path.is_empty() && !path[0].is_empty() {
            out.push(Use {
                from_file: file.to_owned(),
                line: line_of(pos),
                path,
            });
        }
    };
    // crate::
    for (pos, _) in text.match_indices("crate::") {
        if pos > 0 {
            let before = text.as_bytes()[pos - 1];
            if before.is_ascii_alphanumeric() || before == b'_' || before == b'$' {
                continue;
            }
        }
        let rest = &text[pos + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            for item in top_level_items(group) {
                push(pos, path_of(item));
            }
        } else {
            push(pos, path_of(rest));
        }
    }
    // super:: chains that climb out of this module (a file's own module is
    // `module`; `super` of a file is its parent module).
    for (pos, _) in text.match_indices("super::") {
        if pos > 0 {
            let before = text.as_bytes()[pos - 1];
            if before.is_ascii_alphanumeric() || before == b'_' || before == b':' {
                continue;
            }
        }
        let mut rest = &text[pos..];
        let mut base = module.clone();
        while let Some(r) = rest.strip_prefix("super::") {
            base.pop();
            rest = r;
        }
        if !base.is_empty() {
            continue; // still inside a top-level module
        }
        if let Some(group) = rest.strip_prefix('{') {
            for item in top_level_items(group) {
                push(pos, path_of(item));
            }
        } else {
            push(pos, path_of(rest));
        }
    }
    out
}

/// `a::b::{c, d}` → `[a, b]`; stops at the first non-path character.
fn path_of(s: &str) -> Vec<String> {
    let mut path = Vec::new();
    let mut rest = s.trim_start();
    loop {
        let id = ident_at(rest);
        if id.is_empty() {
            break;
        }
        path.push(id.to_owned());
        rest = &rest[id.len()..];
        match rest.strip_prefix("::") {
            Some(r) => rest = r,
            None => break,
        }
    }
    path
}

/// The items of `a, b::{c, d}, e}` (the text after an opening brace), up
/// to its closing brace.
fn top_level_items(s: &str) -> Vec<&str> {
    let mut items = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => {
                items.push(&s[start..i]);
                return items;
            }
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items
}

/// Top-level module → (module it names → where).
type Graph = BTreeMap<String, BTreeMap<String, Vec<String>>>;

fn graph() -> (Graph, Vec<Use>) {
    let mut files = Vec::new();
    rust_files(&src_dir(), &mut files);
    files.sort();
    let top: BTreeSet<String> = files
        .iter()
        .filter_map(|f| module_of(f).first().cloned())
        .collect();
    let mut graph = Graph::new();
    let mut all = Vec::new();
    for file in &files {
        let Some(from) = module_of(file).first().cloned() else {
            continue; // lib.rs, main.rs: the root declares everything
        };
        graph.entry(from.clone()).or_default();
        for u in uses(file) {
            let to = &u.path[0];
            if *to != from && top.contains(to) {
                let rel = file.strip_prefix(src_dir().parent().unwrap()).unwrap();
                graph
                    .entry(from.clone())
                    .or_default()
                    .entry(to.clone())
                    .or_default()
                    .push(format!("{}:{}", rel.display(), u.line));
            }
            all.push(u);
        }
    }
    (graph, all)
}

/// The strongly connected components with more than one module.
fn cycles(graph: &Graph) -> Vec<Vec<String>> {
    // Reachability by DFS from each node; small graph.
    let reach = |start: &str| {
        let mut seen = BTreeSet::new();
        let mut stack = vec![start.to_owned()];
        while let Some(n) = stack.pop() {
            for next in graph.get(&n).map(|m| m.keys()).into_iter().flatten() {
                if seen.insert(next.clone()) {
                    stack.push(next.clone());
                }
            }
        }
        seen
    };
    let reaches: BTreeMap<&String, BTreeSet<String>> =
        graph.keys().map(|k| (k, reach(k))).collect();
    let mut done = BTreeSet::new();
    let mut out = Vec::new();
    for a in graph.keys() {
        if done.contains(a) {
            continue;
        }
        let mut comp: Vec<String> = graph
            .keys()
            .filter(|b| *b == a || (reaches[a].contains(*b) && reaches[b].contains(a)))
            .cloned()
            .collect();
        comp.sort();
        for m in &comp {
            done.insert(m.clone());
        }
        if comp.len() > 1 {
            out.push(comp);
        }
    }
    out
}

fn describe_edges(graph: &Graph, comp: &[String]) -> String {
    let mut s = String::new();
    for a in comp {
        for (b, at) in &graph[a] {
            if comp.contains(b) {
                s.push_str(&format!(
                    "    {a} -> {b} ({}{})\n",
                    at[..at.len().min(3)].join(", "),
                    if at.len() > 3 { ", …" } else { "" }
                ));
            }
        }
    }
    s
}

#[test]
fn top_level_modules_form_no_cycle() {
    let (graph, _) = graph();
    assert!(graph.len() > 10, "found too few modules: {graph:?}");
    let found = cycles(&graph);
    let report: String = found
        .iter()
        .map(|c| format!("  cycle {}:\n{}", c.join(" ⇄ "), describe_edges(&graph, c)))
        .collect();
    assert!(
        found.is_empty(),
        "the module graph must run one way; these modules depend on each other:\n{report}"
    );
}

#[test]
fn leaves_depend_only_on_their_leaves() {
    let (graph, _) = graph();
    let mut bad = Vec::new();
    for (leaf, allowed) in LEAVES {
        let Some(edges) = graph.get(*leaf) else {
            bad.push(format!("{leaf}: no such module under src/"));
            continue;
        };
        for (to, at) in edges {
            if !allowed.contains(&to.as_str()) {
                bad.push(format!("{leaf} -> {to} ({})", at.join(", ")));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "leaf modules name more than they may:\n{}",
        bad.join("\n")
    );
}

#[test]
fn forbidden_edges_are_absent() {
    let (graph, _) = graph();
    let mut bad = Vec::new();
    for (from, to, why) in FORBIDDEN_EDGES {
        if let Some(at) = graph.get(*from).and_then(|e| e.get(*to)) {
            bad.push(format!("{from} -> {to}: {why} ({})", at.join(", ")));
        }
    }
    assert!(
        bad.is_empty(),
        "forbidden dependencies:\n{}",
        bad.join("\n")
    );
}

#[test]
fn only_the_backend_module_names_a_concrete_backend() {
    let (_, uses) = graph();
    let mut bad = Vec::new();
    for u in uses {
        let in_backend = module_of(&u.from_file).first().map(String::as_str) == Some("backend");
        let rel = u
            .from_file
            .strip_prefix(src_dir().parent().unwrap())
            .unwrap();
        let own_command = BACKEND_COMMANDS.iter().any(|(file, backend)| {
            rel == Path::new(file) && u.path.get(1).map(String::as_str) == Some(*backend)
        });
        if !in_backend
            && !own_command
            && u.path.first().map(String::as_str) == Some("backend")
            && u.path
                .get(1)
                .is_some_and(|m| CONCRETE_BACKENDS.contains(&m.as_str()))
        {
            let rel = u
                .from_file
                .strip_prefix(src_dir().parent().unwrap())
                .unwrap();
            bad.push(format!(
                "{}:{}: crate::{}",
                rel.display(),
                u.line,
                u.path.join("::")
            ));
        }
    }
    assert!(
        bad.is_empty(),
        "outside src/backend, code knows backends only through the traits and the registry \
         (crate::backend::open and the backend-neutral types):\n{}",
        bad.join("\n")
    );
}

/// The parser itself: groups, nesting, comments and strings.
#[test]
fn the_path_parser_reads_groups_and_skips_comments_and_strings() {
    let text = "use crate::{a::{B, C}, d};\n// crate::e\nlet s = \"crate::f\";\nuse crate::g::H;\n";
    let code = code_only(text);
    let found: Vec<String> = code
        .match_indices("crate::")
        .flat_map(|(pos, _)| {
            let rest = &code[pos + 7..];
            match rest.strip_prefix('{') {
                Some(g) => top_level_items(g)
                    .into_iter()
                    .map(path_of)
                    .collect::<Vec<_>>(),
                None => vec![path_of(rest)],
            }
        })
        .map(|p| p.join("::"))
        .collect();
    assert_eq!(found, ["a", "d", "g::H"]);
}
