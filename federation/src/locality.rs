//! Localities: where a gateway or endpoint runs, as region / zone / subzone.
//!
//! Failover prefers the same zone, then the same region, then anywhere, so a zone
//! without a region (or a subzone without a zone) would be meaningless; such
//! localities are rejected.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::names::{NameError, validate_label};

/// Why a locality is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LocalityError {
    /// A part is not a valid label.
    #[error("{part} {source}")]
    Part {
        /// Which part: `region`, `zone` or `subzone`.
        part: &'static str,
        /// What is wrong with it.
        source: NameError,
    },
    /// A zone without a region, or a subzone without a zone.
    #[error("{part} is set but {parent} is not")]
    MissingParent {
        /// The part that is set.
        part: &'static str,
        /// The part it needs.
        parent: &'static str,
    },
    /// More than three `/`-separated parts.
    #[error("has more than three parts (region/zone/subzone)")]
    TooManyParts,
}

/// A locality; `region` is required, `zone` and `subzone` refine it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "UncheckedLocality")]
pub struct Locality {
    region: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    zone: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    subzone: Option<String>,
}

/// The serde shape of a [`Locality`] before its parts are checked.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UncheckedLocality {
    region: String,
    zone: Option<String>,
    subzone: Option<String>,
}

impl TryFrom<UncheckedLocality> for Locality {
    type Error = LocalityError;
    fn try_from(u: UncheckedLocality) -> Result<Self, Self::Error> {
        Self::new(&u.region, u.zone.as_deref(), u.subzone.as_deref())
    }
}

impl Locality {
    /// Builds a locality, checking each part and that parents are present.
    pub fn new(
        region: &str,
        zone: Option<&str>,
        subzone: Option<&str>,
    ) -> Result<Self, LocalityError> {
        let check = |part, v: &str| {
            validate_label(v).map_err(|source| LocalityError::Part { part, source })
        };
        check("region", region)?;
        if let Some(z) = zone {
            check("zone", z)?;
        }
        if let Some(s) = subzone {
            check("subzone", s)?;
            if zone.is_none() {
                return Err(LocalityError::MissingParent {
                    part: "subzone",
                    parent: "zone",
                });
            }
        }
        Ok(Self {
            region: region.to_owned(),
            zone: zone.map(str::to_owned),
            subzone: subzone.map(str::to_owned),
        })
    }

    /// The region.
    pub fn region(&self) -> &str {
        &self.region
    }

    /// The zone, if known.
    pub fn zone(&self) -> Option<&str> {
        self.zone.as_deref()
    }

    /// The subzone, if known.
    pub fn subzone(&self) -> Option<&str> {
        self.subzone.as_deref()
    }

    /// Whether `self` lies inside `area`: the same region, and the same zone
    /// and subzone where `area` names them (`us-east` holds
    /// `us-east/us-east-1a`; not the other way round).
    pub fn is_within(&self, area: &Locality) -> bool {
        self.region == area.region
            && area
                .zone
                .as_ref()
                .is_none_or(|z| self.zone.as_ref() == Some(z))
            && area
                .subzone
                .as_ref()
                .is_none_or(|s| self.subzone.as_ref() == Some(s))
    }
}

/// Parses `region[/zone[/subzone]]`.
impl FromStr for Locality {
    type Err = LocalityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.split('/');
        let region = parts.next().unwrap_or_default();
        let zone = parts.next();
        let subzone = parts.next();
        if parts.next().is_some() {
            return Err(LocalityError::TooManyParts);
        }
        Self::new(region, zone, subzone)
    }
}

/// Formats as `region[/zone[/subzone]]`.
impl fmt::Display for Locality {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.region)?;
        for part in [&self.zone, &self.subzone].into_iter().flatten() {
            write!(f, "/{part}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_locality_is_within_the_areas_that_contain_it() {
        let l = |s: &str| s.parse::<Locality>().unwrap();
        let here = l("eu-west/eu-west-1a/rack7");
        assert!(here.is_within(&l("eu-west")));
        assert!(here.is_within(&l("eu-west/eu-west-1a")));
        assert!(here.is_within(&here));
        assert!(!here.is_within(&l("eu-west/eu-west-1b")));
        assert!(!here.is_within(&l("us-east")));
        assert!(!l("eu-west").is_within(&l("eu-west/eu-west-1a")));
    }

    #[test]
    fn parses_and_displays_round_trip() {
        for s in ["eu-west", "eu-west/eu-west-1a", "eu-west/eu-west-1a/rack7"] {
            assert_eq!(s.parse::<Locality>().unwrap().to_string(), s);
        }
    }

    #[test]
    fn rejects_bad_parts() {
        assert!(matches!(
            "".parse::<Locality>(),
            Err(LocalityError::Part { part: "region", .. })
        ));
        assert!(matches!(
            "eu/Zone".parse::<Locality>(),
            Err(LocalityError::Part { part: "zone", .. })
        ));
        assert_eq!(
            "a/b/c/d".parse::<Locality>(),
            Err(LocalityError::TooManyParts)
        );
        assert_eq!(
            Locality::new("eu", None, Some("rack")),
            Err(LocalityError::MissingParent {
                part: "subzone",
                parent: "zone"
            })
        );
    }
}
