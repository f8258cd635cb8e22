//! Who a backend is: the address connected to and, for a peer gateway, the
//! SPIFFE ID it must prove there.
//!
//! An address alone says nothing of who answers there: a peer chooses the
//! east-west address it advertises, a static peer in the configuration may
//! name any address, and a peer may reuse an address another one left. So
//! every piece of backend state (active health, liveness, outlier ejection,
//! slow start, cuts) is keyed by the identity `(address, SPIFFE ID or none)`:
//! an endpoint in this cluster is `(address, none)`, a peer gateway
//! `(address, its SPIFFE ID)`. A peer's lapsed lease, failed probes or
//! ejection then never touch an endpoint or another peer at the same address.
//!
//! [`ByBackend`] is the map the hot path looks identities up in: indexed by
//! address, then disambiguated by a comparison of SPIFFE IDs among the (almost
//! always single) backends at that address, so a lookup hashes a
//! `SocketAddr` as before and allocates nothing.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;

use isthmus_federation::SpiffeId;

/// A backend's identity, borrowed: what the hot path looks state up by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendRef<'a> {
    /// The address connected to.
    pub addr: SocketAddr,
    /// The SPIFFE ID a peer gateway must prove; `None` for an endpoint in
    /// this cluster.
    pub peer: Option<&'a SpiffeId>,
}

impl<'a> BackendRef<'a> {
    /// An endpoint in this cluster.
    pub fn endpoint(addr: SocketAddr) -> Self {
        Self { addr, peer: None }
    }

    /// A peer gateway.
    pub fn gateway(addr: SocketAddr, id: &'a SpiffeId) -> Self {
        Self {
            addr,
            peer: Some(id),
        }
    }

    /// An owned copy (allocates for a peer gateway).
    pub fn to_owned_id(self) -> BackendId {
        BackendId {
            addr: self.addr,
            peer: self.peer.cloned(),
        }
    }

    /// The `identity` metric label: the SPIFFE ID, empty for an endpoint
    /// (Prometheus treats an empty label as absent).
    pub(crate) fn identity_label(self) -> &'a str {
        self.peer.map_or("", SpiffeId::as_str)
    }
}

impl fmt::Display for BackendRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.peer {
            None => write!(f, "{}", self.addr),
            Some(id) => write!(f, "{} ({id})", self.addr),
        }
    }
}

/// A backend's identity, owned: what state maps and cut signals keep.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendId {
    /// The address connected to.
    pub addr: SocketAddr,
    /// The SPIFFE ID a peer gateway must prove; `None` for an endpoint in
    /// this cluster.
    pub peer: Option<SpiffeId>,
}

impl BackendId {
    /// An endpoint in this cluster.
    pub fn endpoint(addr: SocketAddr) -> Self {
        Self { addr, peer: None }
    }

    /// A peer gateway.
    pub fn gateway(addr: SocketAddr, id: SpiffeId) -> Self {
        Self {
            addr,
            peer: Some(id),
        }
    }

    /// Borrowed, for lookups.
    pub fn as_ref(&self) -> BackendRef<'_> {
        BackendRef {
            addr: self.addr,
            peer: self.peer.as_ref(),
        }
    }
}

impl fmt::Display for BackendId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.as_ref().fmt(f)
    }
}

/// Values by backend identity, looked up without allocating.
#[derive(Debug, Clone)]
pub struct ByBackend<T> {
    /// Every identity at an address, with its value (one, unless several
    /// parties claim the same address).
    by_addr: HashMap<SocketAddr, Vec<(Option<SpiffeId>, T)>>,
}

impl<T> Default for ByBackend<T> {
    fn default() -> Self {
        Self {
            by_addr: HashMap::new(),
        }
    }
}

impl<T> ByBackend<T> {
    /// The value of `id`.
    pub fn get(&self, id: BackendRef<'_>) -> Option<&T> {
        self.by_addr
            .get(&id.addr)?
            .iter()
            .find(|(peer, _)| peer.as_ref() == id.peer)
            .map(|(_, v)| v)
    }

    /// The value of `id`, mutable.
    pub fn get_mut(&mut self, id: BackendRef<'_>) -> Option<&mut T> {
        self.by_addr
            .get_mut(&id.addr)?
            .iter_mut()
            .find(|(peer, _)| peer.as_ref() == id.peer)
            .map(|(_, v)| v)
    }

    /// Whether `id` has a value.
    pub fn contains(&self, id: BackendRef<'_>) -> bool {
        self.get(id).is_some()
    }

    /// The value of `id`, inserting `make()` when it has none.
    pub fn get_or_insert_with(&mut self, id: BackendRef<'_>, make: impl FnOnce() -> T) -> &mut T {
        let at = self.by_addr.entry(id.addr).or_default();
        let i = match at.iter().position(|(peer, _)| peer.as_ref() == id.peer) {
            Some(i) => i,
            None => {
                at.push((id.peer.cloned(), make()));
                at.len() - 1
            }
        };
        &mut at[i].1
    }

    /// Sets the value of `id`.
    pub fn insert(&mut self, id: BackendRef<'_>, value: T) {
        let at = self.by_addr.entry(id.addr).or_default();
        match at.iter_mut().find(|(peer, _)| peer.as_ref() == id.peer) {
            Some((_, v)) => *v = value,
            None => at.push((id.peer.cloned(), value)),
        }
    }

    /// Every identity with its value.
    pub fn iter(&self) -> impl Iterator<Item = (BackendRef<'_>, &T)> {
        self.by_addr.iter().flat_map(|(addr, at)| {
            at.iter().map(move |(peer, v)| {
                (
                    BackendRef {
                        addr: *addr,
                        peer: peer.as_ref(),
                    },
                    v,
                )
            })
        })
    }

    /// Every identity with its value, mutable.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (BackendRef<'_>, &mut T)> {
        self.by_addr.iter_mut().flat_map(|(addr, at)| {
            at.iter_mut().map(move |(peer, v)| {
                (
                    BackendRef {
                        addr: *addr,
                        peer: peer.as_ref(),
                    },
                    v,
                )
            })
        })
    }

    /// Every value.
    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.by_addr.values().flatten().map(|(_, v)| v)
    }

    /// Keeps only the identities `keep` says yes to.
    pub fn retain(&mut self, mut keep: impl FnMut(BackendRef<'_>, &mut T) -> bool) {
        self.by_addr.retain(|addr, at| {
            at.retain_mut(|(peer, v)| {
                keep(
                    BackendRef {
                        addr: *addr,
                        peer: peer.as_ref(),
                    },
                    v,
                )
            });
            !at.is_empty()
        });
    }

    /// Addresses more than one identity has a value at, with how many.
    pub fn shared_addresses(&self) -> impl Iterator<Item = (SocketAddr, usize)> + '_ {
        self.by_addr
            .iter()
            .filter(|(_, at)| at.len() > 1)
            .map(|(addr, at)| (*addr, at.len()))
    }

    /// How many identities have a value.
    pub fn len(&self) -> usize {
        self.by_addr.values().map(Vec::len).sum()
    }

    /// Whether no identity has a value.
    pub fn is_empty(&self) -> bool {
        self.by_addr.is_empty()
    }
}
