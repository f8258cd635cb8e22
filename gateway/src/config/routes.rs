//! `[[routes]]`: header matches and weighted splits over a service's subsets
//! and clusters.

use std::collections::BTreeMap;
use std::str::FromStr;

use isthmus_federation::names::validate_label;
use isthmus_federation::{ClusterName, ServiceKey};
use serde::{Deserialize, Serialize};

use super::parse::{Check, serialize_display, weight};

/// `[[routes]]` as written.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    /// `routes[].service`
    pub service: Option<String>,
    /// `[[routes.rules]]`
    pub rules: Option<Vec<RawRouteRule>>,
}

/// `[[routes.rules]]`
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRouteRule {
    /// `routes[].rules[].headers`
    pub headers: Option<Vec<RawHeaderMatch>>,
    /// `routes[].rules[].split`
    pub split: Option<Vec<RawSplit>>,
}

/// `routes[].rules[].headers[]`
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawHeaderMatch {
    /// `routes[].rules[].headers[].name`
    pub name: Option<String>,
    /// `routes[].rules[].headers[].exact`
    pub exact: Option<String>,
    /// `routes[].rules[].headers[].prefix`
    pub prefix: Option<String>,
    /// `routes[].rules[].headers[].present`
    pub present: Option<bool>,
}

/// `routes[].rules[].split[]`
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawSplit {
    /// `routes[].rules[].split[].subset`
    pub subset: Option<String>,
    /// `routes[].rules[].split[].cluster`
    pub cluster: Option<String>,
    /// `routes[].rules[].split[].weight`
    pub weight: Option<i64>,
}

/// One service's routes: the first rule whose headers match decides.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RouteConfig {
    /// The service routed, written `namespace/name`.
    #[serde(serialize_with = "serialize_display")]
    pub service: ServiceKey,
    /// Its rules, in order.
    pub rules: Vec<RouteRule>,
}

/// One rule: requests whose headers all match are split over `split`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RouteRule {
    /// Every one must match; none: every request matches.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatch>,
    /// Where matching requests go, by weight.
    pub split: Vec<SplitTarget>,
}

/// A condition on one request header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HeaderMatch {
    /// The header's name, lowercase.
    pub name: String,
    /// What its value must be.
    #[serde(flatten)]
    pub value: HeaderValueMatch,
}

/// How a header's value must look.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HeaderValueMatch {
    /// Exactly this.
    Exact(String),
    /// Starting with this.
    Prefix(String),
    /// Present (`true`) or absent (`false`), whatever its value.
    Present(bool),
}

impl HeaderMatch {
    /// Whether a request whose header has `value` (`None`: absent) matches.
    pub fn matches(&self, value: Option<&[u8]>) -> bool {
        match (&self.value, value) {
            (HeaderValueMatch::Present(want), v) => *want == v.is_some(),
            (HeaderValueMatch::Exact(want), Some(v)) => v == want.as_bytes(),
            (HeaderValueMatch::Prefix(want), Some(v)) => v.starts_with(want.as_bytes()),
            (_, None) => false,
        }
    }
}

/// One weighted destination of a split: a subset, a cluster, both, or
/// (neither) the whole service. Should nothing in it be available, its
/// requests go wherever the service is served: a traffic shift is a
/// preference, never a reason to fail a request (a dead cluster or canary
/// costs nothing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SplitTarget {
    /// Only endpoints of this subset (in any cluster that has it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
    /// Only this cluster.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterName>,
    /// Its share relative to the rule's other destinations.
    pub weight: u32,
}

