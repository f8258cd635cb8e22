//! SPIFFE identities: trust domains (and, with issue 3, SPIFFE IDs).
//!
//! A trust domain name follows the SPIFFE ID specification §2.1: lowercase letters,
//! digits, `.`, `-` and `_`, at most 255 characters. Anything else, including
//! uppercase, a scheme or a path, is rejected rather than normalised, so that
//! two spellings can never name the same trust domain.

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

#[cfg(test)]
mod tests {
    use super::*;

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
