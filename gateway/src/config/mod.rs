//! Typed configuration, in two stages.
//!
//! 1. [`raw`]: the TOML file, then `ISTHMUS__SECTION__KEY` environment overrides
//!    (double underscore nests), merged by the `config` crate and deserialized into
//!    structs that deny unknown keys.
//! 2. [`model`]: every field checked and converted into typed values.
//!
//! Each section has one file holding its raw struct, its typed struct and its
//! checks ([`gateway`], [`admin`], [`log`], [`runtime`], [`shutdown`],
//! [`identity`], [`trust`], [`listeners`], [`services`], [`peers`], [`routes`],
//! [`upstream`], [`federation`], [`discovery`], [`dns`], [`limits`], [`tracing`]). The
//! parsers and checks they share (addresses, durations and their bounds, paths,
//! ports, counts, networks, labels, keywords) are in `parse`; sections import
//! from it and never from each other, except [`discovery`], whose entries are
//! `[[services]]` entries checked by [`services`]'s rules. [`model`] composes
//! them and runs the checks that span sections.
//!
//! Both stages collect every problem before failing: an unknown key or a value of
//! the wrong type is recorded with its path, removed, and deserialization goes on,
//! so one run of `isthmus check-config` lists everything that needs fixing.
//!
//! The configuration never holds secret values: private keys are referred to by
//! file path only, so the effective configuration can be printed and served on
//! `/debug/config` as it is.

pub mod admin;
pub mod discovery;
pub mod dns;
mod error;
pub mod federation;
pub mod gateway;
pub mod identity;
pub mod limits;
pub mod listeners;
pub mod log;
pub mod model;
mod parse;
pub mod peers;
pub mod raw;
pub mod routes;
pub mod runtime;
pub mod services;
pub mod shutdown;
pub mod tracing;
pub mod trust;
pub mod upstream;

/// Where routes and endpoints were before `[[routes]]` and `[[services]]` had
/// files of their own; kept so callers' paths stay valid.
pub mod traffic {
    pub use super::routes::{HeaderMatch, HeaderValueMatch, RouteConfig, RouteRule, SplitTarget};
    pub use super::services::EndpointConfig;
}

use std::collections::HashMap;
use std::path::Path;

use config::{Environment, File, FileFormat, Value, ValueKind};

pub use error::{ConfigError, ConfigErrors};
pub use model::Config;
use raw::RawConfig;

/// Prefix of environment overrides: `ISTHMUS__ADMIN__LISTEN=127.0.0.1:9000`.
pub const ENV_PREFIX: &str = "ISTHMUS";
/// Separator between the prefix, sections and keys in environment overrides.
pub const ENV_SEPARATOR: &str = "__";

/// Upper bound on structural errors reported for one file, so that a file of
/// garbage does not produce an endless list.
const MAX_STRUCTURAL_ERRORS: usize = 100;

/// Loads `path` with overrides from the process environment.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    load_with_env(path, std::env::vars())
}

/// Loads `path` with overrides from `env` (name, value) pairs; only names starting
/// with `ISTHMUS__` are used. Tests pass their own environment here.
pub fn load_with_env(
    path: &Path,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::new(path.display().to_string(), format!("cannot be read: {e}"))
    })?;
    let mut config = parse_with_env(&text, &path.display().to_string(), env)?;
    let base = path
        .canonicalize()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_default();
    config.resolve_paths(&base);
    Ok(config)
}

/// Parses configuration `text` (named `origin` in errors) with environment overrides.
pub fn parse_with_env(
    text: &str,
    origin: &str,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Config, ConfigErrors> {
    let prefix = format!("{ENV_PREFIX}{ENV_SEPARATOR}");
    let env: HashMap<String, String> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(&prefix))
        .collect();
    let merged = config::Config::builder()
        .add_source(File::from_str(text, FileFormat::Toml))
        .add_source(
            Environment::with_prefix(ENV_PREFIX)
                .prefix_separator(ENV_SEPARATOR)
                .separator(ENV_SEPARATOR)
                .source(Some(env)),
        )
        .build()
        .and_then(|c| c.try_deserialize::<Value>())
        .map_err(|e| ConfigError::new(origin, format!("is not valid TOML: {}", one_line(&e))))?;

    let (raw, mut errors) = deserialize_collecting(merged);
    match Config::from_raw(&raw) {
        Ok(config) if errors.is_empty() => Ok(config),
        Ok(_) => Err(ConfigErrors(errors)),
        Err(ConfigErrors(semantic)) => {
            // A field removed for a structural error (or one inside a removed
            // table) would also be reported as "is required"; the first error says more.
            let semantic: Vec<_> = semantic
                .into_iter()
                .filter(|s| !errors.iter().any(|e| is_within(&s.path, &e.path)))
                .collect();
            errors.extend(semantic);
            Err(ConfigErrors(errors))
        }
    }
}

