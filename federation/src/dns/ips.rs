//! Clusterset IPs: one virtual address per service, from a configured range,
//! stable across restarts.
//!
//! A service's first choice is a hash of `namespace/name` into the range, so
//! gateways that share a range usually agree on its address even without
//! shared state; a collision probes to the next free address. Allocations are
//! written to a state file (atomically: a temporary file, then a rename) and
//! read back at start, so a restart never moves a service. An allocation
//! outlives its service being withdrawn (a flapping export keeps its address)
//! and is reclaimed only when the range is full.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::ServiceKey;

/// How many addresses a collision probes before giving up on the hash and
/// scanning the whole range.
const PROBES: u128 = 64;

/// A CIDR range of IPv4 or IPv6 addresses, such as `127.240.0.0/16`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpRange {
    network: IpAddr,
    prefix: u8,
}

/// Why a string is not an IP range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpRangeError {
    /// No `/prefix`.
    #[error("must be written address/prefix, e.g. 127.240.0.0/16")]
    Shape,
    /// The address part is not an IP address.
    #[error("{0:?} is not an IP address")]
    Address(String),
    /// The prefix is not a number in range.
    #[error("prefix {0:?} must be a number from {1} to {2}")]
    Prefix(String, u8, u8),
    /// Host bits are set.
    #[error("{0} has host bits set; the network is {1}")]
    HostBits(IpAddr, IpAddr),
}

impl IpRange {
    fn bits(self) -> u8 {
        match self.network {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        }
    }

    fn base(self) -> u128 {
        match self.network {
            IpAddr::V4(a) => u128::from(u32::from(a)),
            IpAddr::V6(a) => u128::from(a),
        }
    }

    /// How many addresses a service can get: every address but the network
    /// address (and the IPv4 broadcast address). Parsing keeps ranges at two
    /// or more.
    pub fn usable(self) -> u128 {
        let size = 1u128 << (self.bits() - self.prefix).min(127);
        match self.network {
            IpAddr::V4(_) => size - 2,
            IpAddr::V6(_) => size - 1,
        }
    }

    /// The `index`-th usable address, `index < usable()`.
    fn nth(self, index: u128) -> IpAddr {
        let value = self.base() + index + 1;
        match self.network {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(u32::try_from(value).unwrap_or(u32::MAX))),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(value)),
        }
    }

    /// Whether `ip` is a usable address of the range.
    pub fn contains(self, ip: IpAddr) -> bool {
        let value = match (self.network, ip) {
            (IpAddr::V4(_), IpAddr::V4(a)) => u128::from(u32::from(a)),
            (IpAddr::V6(_), IpAddr::V6(a)) => u128::from(a),
            _ => return false,
        };
        value > self.base() && value - self.base() <= self.usable()
    }

    /// Whether `ip` lies in the range at all (usable or not).
    pub fn covers(self, ip: IpAddr) -> bool {
        let span = u32::from(self.bits() - self.prefix);
        match (self.network, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                u32::from(a).checked_shr(span).unwrap_or(0)
                    == u32::from(n).checked_shr(span).unwrap_or(0)
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                u128::from(a).checked_shr(span).unwrap_or(0)
                    == u128::from(n).checked_shr(span).unwrap_or(0)
            }
            _ => false,
        }
    }

    /// Its network address.
    pub fn network(self) -> IpAddr {
        self.network
    }

    /// Its prefix length.
    pub fn prefix(self) -> u8 {
        self.prefix
    }

    /// Whether it is an IPv4 range.
    pub fn is_ipv4(self) -> bool {
        self.network.is_ipv4()
    }
}

