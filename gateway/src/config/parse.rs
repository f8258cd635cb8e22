//! The parsers and checks every section uses, in one place so that a value
//! means the same and is refused in the same words wherever it is written:
//! addresses, networks, durations and their bounds, paths (and resolving them
//! against the configuration file's directory), ports, bounded integers,
//! labels, keywords (enums), and lists of any of these. Also [`Check`], which
//! collects every problem with its dotted path, and the serializers that print
//! parsed values back as the file writes them.
//!
//! Sections import from here and from [`super::error`] only, never from each
//! other; [`super::model`] composes them.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use isthmus_federation::catalog::{Labels, MAX_LABEL_LEN, validate_label_name};
use isthmus_federation::{SpiffeId, TrustDomain};

use super::error::ConfigError;

/// Collects problems while fields are checked one by one.
#[derive(Default)]
pub(crate) struct Check {
    pub(super) errors: Vec<ConfigError>,
}

impl Check {
    /// Parses a required field; records an error when it is missing or invalid.
    pub(super) fn required<T, E: Display>(
        &mut self,
        path: &str,
        value: Option<&str>,
        parse: impl FnOnce(&str) -> Result<T, E>,
    ) -> Option<T> {
        match value {
            None => {
                self.fail(path, "is required");
                None
            }
            Some(v) => self.parsed(path, parse(v)),
        }
    }

    /// Parses an optional field, falling back to `default` when absent.
    pub(super) fn or_default<T, E: Display>(
        &mut self,
        path: &str,
        value: Option<&str>,
        default: &str,
        parse: impl FnOnce(&str) -> Result<T, E>,
    ) -> Option<T> {
        self.parsed(path, parse(value.unwrap_or(default)))
    }

    /// Parses an optional field whose default is a typed value (a named
    /// constant), `default` when absent.
    pub(super) fn or_value<T, E, P>(
        &mut self,
        path: &str,
        value: Option<&str>,
        default: T,
        parse: P,
    ) -> Option<T>
    where
        E: Display,
        P: FnOnce(&str) -> Result<T, E>,
    {
        match value {
            None => Some(default),
            Some(v) => self.parsed(path, parse(v)),
        }
    }

    /// Parses an optional field that has no default: `None` when absent or
    /// invalid (the error recorded).
    pub(super) fn optional<T, E, P>(
        &mut self,
        path: &str,
        value: Option<&str>,
        parse: P,
    ) -> Option<T>
    where
        E: Display,
        P: FnOnce(&str) -> Result<T, E>,
    {
        value.and_then(|v| self.parsed(path, parse(v)))
    }

    /// Records the error of `result`, if any.
    pub(super) fn parsed<T, E: Display>(&mut self, path: &str, result: Result<T, E>) -> Option<T> {
        result
            .map_err(|e| self.errors.push(ConfigError::new(path, e)))
            .ok()
    }

    /// Records a problem with the field at `path`.
    pub(super) fn fail(&mut self, path: impl Into<String>, message: impl Display) {
        self.errors.push(ConfigError::new(path, message));
    }
}

/// Parses each element of a list, recording errors as `path[i]`.
pub(super) fn list<T, E: Display>(
    check: &mut Check,
    path: &str,
    values: Option<&[String]>,
    parse: impl Fn(&str) -> Result<T, E>,
) -> Vec<T> {
    values
        .unwrap_or_default()
        .iter()
        .enumerate()
        .filter_map(|(i, v)| check.parsed(&format!("{path}[{i}]"), parse(v)))
        .collect()
}

/// Parses each element of a list like [`list`], refusing one that repeats an
/// earlier one: `<show(value)> is listed twice`.
pub(super) fn unique_list<T: PartialEq, E: Display, S: Display>(
    check: &mut Check,
    path: &str,
    values: Option<&[String]>,
    parse: impl Fn(&str) -> Result<T, E>,
    show: impl Fn(&T) -> S,
) -> Vec<T> {
    let mut out: Vec<T> = Vec::new();
    for (i, v) in values.unwrap_or_default().iter().enumerate() {
        let at = format!("{path}[{i}]");
        let Some(item) = check.parsed(&at, parse(v)) else {
            continue;
        };
        if out.contains(&item) {
            check.fail(at, format!("{} is listed twice", show(&item)));
        } else {
            out.push(item);
        }
    }
    out
}

/// An integer setting in `min..=max`, `default` when absent, as a `T`
/// (`i64`, or the count type it is held in).
pub(super) fn int<T: TryFrom<i64>>(
    check: &mut Check,
    path: &str,
    value: Option<i64>,
    default: i64,
    min: i64,
    max: i64,
) -> Option<T> {
    let n = check.parsed(path, in_range(value.unwrap_or(default), min, max))?;
    T::try_from(n).ok()
}

/// Largest endpoint or split weight.
pub(super) const MAX_WEIGHT: i64 = 10_000;

/// A weight in `min..=MAX_WEIGHT`, 1 when absent.
pub(super) fn weight(check: &mut Check, path: &str, value: Option<i64>, min: i64) -> Option<u32> {
    int(check, path, value, 1, min, MAX_WEIGHT)
}

/// `n` when it lies in `min..=max`.
pub(super) fn in_range(n: i64, min: i64, max: i64) -> Result<i64, String> {
    if (min..=max).contains(&n) {
        Ok(n)
    } else {
        Err(format!("{n} is out of range; expected {min} to {max}"))
    }
}

/// A port number, 1 to 65535.
pub(super) fn port(n: i64) -> Result<u16, String> {
    u16::try_from(n)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{n} is not a port number (1-65535)"))
}

/// `ip:port`.
pub(super) fn parse_socket_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|_| {
        format!("{s:?} is not an address such as \"127.0.0.1:15000\" or \"[::]:15000\"")
    })
}