/// Deserializes `tree`, and on each error records it with its path, removes the
/// offending key and tries again, so every unknown key and mistyped value is found.
fn deserialize_collecting(mut tree: Value) -> (RawConfig, Vec<ConfigError>) {
    let mut errors = Vec::new();
    while errors.len() < MAX_STRUCTURAL_ERRORS {
        match serde_path_to_error::deserialize::<_, RawConfig>(tree.clone()) {
            Ok(raw) => return (raw, errors),
            Err(e) => {
                let path = e.path().to_string();
                let path = if path == "." { String::new() } else { path };
                errors.push(ConfigError::new(&path, describe(e.inner())));
                if path.is_empty() || !remove_path(&mut tree, &path) {
                    break;
                }
            }
        }
    }
    (RawConfig::default(), errors)
}

/// True when `path` is `ancestor` or lies inside it.
fn is_within(path: &str, ancestor: &str) -> bool {
    path.strip_prefix(ancestor)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
}

/// A parser error on one line: the location and the reason, without the source
/// excerpt the TOML parser draws under it.
fn one_line(e: &config::ConfigError) -> String {
    e.to_string()
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty()
                && !l.starts_with('|')
                && !l.chars().next().is_some_and(|c| c.is_ascii_digit())
        })
        .collect::<Vec<_>>()
        .join(": ")
}

/// Rewrites serde's wording into what a person editing the file needs: no Rust
/// type names, and no "for key" suffix since the path already leads the line.
fn describe(e: &config::ConfigError) -> String {
    let full = e.to_string();
    let msg = full.split(" for key `").next().unwrap_or(&full);
    if let Some(idx) = msg.find("expected struct Raw") {
        return format!("{}expected a table", &msg[..idx]);
    }
    if let Some(rest) = msg.strip_prefix("unknown field `") {
        let name = rest.split('`').next().unwrap_or_default();
        let expected = rest
            .split_once("expected ")
            .map(|(_, x)| x)
            .unwrap_or_default();
        return format!("unknown key {name:?}; expected {expected}");
    }
    msg.to_owned()
}

/// Removes the value at `path` (dotted keys, `[i]` for array elements, as
/// serde_path_to_error writes them) from `tree`; false if it is not there.
fn remove_path(tree: &mut Value, path: &str) -> bool {
    let steps: Vec<Step<'_>> = path.split('.').flat_map(Step::parse).collect();
    let Some((last, parents)) = steps.split_last() else {
        return false;
    };
    let mut node = tree;
    for step in parents {
        let child = match (step, &mut node.kind) {
            (Step::Key(k), ValueKind::Table(t)) => t.get_mut(*k),
            (Step::Index(i), ValueKind::Array(a)) => a.get_mut(*i),
            _ => None,
        };
        match child {
            Some(c) => node = c,
            None => return false,
        }
    }
    match (last, &mut node.kind) {
        (Step::Key(k), ValueKind::Table(t)) => t.remove(*k).is_some(),
        (Step::Index(i), ValueKind::Array(a)) if *i < a.len() => {
            a.remove(*i);
            true
        }
        _ => false,
    }
}

/// One step of a path: a table key or an array index.
enum Step<'a> {
    Key(&'a str),
    Index(usize),
}

impl<'a> Step<'a> {
    /// `federated[2]` → `Key("federated"), Index(2)`.
    fn parse(segment: &'a str) -> Vec<Self> {
        let mut parts = segment.split('[');
        let mut steps = Vec::new();
        if let Some(key) = parts.next().filter(|k| !k.is_empty()) {
            steps.push(Step::Key(key));
        }
        for index in parts {
            if let Ok(i) = index.trim_end_matches(']').parse() {
                steps.push(Step::Index(i));
            }
        }
        steps
    }
}

/// Gateway `gw` of cluster `east`, the least a configuration needs, then
/// `extra`: for other modules' tests.
#[cfg(test)]
pub(crate) fn test_config(extra: &str) -> Config {
    parse_with_env(
        &format!(
            "[gateway]\nname = \"gw\"\ncluster = \"east\"\ntrust_domain = \"east.example.org\"\n[gateway.locality]\nregion = \"r\"\n{extra}"
        ),
        "t.toml",
        std::iter::empty(),
    )
    .unwrap()
}

#[cfg(test)]
mod tests;
