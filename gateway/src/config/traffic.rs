//! Traffic shaping: endpoint labels, locality and weights, service subsets, and
//! `[[routes]]` (header matches and weighted splits over subsets and clusters).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use std::str::FromStr;

use isthmus_federation::catalog::{
    EndpointInfo, Labels, MAX_LABEL_LEN, Subset, validate_label_name,
};
use isthmus_federation::names::validate_label;
use isthmus_federation::{ClusterName, Locality, ServiceKey};
use serde::Serialize;

use super::error::ConfigError;
use super::model::{Check, parse_socket_addr};
use super::raw::{RawEndpoint, RawHeaderMatch, RawRoute, RawSplit, RawSubset};

/// Largest endpoint or split weight.
const MAX_WEIGHT: i64 = 10_000;

/// One service's routes: the first rule whose headers match decides.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RouteConfig {
    /// The service routed, written `namespace/name`.
    #[serde(serialize_with = "super::model::serialize_display")]
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

/// `services[].endpoints[]`: an address, with its locality, labels and weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointConfig {
    /// Where it listens.
    pub address: SocketAddr,
    /// The rest (defaults when given as a plain address).
    pub info: EndpointInfo,
}

/// As it was written: `"ip:port"` when it has nothing else, a table otherwise
/// (so the effective configuration parses back).
impl Serialize for EndpointConfig {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        if self.info == EndpointInfo::default() {
            return s.collect_str(&self.address);
        }
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("address", &self.address.to_string())?;
        if let Some(l) = &self.info.locality {
            map.serialize_entry("locality", &l.to_string())?;
        }
        if !self.info.labels.is_empty() {
            map.serialize_entry("labels", &self.info.labels)?;
        }
        map.serialize_entry("weight", &self.info.weight)?;
        map.end()
    }
}

/// `services[].endpoints`
pub(super) fn endpoints(
    check: &mut Check,
    path: &str,
    raw: Option<&[RawEndpoint]>,
) -> Vec<EndpointConfig> {
    let mut out: Vec<EndpointConfig> = Vec::new();
    for (i, e) in raw.unwrap_or_default().iter().enumerate() {
        let at = |field: &str| format!("{path}[{i}]{field}");
        let (address, table) = match e {
            RawEndpoint::Address(a) => (check.parsed(&at(""), parse_socket_addr(a)), None),
            RawEndpoint::Table(t) => (
                check.required(&at(".address"), t.address.as_deref(), parse_socket_addr),
                Some(t),
            ),
        };
        let details = table.and_then(|t| {
            let locality = t.locality.as_deref().and_then(|l| {
                check.parsed(
                    &at(".locality"),
                    Locality::from_str(l).map_err(|e| e.to_string()),
                )
            });
            let labels = labels(check, &at(".labels"), t.labels.as_ref());
            let weight = weight(check, &at(".weight"), t.weight, 1);
            Some(EndpointInfo {
                locality,
                labels,
                weight: weight?,
            })
        });
        let Some(address) = address else { continue };
        if out.iter().any(|e| e.address == address) {
            check.errors.push(ConfigError::new(
                at(""),
                format!("{address} is listed twice"),
            ));
            continue;
        }
        if table.is_some() && details.is_none() {
            continue;
        }
        out.push(EndpointConfig {
            address,
            info: details.unwrap_or_default(),
        });
    }
    out
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
            check
                .errors
                .push(ConfigError::new(format!("{path}.{k}"), e));
            continue;
        }
        if v.len() > MAX_LABEL_LEN {
            check.errors.push(ConfigError::new(
                format!("{path}.{k}"),
                format!("the value is longer than {MAX_LABEL_LEN} bytes"),
            ));
            continue;
        }
        out.insert(k.clone(), v.clone());
    }
    out
}

fn weight(check: &mut Check, path: &str, raw: Option<i64>, min: i64) -> Option<u32> {
    let w = raw.unwrap_or(1);
    if (min..=MAX_WEIGHT).contains(&w) {
        u32::try_from(w).ok()
    } else {
        check.errors.push(ConfigError::new(
            path,
            format!("{w} is out of range; expected {min} to {MAX_WEIGHT}"),
        ));
        None
    }
}

/// `services[].subsets`
pub(super) fn subsets(check: &mut Check, path: &str, raw: Option<&[RawSubset]>) -> Vec<Subset> {
    let mut out: Vec<Subset> = Vec::new();
    for (i, s) in raw.unwrap_or_default().iter().enumerate() {
        let at = |field: &str| format!("{path}[{i}].{field}");
        let name = check.required(&at("name"), s.name.as_deref(), |n| {
            validate_label(n).map(|()| n.to_owned())
        });
        let labels = labels(check, &at("labels"), s.labels.as_ref());
        if labels.is_empty() {
            check.errors.push(ConfigError::new(
                at("labels"),
                "is required: the labels an endpoint must have to be in the subset",
            ));
            continue;
        }
        let Some(name) = name else { continue };
        if out.iter().any(|o| o.name == name) {
            check.errors.push(ConfigError::new(
                at("name"),
                format!("{name:?} is listed twice"),
            ));
            continue;
        }
        out.push(Subset { name, labels });
    }
    out
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
            check
                .errors
                .push(ConfigError::new(at("rules"), "needs at least one rule"));
        }
        let mut rules = Vec::new();
        let mut catch_all: Option<usize> = None;
        for (j, rule) in raw_rules.iter().enumerate() {
            let rule_at = |field: &str| format!("routes[{i}].rules[{j}].{field}");
            if let Some(k) = catch_all {
                check.errors.push(ConfigError::new(
                    rule_at("headers"),
                    format!("is never reached: rules[{k}] matches every request"),
                ));
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
            check.errors.push(ConfigError::new(
                at("service"),
                format!("{service} has routes already; put every rule in one [[routes]]"),
            ));
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
            check.errors.push(ConfigError::new(
                path,
                "needs exactly one of exact, prefix or present",
            ));
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
        check.errors.push(ConfigError::new(
            path,
            "needs at least one destination { subset, cluster, weight }",
        ));
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
        check.errors.push(ConfigError::new(
            path,
            "every weight is 0: at least one destination must get traffic",
        ));
    }
    out
}