impl fmt::Display for IpRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl FromStr for IpRange {
    type Err = IpRangeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = s.split_once('/').ok_or(IpRangeError::Shape)?;
        let network: IpAddr = addr
            .parse()
            .map_err(|_| IpRangeError::Address(addr.to_owned()))?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        // A range of fewer than 2 usable addresses is of no use.
        let min = if network.is_ipv4() { 8 } else { 64 };
        let max_prefix = max - 2;
        let prefix = prefix
            .parse::<u8>()
            .ok()
            .filter(|p| (min..=max_prefix).contains(p))
            .ok_or_else(|| IpRangeError::Prefix(prefix.to_owned(), min, max_prefix))?;
        let range = Self { network, prefix };
        let span = u32::from(max - prefix);
        let masked = match network {
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(
                u32::from(a).checked_shr(span).unwrap_or(0) << span,
            )),
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(
                u128::from(a).checked_shr(span).unwrap_or(0) << span,
            )),
        };
        if masked != network {
            return Err(IpRangeError::HostBits(network, masked));
        }
        Ok(range)
    }
}

/// A service's clusterset addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterSetIp {
    /// From the IPv4 range.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<Ipv4Addr>,
    /// From the IPv6 range, when one is configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<Ipv6Addr>,
}

/// The state file's shape.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    version: u32,
    services: BTreeMap<String, ClusterSetIp>,
}

const STATE_VERSION: u32 = 1;

/// The published allocations of the services in the catalog now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allocations {
    by_key: HashMap<ServiceKey, ClusterSetIp>,
    by_ip: HashMap<IpAddr, ServiceKey>,
}

impl Allocations {
    /// The addresses of `key`.
    pub fn get(&self, key: &ServiceKey) -> Option<ClusterSetIp> {
        self.by_key.get(key).copied()
    }

    /// The service `ip` was allocated to.
    pub fn service(&self, ip: IpAddr) -> Option<&ServiceKey> {
        self.by_ip.get(&ip)
    }

    /// Every allocation.
    pub fn iter(&self) -> impl Iterator<Item = (&ServiceKey, &ClusterSetIp)> {
        self.by_key.iter()
    }

