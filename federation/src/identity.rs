//! SPIFFE identities: trust domains and SPIFFE IDs, parsed per the SPIFFE ID
//! specification.
//!
//! A trust domain name (§2.1) is lowercase letters, digits, `.`, `-` and `_`, at
//! most 255 characters. A SPIFFE ID (§2) is `spiffe://<trust-domain><path>` where
//! the path is empty or `/`-separated segments of `[A-Za-z0-9._-]`, none empty,
//! `.` or `..`, with no trailing `/`, query, fragment, port or user info; at most
//! 2048 bytes. Anything else is rejected rather than normalised, so two spellings
//! can never name the same identity.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Longest trust domain name the SPIFFE specification allows.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// Why a string is not a valid trust domain name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrustDomainError {
    /// The name is empty.
    #[error("must not be empty")]
    Empty,
    /// The name is longer than 255 characters.
    #[error("is {0} characters long; at most {MAX_TRUST_DOMAIN_LEN} are allowed")]
    TooLong(usize),
    /// A full SPIFFE ID was given where only the trust domain belongs.
    #[error("must be a bare trust domain name such as \"example.org\", without \"spiffe://\"")]
    HasScheme,
    /// A character outside the SPIFFE trust domain alphabet.
    #[error("contains {0:?}; only lowercase letters, digits, '.', '-' and '_' are allowed")]
    InvalidChar(char),
}

/// A SPIFFE trust domain, e.g. `cluster-a.example.org`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TrustDomain(String);

impl TrustDomain {
    /// The trust domain name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn validate(s: &str) -> Result<(), TrustDomainError> {
        if s.is_empty() {
            return Err(TrustDomainError::Empty);
        }
        if s.len() > MAX_TRUST_DOMAIN_LEN {
            return Err(TrustDomainError::TooLong(s.len()));
        }
        if s.contains("://") {
            return Err(TrustDomainError::HasScheme);
        }
        match s.chars().find(|c| {
            !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_'))
        }) {
            Some(c) => Err(TrustDomainError::InvalidChar(c)),
            None => Ok(()),
        }
    }
}

impl FromStr for TrustDomain {
    type Err = TrustDomainError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::validate(s)?;
        Ok(Self(s.to_owned()))
    }
}

impl TryFrom<String> for TrustDomain {
    type Error = TrustDomainError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::validate(&s)?;
        Ok(Self(s))
    }
}

/// Lets maps keyed by trust domain be queried with a `&str` from a certificate.
impl std::borrow::Borrow<str> for TrustDomain {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl From<TrustDomain> for String {
    fn from(td: TrustDomain) -> String {
        td.0
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Longest SPIFFE ID the specification allows, in bytes.
pub const MAX_SPIFFE_ID_LEN: usize = 2048;

const SCHEME: &str = "spiffe://";

/// Why a string is not a valid SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    /// Does not start with `spiffe://`.
    #[error("must start with \"spiffe://\"")]
    Scheme,
    /// Longer than 2048 bytes.
    #[error("is {0} bytes long; at most {MAX_SPIFFE_ID_LEN} are allowed")]
    TooLong(usize),
    /// The trust domain part is invalid.
    #[error("trust domain {0}")]
    TrustDomain(TrustDomainError),
    /// A path segment is empty (`//` or a trailing `/`).
    #[error("path has an empty segment (\"//\" or a trailing \"/\")")]
    EmptySegment,
    /// A path segment is `.` or `..`.
    #[error("path segments \".\" and \"..\" are not allowed")]
    DotSegment,
    /// A character outside `[A-Za-z0-9._-]` in the path.
    #[error("path contains {0:?}; only letters, digits, '.', '-' and '_' are allowed")]
    InvalidPathChar(char),
}

/// A SPIFFE ID such as `spiffe://cluster-a.example.org/isthmus/gateway/gw-1`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SpiffeId {
    id: String,
    /// Byte offset where the path starts (the end of the trust domain).
    path_start: usize,
}

impl SpiffeId {
    /// Builds `spiffe://<td><path>`; `path` must be empty or start with `/`.
    pub fn new(trust_domain: &TrustDomain, path: &str) -> Result<Self, SpiffeIdError> {
        format!("{SCHEME}{trust_domain}{path}").parse()
    }

    /// The ID of gateway `name` in `trust_domain`: `spiffe://<td>/isthmus/gateway/<name>`.
    pub fn gateway(trust_domain: &TrustDomain, name: &crate::GatewayName) -> Self {
        // A trust domain and an RFC 1123 label always make a valid ID.
        Self::new(trust_domain, &format!("/isthmus/gateway/{name}"))
            .unwrap_or_else(|e| unreachable!("gateway SPIFFE ID from checked parts: {e}"))
    }

    /// The whole ID.
    pub fn as_str(&self) -> &str {
        &self.id
    }