/// A DNS server: `ip:port`, or `ip` for port 53.
pub(super) fn parse_resolver(s: &str) -> Result<SocketAddr, String> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, 53));
    }
    parse_socket_addr(s).map_err(|_| {
        format!("{s:?} is not a nameserver address such as \"10.0.0.2\" or \"127.0.0.1:5353\"")
    })
}

/// A network (`10.0.0.0/8`, `fd00::/8`) or one address (`10.1.2.3`).
pub(super) fn parse_network(s: &str) -> Result<ipnet::IpNet, String> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(ip.into());
    }
    s.parse::<ipnet::IpNet>()
        .map(|n| n.trunc())
        .map_err(|_| format!("{s:?} is not a network such as \"10.0.0.0/8\" or an address"))
}

/// A duration such as `10s` or `1m 30s`, at most `max`.
pub(super) fn parse_duration(s: &str, max: Duration) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration such as \"10s\" or \"1m 30s\" ({e})"))?;
    if d > max {
        return Err(format!(
            "{s:?} is longer than the maximum of {}",
            humantime::format_duration(max)
        ));
    }
    Ok(d)
}

/// A duration in `min..=max`.
pub(super) fn parse_duration_between(
    s: &str,
    min: Duration,
    max: Duration,
) -> Result<Duration, String> {
    let d = parse_duration(s, max)?;
    if d < min {
        return Err(format!(
            "{s:?} is shorter than the minimum of {}",
            humantime::format_duration(min)
        ));
    }
    Ok(d)
}

/// A file path; relative ones are resolved by [`resolve_path`] once the
/// configuration file's directory is known.
pub(super) fn parse_path(s: &str) -> Result<PathBuf, &'static str> {
    if s.trim().is_empty() {
        Err("must not be empty")
    } else {
        Ok(PathBuf::from(s))
    }
}

/// Makes `path` absolute, relative to `base` (the configuration file's
/// directory), so the effective configuration says exactly which file is used
/// whatever the working directory.
pub(super) fn resolve_path(base: &Path, path: &mut PathBuf) {
    if path.is_relative() {
        *path = base.join(&*path);
    }
}

/// The trust domains this gateway holds a bundle for: its own and the
/// federated ones. A SPIFFE ID of any other can never be authenticated.
pub(super) struct Bundles<'a> {
    own: Option<&'a TrustDomain>,
    federated: Vec<&'a TrustDomain>,
}

impl<'a> Bundles<'a> {
    /// `own` (absent when `[gateway]` is invalid) and the `federated` ones.
    pub(super) fn new(
        own: Option<&'a TrustDomain>,
        federated: impl IntoIterator<Item = &'a TrustDomain>,
    ) -> Self {
        Self {
            own,
            federated: federated.into_iter().collect(),
        }
    }

    /// Records an error unless there is a bundle for `td`.
    pub(super) fn require(&self, check: &mut Check, path: &str, td: &TrustDomain) {
        if Some(td) != self.own && !self.federated.contains(&td) {
            check.fail(
                path,
                format!("trust domain {td} has no bundle: add it to [[trust.federated]]"),
            );
        }
    }

    /// Records an error unless there is a bundle for `id`'s trust domain.
    pub(super) fn require_for(&self, check: &mut Check, path: &str, id: &SpiffeId) {
        self.require(check, path, &id.trust_domain());
    }
}

/// Labels (of an endpoint, a subset or the gateway), names and values checked.
pub(super) fn labels(
    check: &mut Check,
    path: &str,
    raw: Option<&BTreeMap<String, String>>,
) -> Labels {
    let mut out = Labels::new();
    for (k, v) in raw.into_iter().flatten() {
        if let Err(e) = validate_label_name(k) {
            check.fail(format!("{path}.{k}"), e);
            continue;
        }
        if v.len() > MAX_LABEL_LEN {
            check.fail(
                format!("{path}.{k}"),
                format!("the value is longer than {MAX_LABEL_LEN} bytes"),
            );
            continue;
        }
        out.insert(k.clone(), v.clone());
    }
    out
}

/// An enum written as one of a few words. `FromStr` of such an enum is
/// [`keyword`], so a bad value is refused with the accepted words listed.
pub(super) trait Keyword: Copy + 'static {
    /// What the word names, for errors: `unknown <KIND> "x"; expected ...`.
    const KIND: &'static str;
    /// Every value and how it is written.
    const WORDS: &'static [(&'static str, Self)];
    /// Added after the accepted words in errors, e.g. ` (A and AAAA)`.
    const NOTE: &'static str = "";
}

/// Parses one of `T`'s words.
pub(super) fn keyword<T: Keyword>(s: &str) -> Result<T, String> {
    if let Some((_, value)) = T::WORDS.iter().find(|(word, _)| *word == s) {
        return Ok(*value);
    }
    let words: Vec<String> = T::WORDS.iter().map(|(w, _)| format!("{w:?}")).collect();
    let expected = match words.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    };
    Err(format!(
        "unknown {} {s:?}; expected {expected}{}",
        T::KIND,
        T::NOTE
    ))
}

/// Serializes a value as its `Display` form (names, keys, ranges, localities).
pub(super) fn serialize_display<S: serde::Serializer, T: Display>(
    v: &T,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

/// Serializes a list of values as their `Display` forms.
pub(super) fn serialize_display_list<S: serde::Serializer, T: Display>(
    v: &[T],
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(ToString::to_string))
}

/// Serializes an optional value as its `Display` form.
pub(super) fn serialize_display_opt<S: serde::Serializer, T: Display>(
    v: &Option<T>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.collect_str(v),
        None => s.serialize_none(),
    }
}
