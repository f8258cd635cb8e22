//! `[trust]`: who may connect to this gateway, the foreign trust domains whose
//! bundles it holds (`[[trust.federated]]`), and its own SPIFFE bundle endpoint.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use isthmus_federation::{SpiffeId, TrustDomain};
use serde::{Deserialize, Serialize};

use super::parse::{
    Check, Keyword, keyword, list, parse_duration_between, parse_path, parse_socket_addr,
    resolve_path,
};

/// Default interval between fetches of a federated bundle without a refresh hint
/// (SPIFFE Trust Domain and Bundle §6.2 suggests five minutes).
pub const DEFAULT_REFRESH_INTERVAL: Duration = Duration::from_secs(300);
/// Default `spiffe_refresh_hint` this gateway's bundle endpoint publishes.
pub const DEFAULT_REFRESH_HINT: Duration = Duration::from_secs(300);
/// Bounds of refresh intervals and hints.
pub const REFRESH_BOUNDS: (Duration, Duration) =
    (Duration::from_secs(1), Duration::from_secs(24 * 3600));

/// `[trust]` as written.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawTrust {
    /// `trust.allow_ids`
    pub allow_ids: Option<Vec<String>>,
    /// `trust.allow_trust_domains`
    pub allow_trust_domains: Option<Vec<String>>,
    /// `trust.refresh_interval`
    pub refresh_interval: Option<String>,
    /// `[[trust.federated]]`
    pub federated: Option<Vec<RawFederated>>,
    /// `[trust.bundle_endpoint]`
    pub bundle_endpoint: Option<RawBundleEndpoint>,
}

/// `[[trust.federated]]` as written.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawFederated {
    /// `trust.federated[].trust_domain`
    pub trust_domain: Option<String>,
    /// `trust.federated[].bundle`
    pub bundle: Option<String>,
    /// `trust.federated[].endpoint_url`
    pub endpoint_url: Option<String>,
    /// `trust.federated[].endpoint_profile`
    pub endpoint_profile: Option<String>,
    /// `trust.federated[].endpoint_spiffe_id`
    pub endpoint_spiffe_id: Option<String>,
    /// `trust.federated[].endpoint_ca`
    pub endpoint_ca: Option<String>,
    /// `trust.federated[].accept_peer_bundles`
    pub accept_peer_bundles: Option<bool>,
}

/// `[trust.bundle_endpoint]` as written.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawBundleEndpoint {
    /// `trust.bundle_endpoint.listen`
    pub listen: Option<String>,
    /// `trust.bundle_endpoint.refresh_hint`
    pub refresh_hint: Option<String>,
}

/// `[trust]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TrustConfig {
    /// SPIFFE IDs allowed to connect to this gateway.
    pub allow_ids: Vec<SpiffeId>,
    /// Trust domains whose every identity may connect to this gateway.
    pub allow_trust_domains: Vec<TrustDomain>,
    /// Fetch interval for bundles that carry no refresh hint.
    #[serde(with = "humantime_serde")]
    pub refresh_interval: Duration,
    /// Federated trust domains.
    pub federated: Vec<FederatedDomain>,
    /// This gateway's SPIFFE bundle endpoint, if served.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bundle_endpoint: Option<BundleEndpointConfig>,
}

impl TrustConfig {
    /// Makes the bundle and CA file paths absolute, relative to `base`.
    pub fn resolve_paths(&mut self, base: &Path) {
        for fed in &mut self.federated {
            if let Some(bundle) = &mut fed.bundle {
                resolve_path(base, bundle);
            }
            if let Some(FederationEndpoint {
                profile:
                    EndpointProfileConfig::HttpsWeb {
                        endpoint_ca: Some(ca),
                    },
                ..
            }) = &mut fed.endpoint
            {
                resolve_path(base, ca);
            }
        }
    }
}

/// `[[trust.federated]]`: a foreign trust domain and where its bundle comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FederatedDomain {
    /// The trust domain.
    pub trust_domain: TrustDomain,
    /// A static bundle file, or the bootstrap bundle for `https_spiffe`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bundle: Option<PathBuf>,
    /// Its bundle endpoint, if fetched.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<FederationEndpoint>,
    /// Configured peers of this trust domain may push its bundle, which then
    /// replaces `bundle` (a bootstrap bundle). Off by default: the file or
    /// the endpoint is the only source.
    pub accept_peer_bundles: bool,
}

/// A bundle endpoint to fetch from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FederationEndpoint {
    /// `https://host[:port][/path]`.
    pub endpoint_url: String,
    /// How it is authenticated.
    #[serde(flatten)]
    pub profile: EndpointProfileConfig,
}