    /// The trust domain part.
    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.id[SCHEME.len()..self.path_start].to_owned())
    }

    /// The trust domain name, borrowed.
    pub fn trust_domain_str(&self) -> &str {
        &self.id[SCHEME.len()..self.path_start]
    }

    /// The path, empty or starting with `/`.
    pub fn path(&self) -> &str {
        &self.id[self.path_start..]
    }

    fn parse(s: &str) -> Result<usize, SpiffeIdError> {
        if s.len() > MAX_SPIFFE_ID_LEN {
            return Err(SpiffeIdError::TooLong(s.len()));
        }
        let rest = s.strip_prefix(SCHEME).ok_or(SpiffeIdError::Scheme)?;
        let td_len = rest.find('/').unwrap_or(rest.len());
        TrustDomain::validate(&rest[..td_len]).map_err(SpiffeIdError::TrustDomain)?;
        let path = &rest[td_len..];
        if !path.is_empty() {
            for segment in path[1..].split('/') {
                match segment {
                    "" => return Err(SpiffeIdError::EmptySegment),
                    "." | ".." => return Err(SpiffeIdError::DotSegment),
                    _ => {}
                }
                if let Some(c) = segment
                    .chars()
                    .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
                {
                    return Err(SpiffeIdError::InvalidPathChar(c));
                }
            }
        }
        Ok(SCHEME.len() + td_len)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let path_start = Self::parse(s)?;
        Ok(Self {
            id: s.to_owned(),
            path_start,
        })
    }
}

impl TryFrom<String> for SpiffeId {
    type Error = SpiffeIdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        let path_start = Self::parse(&s)?;
        Ok(Self { id: s, path_start })
    }
}

impl From<SpiffeId> for String {
    fn from(id: SpiffeId) -> String {
        id.id
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_from_the_spec_parse() {
        let id: SpiffeId = "spiffe://example.org/ns/default/sa/web".parse().unwrap();
        assert_eq!(id.trust_domain_str(), "example.org");
        assert_eq!(id.trust_domain().as_str(), "example.org");
        assert_eq!(id.path(), "/ns/default/sa/web");
        let bare: SpiffeId = "spiffe://example.org".parse().unwrap();
        assert_eq!(bare.path(), "");
        assert!("spiffe://td/A-Z_a.z/0-9".parse::<SpiffeId>().is_ok());
    }

    #[test]
    fn malformed_spiffe_ids_are_rejected_with_reason() {
        use SpiffeIdError::*;
        let cases: &[(&str, SpiffeIdError)] = &[
            ("", Scheme),
            ("http://example.org/x", Scheme),
            ("SPIFFE://example.org/x", Scheme),
            ("spiffe:/example.org", Scheme),
            ("spiffe://", TrustDomain(TrustDomainError::Empty)),
            ("spiffe:///path", TrustDomain(TrustDomainError::Empty)),
            (
                "spiffe://Example.org/x",
                TrustDomain(TrustDomainError::InvalidChar('E')),
            ),
            (
                "spiffe://example.org:8080/x",
                TrustDomain(TrustDomainError::InvalidChar(':')),
            ),
            (
                "spiffe://user@example.org/x",
                TrustDomain(TrustDomainError::InvalidChar('@')),
            ),
            ("spiffe://example.org/", EmptySegment),
            ("spiffe://example.org//x", EmptySegment),
            ("spiffe://example.org/x/", EmptySegment),
            ("spiffe://example.org/./x", DotSegment),
            ("spiffe://example.org/x/..", DotSegment),
            ("spiffe://example.org/x?y=1", InvalidPathChar('?')),
            ("spiffe://example.org/x#f", InvalidPathChar('#')),
            ("spiffe://example.org/x%20y", InvalidPathChar('%')),
        ];
        for (input, want) in cases {
            assert_eq!(input.parse::<SpiffeId>().as_ref(), Err(want), "{input}");
        }
        let long = format!("spiffe://td/{}", "a".repeat(2048));
        assert!(matches!(long.parse::<SpiffeId>(), Err(TooLong(_))));
    }

    #[test]
    fn gateway_ids_follow_the_design() {
        let td: TrustDomain = "east.example.org".parse().unwrap();
        let id = SpiffeId::gateway(&td, &"gw-1".parse().unwrap());
        assert_eq!(
            id.as_str(),
            "spiffe://east.example.org/isthmus/gateway/gw-1"
        );
    }

    #[test]
    fn accepts_spec_alphabet() {
        for ok in ["example.org", "cluster_a.corp-1.example", "td", "1.2.3.4"] {
            assert!(ok.parse::<TrustDomain>().is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_malformed() {
        assert_eq!("".parse::<TrustDomain>(), Err(TrustDomainError::Empty));
        assert_eq!(
            "spiffe://example.org".parse::<TrustDomain>(),
            Err(TrustDomainError::HasScheme)
        );
        assert_eq!(
            "Example.org".parse::<TrustDomain>(),
            Err(TrustDomainError::InvalidChar('E'))
        );
        assert_eq!(
            "example.org/path".parse::<TrustDomain>(),
            Err(TrustDomainError::InvalidChar('/'))
        );
        assert_eq!(
            "a".repeat(256).parse::<TrustDomain>(),
            Err(TrustDomainError::TooLong(256))
        );
    }
}
