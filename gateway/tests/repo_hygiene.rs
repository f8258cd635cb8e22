//! The repository stands on its own: no tracked file points at documents that
//! live outside it, and every relative link in the README and `docs/` leads to
//! a file that exists.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test reports failure

use std::path::{Path, PathBuf};
use std::process::Command;

/// Names of documents that are not in this repository. Spelt in pieces so that
/// this file does not name them itself.
const OUTSIDE: &[&str] = &[
    concat!("DESIGN", ".md"),
    concat!("CONVENTIONS", ".md"),
    concat!("PINGORA", "-NOTES"),
    concat!("PERF", "-NOTES"),
    concat!("PACKAGING", "-NOTES"),
    concat!("../", "shared"),
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The tracked files (`git ls-files`), or, outside a git checkout, every file
/// under the root except build output and dot-directories.
fn tracked_files() -> Vec<PathBuf> {
    let root = root();
    let git = Command::new("git")
        .args(["ls-files", "-z"])
        .current_dir(&root)
        .output();
    if let Ok(out) = git
        && out.status.success()
    {
        return out
            .stdout
            .split(|b| *b == 0)
            .filter(|p| !p.is_empty())
            .map(|p| root.join(String::from_utf8_lossy(p).as_ref()))
            .collect();
    }
    let mut files = Vec::new();
    let mut dirs = vec![root];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') || name == "target" {
                continue;
            }
            if entry.file_type().unwrap().is_dir() {
                dirs.push(entry.path());
            } else {
                files.push(entry.path());
            }
        }
    }
    files
}

#[test]
fn no_file_refers_to_documents_outside_the_repository() {
    let mut found = Vec::new();
    for file in tracked_files() {
        // Binary files (seeds, recorded responses) are not read as text.
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        for (n, line) in text.lines().enumerate() {
            for name in OUTSIDE {
                if line.contains(name) {
                    let shown = file.strip_prefix(root()).unwrap_or(&file);
                    found.push(format!("{}:{}: {name}", shown.display(), n + 1));
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "files name documents that are not in the repository (cite docs/ or say the reason):\n  {}",
        found.join("\n  ")
    );
}

/// The targets of the inline links `[text](target)` in `markdown`.
fn link_targets(markdown: &str) -> Vec<String> {
    let mut targets = Vec::new();
    let mut rest = markdown;
    while let Some(at) = rest.find("](") {
        rest = &rest[at + 2..];
        if let Some(end) = rest.find(')') {
            targets.push(rest[..end].trim().to_owned());
            rest = &rest[end..];
        }
    }
    targets
}

/// GitHub's anchors for the headings of `markdown`: lowercased, punctuation
/// dropped, spaces as hyphens, `-1`, `-2`... for repeats.
fn anchors(markdown: &str) -> Vec<String> {
    let mut seen: Vec<String> = Vec::new();
    let mut in_code = false;
    for line in markdown.lines() {
        if line.starts_with("```") {
            in_code = !in_code;
        }
        if in_code || !line.starts_with('#') {
            continue;
        }
        let title = line.trim_start_matches('#').trim();
        let slug: String = title
            .to_lowercase()
            .chars()
            .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
            .map(|c| if c == ' ' { '-' } else { c })
            .collect();
        let repeats = seen
            .iter()
            .filter(|s| **s == slug || s.starts_with(&format!("{slug}-")))
            .count();
        let anchor = if repeats == 0 {
            slug
        } else {
            format!("{slug}-{repeats}")
        };
        seen.push(anchor);
    }
    seen
}

#[test]
fn relative_markdown_links_lead_to_existing_files() {
    let root = root();
    let mut pages = vec![root.join("README.md")];
    let mut dirs = vec![root.join("docs")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "md") {
                pages.push(path);
            }
        }
    }
    assert!(pages.len() > 5, "{pages:?}");
    let mut broken = Vec::new();
    for page in &pages {
        let text = std::fs::read_to_string(page).unwrap();
        for target in link_targets(&text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (path, fragment) = match target.split_once('#') {
                Some((path, fragment)) => (path, Some(fragment)),
                None => (target.as_str(), None),
            };
            let resolved = if path.is_empty() {
                page.clone()
            } else {
                page.parent().unwrap().join(path)
            };
            let shown = page.strip_prefix(&root).unwrap_or(page);
            if !resolved.exists() {
                broken.push(format!("{}: ({target})", shown.display()));
                continue;
            }
            // A heading anchor in a markdown file must exist too.
            if let Some(fragment) = fragment
                && resolved.extension().is_some_and(|e| e == "md")
            {
                let linked = std::fs::read_to_string(&resolved).unwrap();
                if !anchors(&linked).iter().any(|a| a == fragment) {
                    broken.push(format!("{}: ({target}): no such heading", shown.display()));
                }
            }
        }
    }
    assert!(
        broken.is_empty(),
        "links to files or headings that do not exist:\n  {}",
        broken.join("\n  ")
    );
}

#[test]
fn link_targets_are_found() {
    let md = "see [a](docs/a.md) and [b](b.md#x), [web](https://x.org) `[c](c)`";
    assert_eq!(
        link_targets(md),
        ["docs/a.md", "b.md#x", "https://x.org", "c"]
    );
}

#[test]
fn anchors_follow_github() {
    let md = "# Title\n## `[[services]]`\n```\n# not a heading\n```\n## Reload, stop, upgrade\n## Logs\n### Logs\n";
    assert_eq!(
        anchors(md),
        ["title", "services", "reload-stop-upgrade", "logs", "logs-1"]
    );
}
