//! No circles between the top-level modules of `gateway/src`.
//!
//! A circle (`a` uses `b`, `b` uses `a`, perhaps through others) means neither
//! module can be read, tested or moved without the other. This test reads every
//! file under `gateway/src`, maps it to its top-level module (`proxy/tcp.rs` is
//! `proxy`, `cli.rs` is `cli`), collects the modules it names through `crate::`
//! paths (in `use` lines, `use crate::{a, b::c}` groups and paths in code; not
//! in comments or strings), prints the graph and fails on every circle, each
//! reported with its path and where each step is made.
//!
//! Run it with `cargo nextest run -p isthmus-gateway --test module_graph
//! --no-capture` to see the graph.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Where a module names another: the first place found, for the report.
type Graph = BTreeMap<String, BTreeMap<String, String>>;

#[test]
fn top_level_modules_form_no_circle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = module_graph(&src);
    println!("{}", render(&graph));

    let circles = circles(&graph);
    let report: Vec<String> = circles
        .iter()
        .map(|circle| {
            let steps: Vec<String> = circle
                .windows(2)
                .map(|w| format!("    {} -> {} ({})", w[0], w[1], graph[&w[0]][&w[1]]))
                .collect();
            format!("  {}\n{}", circle.join(" -> "), steps.join("\n"))
        })
        .collect();
    assert!(
        circles.is_empty(),
        "{} circle(s) between gateway's top-level modules:\n{}",
        circles.len(),
        report.join("\n")
    );
}

/// The graph of `src`: each top-level module and the modules it names, with
/// the first place it does so.
fn module_graph(src: &Path) -> Graph {
    let mut graph = Graph::new();
    for file in rust_files(src) {
        let relative = file.strip_prefix(src).expect("under src");
        let Some(module) = top_level_module(relative) else {
            continue;
        };
        let text = std::fs::read_to_string(&file).expect("readable source");
        let deps = graph.entry(module.clone()).or_default();
        for (line, target) in crate_references(&code_only(&text)) {
            if target != module {
                deps.entry(target)
                    .or_insert_with(|| format!("{}:{line}", relative.display()));
            }
        }
    }
    graph
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("readable directory")
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files
}

/// `proxy/tcp.rs` and `proxy/mod.rs` are `proxy`, `cli.rs` is `cli`; the crate
/// roots (`lib.rs`, and `main.rs`, a crate of its own) are no module.
fn top_level_module(relative: &Path) -> Option<String> {
    let first = relative.components().next()?.as_os_str().to_str()?;
    match first {
        "lib.rs" | "main.rs" => None,
        _ => Some(first.strip_suffix(".rs").unwrap_or(first).to_owned()),
    }
}

