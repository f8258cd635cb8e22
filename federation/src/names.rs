//! Checked names of clusters and gateways.
//!
//! Both end up inside DNS names, SNI values and SPIFFE ID paths, so both follow the
//! RFC 1123 label rules that Kubernetes uses for object names: 1–63 characters of
//! lowercase ASCII letters, digits and `-`, starting and ending with a letter or digit.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Longest DNS label (RFC 1035 §2.3.4).
pub const MAX_LABEL_LEN: usize = 63;

/// Why a string is not a valid name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name is empty.
    #[error("must not be empty")]
    Empty,
    /// The name is longer than a DNS label.
    #[error("is {0} characters long; at most {MAX_LABEL_LEN} are allowed")]
    TooLong(usize),
    /// The name holds a character outside `[a-z0-9-]`.
    #[error("contains {0:?}; only lowercase letters, digits and '-' are allowed")]
    InvalidChar(char),
    /// The name starts or ends with `-`.
    #[error("must start and end with a lowercase letter or digit")]
    EdgeHyphen,
}

/// Checks `s` against the RFC 1123 label rules.
pub fn validate_label(s: &str) -> Result<(), NameError> {
    if s.is_empty() {
        return Err(NameError::Empty);
    }
    if s.len() > MAX_LABEL_LEN {
        return Err(NameError::TooLong(s.len()));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(NameError::InvalidChar(c));
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Err(NameError::EdgeHyphen);
    }
    Ok(())
}

macro_rules! label_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// The name as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                validate_label(s)?;
                Ok(Self(s.to_owned()))
            }
        }

        impl TryFrom<String> for $name {
            type Error = NameError;
            fn try_from(s: String) -> Result<Self, Self::Error> {
                validate_label(&s)?;
                Ok(Self(s))
            }
        }

        impl From<$name> for String {
            fn from(n: $name) -> String {
                n.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

label_newtype!(
    /// The name of a cluster (or VM fleet) in the federation, unique within it.
    ClusterName
);
label_newtype!(
    /// The name of one gateway; it is the last segment of the gateway's SPIFFE ID
    /// `spiffe://<trust-domain>/isthmus/gateway/<name>`.
    GatewayName
);
label_newtype!(
    /// A namespace; with namespace sameness (MCS), the same namespace in every
    /// cluster is one namespace.
    Namespace
);
label_newtype!(
    /// A service name within its namespace.
    ServiceName
);
label_newtype!(
    /// The name of a service port (Kubernetes `ports[].name`), used in SRV names
    /// `_<port>._<proto>.<svc>.<ns>.svc.clusterset.local`.
    PortName
);
label_newtype!(
    /// The hostname of one endpoint of a headless service, used in its own DNS
    /// name `<hostname>.<cluster>.<svc>.<ns>.svc.clusterset.local`.
    Hostname
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_rfc1123_labels() {
        for ok in ["a", "cluster-a", "east1", "0", &"x".repeat(63)] {
            assert!(ok.parse::<ClusterName>().is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_bad_labels_with_reason() {
        assert_eq!("".parse::<ClusterName>(), Err(NameError::Empty));
        assert_eq!(
            "x".repeat(64).parse::<GatewayName>(),
            Err(NameError::TooLong(64))
        );
        assert_eq!(
            "Upper".parse::<ClusterName>(),
            Err(NameError::InvalidChar('U'))
        );
        assert_eq!(
            "a.b".parse::<ClusterName>(),
            Err(NameError::InvalidChar('.'))
        );
        assert_eq!("-a".parse::<ClusterName>(), Err(NameError::EdgeHyphen));
        assert_eq!("a-".parse::<ClusterName>(), Err(NameError::EdgeHyphen));
    }

    #[test]
    fn serde_goes_through_validation() {
        let ok: ClusterName = serde_json::from_str("\"east\"").unwrap();
        assert_eq!(ok.as_str(), "east");
        assert!(serde_json::from_str::<ClusterName>("\"East\"").is_err());
    }
}