/// SPIFFE bundle endpoint profiles.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "endpoint_profile", rename_all = "snake_case")]
pub enum EndpointProfileConfig {
    /// The endpoint presents an X509-SVID with this ID.
    HttpsSpiffe {
        /// The endpoint's SPIFFE ID.
        endpoint_spiffe_id: SpiffeId,
    },
    /// Web PKI, against `endpoint_ca` or the system's roots.
    HttpsWeb {
        /// Roots for the endpoint's certificate; the system's when absent.
        #[serde(skip_serializing_if = "Option::is_none")]
        endpoint_ca: Option<PathBuf>,
    },
}

/// `trust.federated[].endpoint_profile`, before its keys are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EndpointProfile {
    HttpsSpiffe,
    HttpsWeb,
}

impl Keyword for EndpointProfile {
    const KIND: &'static str = "profile";
    const WORDS: &'static [(&'static str, Self)] = &[
        ("https_spiffe", Self::HttpsSpiffe),
        ("https_web", Self::HttpsWeb),
    ];
}

/// `[trust.bundle_endpoint]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BundleEndpointConfig {
    /// Listen address (HTTPS, `https_spiffe` profile).
    pub listen: SocketAddr,
    /// `spiffe_refresh_hint` published with the bundle.
    #[serde(with = "humantime_serde")]
    pub refresh_hint: Duration,
}

/// Checks `[trust]`; `own_td`: this gateway's trust domain, `has_identity`:
/// whether `[identity]` is set.
pub(super) fn trust(
    check: &mut Check,
    raw: &RawTrust,
    own_td: Option<&TrustDomain>,
    has_identity: bool,
) -> Option<TrustConfig> {
    let errors_before = check.errors.len();
    let allow_ids = list(
        check,
        "trust.allow_ids",
        raw.allow_ids.as_deref(),
        SpiffeId::from_str,
    );
    let allow_trust_domains = list(
        check,
        "trust.allow_trust_domains",
        raw.allow_trust_domains.as_deref(),
        TrustDomain::from_str,
    );
    let refresh_interval = check.or_value(
        "trust.refresh_interval",
        raw.refresh_interval.as_deref(),
        DEFAULT_REFRESH_INTERVAL,
        parse_refresh,
    );
    let mut federated = Vec::new();
    let mut seen = BTreeSet::new();
    for (i, f) in raw.federated.iter().flatten().enumerate() {
        if let Some(fed) = federated_domain(check, &format!("trust.federated[{i}]"), f, own_td) {
            if !seen.insert(fed.trust_domain.clone()) {
                check.fail(
                    format!("trust.federated[{i}].trust_domain"),
                    format!(
                        "{} is listed twice; a trust domain has one bundle",
                        fed.trust_domain
                    ),
                );
            }
            federated.push(fed);
        }
    }
    // Every trust domain allowed in must have a bundle to authenticate it with.
    for (i, td) in allow_trust_domains.iter().enumerate() {
        if Some(td) != own_td && !seen.contains(td) {
            check.fail(
                format!("trust.allow_trust_domains[{i}]"),
                format!("{td} has no bundle: add it to [[trust.federated]]"),
            );
        }
    }
    for (i, id) in allow_ids.iter().enumerate() {
        let td = id.trust_domain();
        if Some(&td) != own_td && !seen.contains(&td) {
            check.fail(
                format!("trust.allow_ids[{i}]"),
                format!("trust domain {td} has no bundle: add it to [[trust.federated]]"),
            );
        }
    }
    let bundle_endpoint = raw
        .bundle_endpoint
        .as_ref()
        .and_then(|b| bundle_endpoint(check, b));
    if !has_identity {
        for (present, path) in [
            (!federated.is_empty(), "trust.federated"),
            (raw.bundle_endpoint.is_some(), "trust.bundle_endpoint"),
            (!allow_ids.is_empty(), "trust.allow_ids"),
            (!allow_trust_domains.is_empty(), "trust.allow_trust_domains"),
        ] {
            if present {
                check.fail(
                    path,
                    "needs [identity]: this gateway has no SVID to authenticate with",
                );
            }
        }
    }
    if check.errors.len() > errors_before {
        return None;
    }
    Some(TrustConfig {
        allow_ids,
        allow_trust_domains,
        refresh_interval: refresh_interval?,
        federated,
        bundle_endpoint,
    })
}

fn parse_refresh(s: &str) -> Result<Duration, String> {
    parse_duration_between(s, REFRESH_BOUNDS.0, REFRESH_BOUNDS.1)
}

fn parse_https_url(s: &str) -> Result<String, String> {
    let uri: http::Uri = s.parse().map_err(|e| format!("{s:?} is not a URL: {e}"))?;
    if uri.scheme_str() != Some("https") || uri.host().is_none() {
        return Err(format!("{s:?} must be an https:// URL with a host"));
    }
    Ok(s.to_owned())
}