/// `[[routes]]`. `local_subsets` are the subsets each locally defined service
/// has; a split naming another subset of such a service is a mistake (a
/// service served only by peers may name any: the peers define its subsets).
pub(super) fn routes(
    check: &mut Check,
    raw: Option<&[RawRoute]>,
    local_subsets: &BTreeMap<ServiceKey, Vec<String>>,
) -> Vec<RouteConfig> {
    let mut out: Vec<RouteConfig> = Vec::new();
    for (i, r) in raw.unwrap_or_default().iter().enumerate() {
        let at = |field: &str| format!("routes[{i}].{field}");
        let service = check.required(&at("service"), r.service.as_deref(), |s| {
            ServiceKey::from_str(s).map_err(|e| e.to_string())
        });
        let raw_rules = r.rules.as_deref().unwrap_or_default();
        if raw_rules.is_empty() {
            check.fail(at("rules"), "needs at least one rule");
        }
        let mut rules = Vec::new();
        let mut catch_all: Option<usize> = None;
        for (j, rule) in raw_rules.iter().enumerate() {
            let rule_at = |field: &str| format!("routes[{i}].rules[{j}].{field}");
            if let Some(k) = catch_all {
                check.fail(
                    rule_at("headers"),
                    format!("is never reached: rules[{k}] matches every request"),
                );
            }
            let headers: Vec<HeaderMatch> = rule
                .headers
                .as_deref()
                .unwrap_or_default()
                .iter()
                .enumerate()
                .filter_map(|(h, m)| header_match(check, &rule_at(&format!("headers[{h}]")), m))
                .collect();
            if rule.headers.as_deref().unwrap_or_default().is_empty() {
                catch_all.get_or_insert(j);
            }
            let split = split(
                check,
                &rule_at("split"),
                rule.split.as_deref(),
                service.as_ref().and_then(|s| local_subsets.get(s)),
            );
            rules.push(RouteRule { headers, split });
        }
        let Some(service) = service else { continue };
        if out.iter().any(|o| o.service == service) {
            check.fail(
                at("service"),
                format!("{service} has routes already; put every rule in one [[routes]]"),
            );
            continue;
        }
        out.push(RouteConfig { service, rules });
    }
    out
}

fn header_match(check: &mut Check, path: &str, raw: &RawHeaderMatch) -> Option<HeaderMatch> {
    let name = check.required(&format!("{path}.name"), raw.name.as_deref(), |n| {
        http::HeaderName::from_str(n)
            .map(|h| h.as_str().to_owned())
            .map_err(|_| format!("{n:?} is not a header name"))
    });
    let value = match (&raw.exact, &raw.prefix, raw.present) {
        (Some(v), None, None) => Some(HeaderValueMatch::Exact(v.clone())),
        (None, Some(v), None) => Some(HeaderValueMatch::Prefix(v.clone())),
        (None, None, Some(p)) => Some(HeaderValueMatch::Present(p)),
        _ => {
            check.fail(path, "needs exactly one of exact, prefix or present");
            None
        }
    };
    Some(HeaderMatch {
        name: name?,
        value: value?,
    })
}

fn split(
    check: &mut Check,
    path: &str,
    raw: Option<&[RawSplit]>,
    local_subsets: Option<&Vec<String>>,
) -> Vec<SplitTarget> {
    let raw = raw.unwrap_or_default();
    if raw.is_empty() {
        check.fail(
            path,
            "needs at least one destination { subset, cluster, weight }",
        );
    }
    let mut out: Vec<SplitTarget> = Vec::new();
    for (k, s) in raw.iter().enumerate() {
        let at = |field: &str| format!("{path}[{k}].{field}");
        let subset = s.subset.as_deref().and_then(|n| {
            let known = local_subsets.is_none_or(|l| l.iter().any(|x| x == n));
            check.parsed(
                &at("subset"),
                validate_label(n).map_err(|e| e.to_string()).and_then(|()| {
                    if known {
                        Ok(n.to_owned())
                    } else {
                        Err(format!("{n:?} is not one of this service's subsets"))
                    }
                }),
            )
        });
        let cluster = s
            .cluster
            .as_deref()
            .and_then(|c| check.parsed(&at("cluster"), ClusterName::from_str(c)));
        // 0 is allowed: it drains a destination without deleting it.
        let weight = weight(check, &at("weight"), s.weight, 0);
        if (s.subset.is_some() && subset.is_none()) || (s.cluster.is_some() && cluster.is_none()) {
            continue;
        }
        if let Some(weight) = weight {
            out.push(SplitTarget {
                subset,
                cluster,
                weight,
            });
        }
    }
    if !out.is_empty() && out.iter().all(|t| t.weight == 0) {
        check.fail(
            path,
            "every weight is 0: at least one destination must get traffic",
        );
    }
    out
}