    /// How many services have an address.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    /// Whether no service has an address.
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

/// Why the allocator could not load or save its state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The state file.
        path: PathBuf,
        /// What went wrong.
        source: io::Error,
    },
    /// The file is not a state file.
    #[error("{path}: not an isthmus clusterset IP state file: {reason}")]
    Format {
        /// The state file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

/// Allocates clusterset IPs; see the module docs.
#[derive(Debug)]
pub struct Allocator {
    v4: IpRange,
    v6: Option<IpRange>,
    state: Option<PathBuf>,
    assigned: BTreeMap<ServiceKey, ClusterSetIp>,
    taken: HashMap<IpAddr, ServiceKey>,
    /// Services that could not get an address because the range is full.
    exhausted: Vec<ServiceKey>,
}

impl Allocator {
    /// An allocator for `v4` (and `v6`), kept in `state` if given. A state
    /// file that does not exist yet is an empty one; an allocation outside the
    /// ranges (the range was changed) is dropped with a warning.
    pub fn open(
        v4: IpRange,
        v6: Option<IpRange>,
        state: Option<PathBuf>,
    ) -> Result<Self, StateError> {
        let mut allocator = Self {
            v4,
            v6,
            state,
            assigned: BTreeMap::new(),
            taken: HashMap::new(),
            exhausted: Vec::new(),
        };
        if let Some(path) = allocator.state.clone() {
            allocator.load(&path)?;
        }
        Ok(allocator)
    }

    fn load(&mut self, path: &Path) -> Result<(), StateError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(source) => {
                return Err(StateError::Io {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        let format = |reason: String| StateError::Format {
            path: path.to_owned(),
            reason,
        };
        let file: StateFile = serde_json::from_str(&text).map_err(|e| format(e.to_string()))?;
        if file.version != STATE_VERSION {
            return Err(format(format!(
                "version {} (this build reads {STATE_VERSION})",
                file.version
            )));
        }
        for (key, ip) in file.services {
            let key: ServiceKey = key
                .parse()
                .map_err(|e| format(format!("service {key:?}: {e}")))?;
            let ipv4 = ip.ipv4.filter(|a| self.keep(&key, IpAddr::V4(*a), self.v4));
            let ipv6 = ip.ipv6.filter(|a| {
                self.v6
                    .is_some_and(|range| self.keep(&key, IpAddr::V6(*a), range))
            });
            if ipv4.is_some() || ipv6.is_some() {
                self.insert(key, ClusterSetIp { ipv4, ipv6 });
            }
        }
        Ok(())
    }

    /// Whether a loaded allocation still fits.
    fn keep(&self, key: &ServiceKey, ip: IpAddr, range: IpRange) -> bool {
        if !range.contains(ip) {
            tracing::warn!(service = %key, %ip, %range,
                "dropping a saved clusterset IP outside the configured range");
            return false;
        }
        if let Some(other) = self.taken.get(&ip) {
            tracing::warn!(service = %key, %ip, %other,
                "dropping a saved clusterset IP that two services claim");
            return false;
        }
        true
    }

    fn insert(&mut self, key: ServiceKey, ip: ClusterSetIp) {
        if let Some(old) = self.assigned.insert(key.clone(), ip) {
            for a in [old.ipv4.map(IpAddr::V4), old.ipv6.map(IpAddr::V6)]
                .into_iter()
                .flatten()
            {
                self.taken.remove(&a);
            }
        }
        for a in [ip.ipv4.map(IpAddr::V4), ip.ipv6.map(IpAddr::V6)]
            .into_iter()
            .flatten()
        {
            self.taken.insert(a, key.clone());
        }
    }

    /// Gives every service in `keys` an address (keeping the ones it has) and
    /// returns the allocations of exactly those services. Saves the state
    /// file when an allocation was added; a save error is returned but the
    /// allocations still apply (they are only less durable).
    pub fn sync<'a>(
        &mut self,
        keys: impl IntoIterator<Item = &'a ServiceKey>,
    ) -> (Allocations, Result<(), StateError>) {
        let keys: Vec<&ServiceKey> = keys.into_iter().collect();
        let live: std::collections::HashSet<&ServiceKey> = keys.iter().copied().collect();
        let mut changed = false;
        self.exhausted.clear();
        for key in &keys {
            let mut ip = self.assigned.get(*key).copied().unwrap_or(ClusterSetIp {
                ipv4: None,
                ipv6: None,
            });
            let mut added = false;
            if ip.ipv4.is_none() {
                ip.ipv4 = self.pick(key, self.v4, &live).and_then(|a| match a {
                    IpAddr::V4(a) => Some(a),
                    IpAddr::V6(_) => None,
                });
                added |= ip.ipv4.is_some();
            }
            if let (None, Some(v6)) = (ip.ipv6, self.v6) {
                ip.ipv6 = self.pick(key, v6, &live).and_then(|a| match a {
                    IpAddr::V6(a) => Some(a),
                    IpAddr::V4(_) => None,
                });
                added |= ip.ipv6.is_some();
            }
            if ip.ipv4.is_none() {
                self.exhausted.push((*key).clone());
            }
            if added {
                self.insert((*key).clone(), ip);
                changed = true;
            }
        }
        let mut published = Allocations::default();
        for key in keys {
            if let Some(ip) = self.assigned.get(key) {
                published.by_key.insert(key.clone(), *ip);
                for a in [ip.ipv4.map(IpAddr::V4), ip.ipv6.map(IpAddr::V6)]
                    .into_iter()
                    .flatten()
                {
                    published.by_ip.insert(a, key.clone());
                }
            }
        }
        let saved = if changed { self.save() } else { Ok(()) };
        (published, saved)
    }

    /// Services the last [`Self::sync`] could not give an IPv4 address.
    pub fn exhausted(&self) -> &[ServiceKey] {
        &self.exhausted
    }

    /// A free address of `range` for `key`: its hash's address, or the next
    /// free one. When the range is full, reclaims the address of a service
    /// that is not `live`.
    fn pick(
        &mut self,
        key: &ServiceKey,
        range: IpRange,
        live: &std::collections::HashSet<&ServiceKey>,
    ) -> Option<IpAddr> {
        let usable = range.usable();
        let start = hash(key) % usable;
        let free = |index: u128, taken: &HashMap<IpAddr, ServiceKey>| {
            let ip = range.nth(index % usable);
            (!taken.contains_key(&ip)).then_some(ip)
        };
        // Probe near the hash first, then scan; a /16 is scanned in well
        // under a millisecond, and only when it is nearly full.
        let scan = usable.min(1 << 20);
        if let Some(ip) = (0..PROBES.min(usable))
            .chain(PROBES.min(usable)..scan)
            .find_map(|i| free(start + i, &self.taken))
        {
            return Some(ip);
        }
        // Full: reclaim from a withdrawn service.
        let (ip, owner) = self
            .taken
            .iter()
            .find(|(ip, owner)| range.contains(**ip) && !live.contains(owner))
            .map(|(ip, owner)| (*ip, owner.clone()))?;
        tracing::info!(service = %owner, %ip, "reclaiming the clusterset IP of a withdrawn service");
        self.taken.remove(&ip);
        if let Some(entry) = self.assigned.get_mut(&owner) {
            match ip {
                IpAddr::V4(_) => entry.ipv4 = None,
                IpAddr::V6(_) => entry.ipv6 = None,
            }
            if entry.ipv4.is_none() && entry.ipv6.is_none() {
                self.assigned.remove(&owner);
            }
        }
        Some(ip)
    }

    fn save(&self) -> Result<(), StateError> {
        let Some(path) = &self.state else {
            return Ok(());
        };
        let file = StateFile {
            version: STATE_VERSION,
            services: self
                .assigned
                .iter()
                .map(|(k, ip)| (k.to_string(), *ip))
                .collect(),
        };
        let io = |source| StateError::Io {
            path: path.clone(),
            source,
        };
        let text = serde_json::to_vec_pretty(&file).map_err(|e| io(io::Error::other(e)))?;
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
        let tmp = path.with_extension("tmp");
        if let Some(dir) = dir {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        std::fs::write(&tmp, text).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }
}

/// A stable hash of the service key (FNV-1a; the same in every build, so
/// gateways agree on first choices).
fn hash(key: &ServiceKey) -> u128 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.to_string().bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    u128::from(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> ServiceKey {
        s.parse().unwrap()
    }

    #[test]
    fn ranges_parse_and_reject_what_they_should() {
        let r: IpRange = "127.240.0.0/16".parse().unwrap();
        assert_eq!(r.usable(), 65_534);
        assert!(r.contains("127.240.0.1".parse().unwrap()));
        assert!(r.contains("127.240.255.254".parse().unwrap()));
        assert!(!r.contains("127.240.0.0".parse().unwrap()));
        assert!(!r.contains("127.240.255.255".parse().unwrap()));
        assert!(!r.contains("127.241.0.1".parse().unwrap()));
        assert!(!r.contains("::1".parse().unwrap()));
        assert!(r.covers("127.240.0.0".parse().unwrap()));
        let r6: IpRange = "fd00:1::/112".parse().unwrap();
        assert!(r6.contains("fd00:1::ffff".parse().unwrap()));
        for (bad, want) in [
            ("127.240.0.0", "address/prefix"),
            ("127.240.0.1/16", "host bits"),
            ("127.240.0.0/31", "prefix"),
            ("127.240.0.0/x", "prefix"),
            ("nope/16", "not an IP"),
            ("fd00::/32", "prefix"),
        ] {
            let e = bad.parse::<IpRange>().unwrap_err().to_string();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }

    #[test]
    fn addresses_are_unique_stable_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("ips.json");
        let range: IpRange = "127.240.0.0/24".parse().unwrap();
        let v6: IpRange = "fd00:1::/112".parse().unwrap();
        let keys: Vec<ServiceKey> = (0..200).map(|i| key(&format!("ns/svc-{i}"))).collect();
        let mut a = Allocator::open(range, Some(v6), Some(state.clone())).unwrap();
        let (first, saved) = a.sync(&keys);
        saved.unwrap();
        assert_eq!(first.len(), 200);
        let ips: std::collections::HashSet<_> =
            first.iter().map(|(_, ip)| ip.ipv4.unwrap()).collect();
        assert_eq!(ips.len(), 200, "addresses are unique");
        for (k, ip) in first.iter() {
            assert!(range.contains(IpAddr::V4(ip.ipv4.unwrap())));
            assert!(v6.contains(IpAddr::V6(ip.ipv6.unwrap())));
            assert_eq!(first.service(IpAddr::V4(ip.ipv4.unwrap())), Some(k));
        }

        // Same keys in another order, after a restart: same addresses.
        let mut b = Allocator::open(range, Some(v6), Some(state.clone())).unwrap();
        let reversed: Vec<&ServiceKey> = keys.iter().rev().collect();
        let (second, _) = b.sync(reversed);
        assert_eq!(first, second);

        // A withdrawn service keeps its address for when it comes back.
        let gone = &keys[7];
        let (without, _) = b.sync(keys.iter().filter(|k| *k != gone));
        assert!(without.get(gone).is_none());
        assert_eq!(without.len(), 199);
        let (back, _) = b.sync(&keys);
        assert_eq!(back.get(gone), first.get(gone));
    }

    #[test]
    fn a_full_range_reclaims_withdrawn_services_and_reports_the_rest() {
        let range: IpRange = "10.0.0.0/29".parse().unwrap(); // 6 usable
        let mut a = Allocator::open(range, None, None).unwrap();
        let old: Vec<ServiceKey> = (0..6).map(|i| key(&format!("ns/old-{i}"))).collect();
        let (all, _) = a.sync(&old);
        assert_eq!(all.len(), 6);
        assert!(a.exhausted().is_empty());
        // Two withdrawn, three new: two reclaim, one is left without.
        let new: Vec<ServiceKey> = (0..3).map(|i| key(&format!("ns/new-{i}"))).collect();
        let live: Vec<&ServiceKey> = old[2..].iter().chain(&new).collect();
        let (now, _) = a.sync(live);
        assert_eq!(now.len(), 6);
        assert_eq!(a.exhausted().len(), 1);
        for k in &old[2..] {
            assert_eq!(now.get(k), all.get(k), "live services keep their address");
        }
    }

    #[test]
    fn a_bad_or_foreign_state_file_is_an_error_or_dropped_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("ips.json");
        let range: IpRange = "127.240.0.0/16".parse().unwrap();
        std::fs::write(&state, "{not json").unwrap();
        let e = Allocator::open(range, None, Some(state.clone())).unwrap_err();
        assert!(
            e.to_string()
                .contains("not an isthmus clusterset IP state file"),
            "{e}"
        );
        std::fs::write(
            &state,
            r#"{"version":1,"services":{"ns/a":{"ipv4":"10.9.9.9"},"ns/b":{"ipv4":"127.240.0.9"},"ns/c":{"ipv4":"127.240.0.9"}}}"#,
        )
        .unwrap();
        let mut a = Allocator::open(range, None, Some(state)).unwrap();
        let keys = [key("ns/a"), key("ns/b"), key("ns/c")];
        let (now, saved) = a.sync(&keys);
        saved.unwrap();
        assert_eq!(
            now.get(&keys[1]).unwrap().ipv4,
            Some("127.240.0.9".parse().unwrap())
        );
        let a_ip = now.get(&keys[0]).unwrap().ipv4.unwrap();
        assert!(
            range.contains(IpAddr::V4(a_ip)),
            "out-of-range saved IP replaced"
        );
        assert_ne!(
            now.get(&keys[2]).unwrap().ipv4,
            Some("127.240.0.9".parse().unwrap())
        );
    }
}