fn federated_domain(
    check: &mut Check,
    path: &str,
    raw: &RawFederated,
    own_td: Option<&TrustDomain>,
) -> Option<FederatedDomain> {
    let at = |field: &str| format!("{path}.{field}");
    let errors_before = check.errors.len();
    let trust_domain = check.required(
        &at("trust_domain"),
        raw.trust_domain.as_deref(),
        TrustDomain::from_str,
    );
    if let (Some(td), Some(own)) = (&trust_domain, own_td)
        && td == own
    {
        check.fail(
            at("trust_domain"),
            format!("{td} is this gateway's own trust domain; its bundle is identity.bundle"),
        );
    }
    let bundle = check.optional(&at("bundle"), raw.bundle.as_deref(), parse_path);
    let url = check.optional(
        &at("endpoint_url"),
        raw.endpoint_url.as_deref(),
        parse_https_url,
    );
    let endpoint_id = check.optional(
        &at("endpoint_spiffe_id"),
        raw.endpoint_spiffe_id.as_deref(),
        SpiffeId::from_str,
    );
    let endpoint_ca = check.optional(&at("endpoint_ca"), raw.endpoint_ca.as_deref(), parse_path);
    let endpoint = if raw.endpoint_url.is_none() {
        for (set, field) in [
            (raw.endpoint_profile.is_some(), "endpoint_profile"),
            (raw.endpoint_spiffe_id.is_some(), "endpoint_spiffe_id"),
            (raw.endpoint_ca.is_some(), "endpoint_ca"),
        ] {
            if set {
                check.fail(at(field), "needs endpoint_url");
            }
        }
        if raw.bundle.is_none() {
            check.fail(at("bundle"), "is required unless endpoint_url is set");
        }
        None
    } else {
        let profile = check.or_value(
            &at("endpoint_profile"),
            raw.endpoint_profile.as_deref(),
            EndpointProfile::HttpsSpiffe,
            keyword::<EndpointProfile>,
        );
        match profile {
            Some(EndpointProfile::HttpsSpiffe) => {
                if raw.endpoint_spiffe_id.is_none() {
                    check.fail(
                        at("endpoint_spiffe_id"),
                        "is required for endpoint_profile \"https_spiffe\"",
                    );
                }
                if raw.bundle.is_none() {
                    check.fail(
                        at("bundle"),
                        "is required for endpoint_profile \"https_spiffe\": the bootstrap bundle that authenticates the endpoint until its first fetch",
                    );
                }
                if raw.endpoint_ca.is_some() {
                    check.fail(
                        at("endpoint_ca"),
                        "applies to endpoint_profile \"https_web\" only",
                    );
                }
                if let (Some(id), Some(td)) = (&endpoint_id, &trust_domain)
                    && id.trust_domain_str() != td.as_str()
                {
                    check.fail(
                        at("endpoint_spiffe_id"),
                        format!("{id} is not in trust domain {td}"),
                    );
                }
                endpoint_id.map(|endpoint_spiffe_id| EndpointProfileConfig::HttpsSpiffe {
                    endpoint_spiffe_id,
                })
            }
            Some(EndpointProfile::HttpsWeb) => {
                if raw.endpoint_spiffe_id.is_some() {
                    check.fail(
                        at("endpoint_spiffe_id"),
                        "applies to endpoint_profile \"https_spiffe\" only",
                    );
                }
                Some(EndpointProfileConfig::HttpsWeb { endpoint_ca })
            }
            None => None,
        }
        .zip(url)
        .map(|(profile, endpoint_url)| FederationEndpoint {
            endpoint_url,
            profile,
        })
    };
    let accept_peer_bundles = raw.accept_peer_bundles.unwrap_or(false);
    if accept_peer_bundles && raw.endpoint_url.is_some() {
        check.fail(
            at("accept_peer_bundles"),
            "a trust domain's bundle has one source: with endpoint_url it is the endpoint, which peers never override",
        );
    }
    if check.errors.len() > errors_before {
        return None;
    }
    Some(FederatedDomain {
        trust_domain: trust_domain?,
        bundle,
        endpoint,
        accept_peer_bundles,
    })
}

fn bundle_endpoint(check: &mut Check, raw: &RawBundleEndpoint) -> Option<BundleEndpointConfig> {
    let listen = check.required(
        "trust.bundle_endpoint.listen",
        raw.listen.as_deref(),
        parse_socket_addr,
    );
    let refresh_hint = check.or_value(
        "trust.bundle_endpoint.refresh_hint",
        raw.refresh_hint.as_deref(),
        DEFAULT_REFRESH_HINT,
        parse_refresh,
    );
    Some(BundleEndpointConfig {
        listen: listen?,
        refresh_hint: refresh_hint?,
    })
}