/// `text` with comments, string and character literals blanked out (newlines
/// kept, so line numbers hold).
fn code_only(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let blank = |c: char| if c == '\n' { '\n' } else { ' ' };
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            loop {
                if i >= chars.len() {
                    break;
                }
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(chars[i]));
                    i += 1;
                }
            }
        } else if c == 'r'
            && (next == Some('"') || next == Some('#'))
            && !chars
                .get(i.wrapping_sub(1))
                .is_some_and(|p| p.is_alphanumeric() || *p == '_')
            && raw_string_hashes(&chars[i + 1..]).is_some()
        {
            // r"..." or r#"..."#: no escapes, ends at a quote and as many #.
            let hashes = raw_string_hashes(&chars[i + 1..]).unwrap_or(0);
            let start = i;
            i += 2 + hashes;
            while i < chars.len() {
                if chars[i] == '"' && chars[i + 1..].iter().take(hashes).all(|&h| h == '#') {
                    i += 1 + hashes;
                    break;
                }
                i += 1;
            }
            out.extend(chars[start..i.min(chars.len())].iter().map(|&c| blank(c)));
        } else if c == '"' {
            out.push(' ');
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                let skip = if chars[i] == '\\' { 2 } else { 1 };
                for _ in 0..skip {
                    if let Some(&c) = chars.get(i) {
                        out.push(blank(c));
                    }
                    i += 1;
                }
            }
            out.push(' ');
            i += 1;
        } else if c == '\'' {
            // A character literal ('x', '\n', '\u{..}') or a lifetime ('a).
            let end = if next == Some('\\') {
                chars
                    .get(i + 3..)
                    .and_then(|rest| rest.iter().position(|&c| c == '\''))
                    .map(|p| i + 3 + p)
            } else if chars.get(i + 2) == Some(&'\'') {
                Some(i + 2)
            } else {
                None
            };
            match end {
                Some(end) => {
                    out.extend(std::iter::repeat_n(' ', end + 1 - i));
                    i = end + 1;
                }
                None => {
                    out.push(c);
                    i += 1;
                }
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

/// After an `r`: the number of `#` before the opening quote of a raw string.
fn raw_string_hashes(rest: &[char]) -> Option<usize> {
    let hashes = rest.iter().take_while(|&&c| c == '#').count();
    (rest.get(hashes) == Some(&'"')).then_some(hashes)
}

/// Every top-level module named by a `crate::` path in `code`, with its line:
/// `crate::a::b`, `crate::a`, and each item of `crate::{a, b::c, d::{e, f}}`.
fn crate_references(code: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    let bytes = code.as_bytes();
    let mut from = 0;
    while let Some(pos) = code[from..].find("crate") {
        let start = from + pos;
        from = start + "crate".len();
        let before = start.checked_sub(1).map(|p| bytes[p]);
        if before.is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'$') {
            continue;
        }
        let rest = code[from..].trim_start();
        let Some(rest) = rest.strip_prefix("::") else {
            continue;
        };
        let line = code[..start].matches('\n').count() + 1;
        let rest = rest.trim_start();
        if let Some(group) = rest.strip_prefix('{') {
            for item in group_items(group) {
                if let Some(name) = leading_ident(item) {
                    found.push((line, name.to_owned()));
                }
            }
        } else if let Some(name) = leading_ident(rest) {
            found.push((line, name.to_owned()));
        }
    }
    found.retain(|(_, name)| name != "self" && name != "super");
    found
}

/// The comma-separated items of a `{...}` group whose opening brace is already
/// consumed, up to its closing brace.
fn group_items(group: &str) -> Vec<&str> {
    let mut items = Vec::new();
    let (mut depth, mut start) = (0usize, 0);
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => {
                items.push(&group[start..i]);
                return items;
            }
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&group[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items
}

fn leading_ident(text: &str) -> Option<&str> {
    let text = text.trim_start();
    let end = text
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(text.len());
    (end > 0).then(|| &text[..end])
}

/// Every elementary circle of `graph`, each as its path from its smallest
/// module back to it (`[a, b, a]`).
fn circles(graph: &Graph) -> Vec<Vec<String>> {
    let nodes: Vec<&String> = graph.keys().collect();
    let mut found = Vec::new();
    for (i, start) in nodes.iter().enumerate() {
        // Only circles whose smallest module is `start`: each found once.
        let allowed: BTreeSet<&str> = nodes[i..].iter().map(|n| n.as_str()).collect();
        let mut path = vec![start.to_string()];
        walk(graph, start, &allowed, &mut path, &mut found);
    }
    found
}

fn walk(
    graph: &Graph,
    start: &str,
    allowed: &BTreeSet<&str>,
    path: &mut Vec<String>,
    found: &mut Vec<Vec<String>>,
) {
    let last = path.last().expect("non-empty path").clone();
    let Some(deps) = graph.get(&last) else { return };
    for next in deps.keys() {
        if next == start {
            let mut circle = path.clone();
            circle.push(start.to_owned());
            found.push(circle);
        } else if allowed.contains(next.as_str()) && !path.contains(next) {
            path.push(next.clone());
            walk(graph, start, allowed, path, found);
            path.pop();
        }
    }
}

fn render(graph: &Graph) -> String {
    let width = graph.keys().map(String::len).max().unwrap_or(0);
    let mut text = String::from("gateway/src module graph (module -> modules it uses):\n");
    for (module, deps) in graph {
        let deps: Vec<&str> = deps.keys().map(String::as_str).collect();
        text.push_str(&format!("  {module:<width$} -> {}\n", deps.join(", ")));
    }
    text
}

#[test]
fn references_are_read_from_code_only() {
    let code = code_only(
        "use crate::{a, b::c, d::{e, f}};\n\
         // crate::comment\n\
         /* crate::block /* nested */ crate::still */\n\
         let s = \"crate::string\"; let r = r#\"crate::raw\"#;\n\
         let c = '\"'; let q = '\\''; fn f<'a>(x: &'a crate::g::T) { crate::h::call(); }\n\
         pub(crate) fn x() { $crate::macro_path(); my_crate::not(); }",
    );
    let names: Vec<(usize, String)> = crate_references(&code);
    let names: Vec<String> = names
        .into_iter()
        .map(|(line, n)| format!("{line}:{n}"))
        .collect();
    assert_eq!(names, ["1:a", "1:b", "1:d", "5:g", "5:h"]);
}

#[test]
fn every_circle_is_found_once() {
    let mut graph = Graph::new();
    for (from, to) in [("a", "b"), ("b", "a"), ("b", "c"), ("c", "a"), ("c", "d")] {
        graph
            .entry(from.into())
            .or_default()
            .insert(to.into(), String::new());
    }
    graph.entry("d".into()).or_default();
    assert_eq!(
        circles(&graph),
        [vec!["a", "b", "a"], vec!["a", "b", "c", "a"]]
    );
}
