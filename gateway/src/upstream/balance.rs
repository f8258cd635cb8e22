//! Locality-aware load balancing: which target the next attempt of a request
//! goes to. Pure functions over a catalog entry and a rating of each address,
//! tested without sockets.
//!
//! The model is Envoy's, made safe by default:
//! - with `failover_priority` (label names), targets sharing all those labels
//!   with this gateway come first, then those sharing all but the last, and
//!   so on (Istio's failoverPriority); locality orders each such group;
//! - every target (an endpoint here, or a peer gateway) gets a *priority level*
//!   from its locality relative to this gateway's: same subzone (when both
//!   have one), then same zone, then same region,
//!   then the regions of `failover_order` in turn, then anywhere else. At equal
//!   proximity this cluster's endpoints come before peer gateways (no extra hop);
//! - a level's *health* is `overprovisioning × available weight / weight`,
//!   capped at 100 %: with the default 1.4 a level keeps all its traffic until
//!   fewer than 71 % of it is available, then spills the rest, gradually, to
//!   the next level. Down, full and already-tried targets are not available,
//!   so a retry goes to the next level when its own has nothing else;
//! - when the levels together are less healthy than the panic threshold,
//!   health is ignored and every target shares traffic by weight (failing
//!   checks are then more likely wrong than every backend dead);
//! - a target that just came back weighs less for a while (slow start), which
//!   also lowers its level's health: traffic fails back gradually;
//! - the gateways of one cluster (replicas) in a level count as one target
//!   of the level, their announced weights sharing the cluster's part
//!   between them: the cluster stays wholly available while any replica is
//!   (its endpoints are all still there), so losing a replica moves its
//!   traffic to the other replicas, not to the next level, and a returning
//!   replica takes its share back by slow start.
//!
//! A request may be confined to a [`Scope`]: one subset (endpoints with its
//! labels here; gateways that announce it elsewhere) and/or one cluster.
//!
//! Targets are rated and remembered as tried by identity ([`BackendRef`]:
//! address, and SPIFFE ID for a peer gateway), never by address alone: an
//! endpoint here and a peer gateway claiming the same address are two
//! backends with their own health, ejection, slow start and retries.

use std::net::SocketAddr;
use std::sync::Arc;

use isthmus_federation::catalog::{Labels, RemoteGateway, ServiceEntry};
use isthmus_federation::{ClusterName, Locality};
use serde::Serialize;

use super::BackendRef;
use crate::config::model::LocalityPolicy;

/// Where this gateway is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Here {
    /// Its cluster.
    pub cluster: ClusterName,
    /// Its locality.
    pub locality: Locality,
    /// Its labels (the default labels of its endpoints too).
    pub labels: Labels,
}

/// Where to send one attempt of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// An endpoint in this cluster.
    Local(SocketAddr),
    /// A peer gateway in another cluster.
    Remote(GatewayRef),
}

/// A peer gateway of a catalog entry, sharing the entry: choosing one for a
/// request copies no strings.
#[derive(Debug, Clone)]
pub struct GatewayRef {
    entry: Arc<ServiceEntry>,
    index: usize,
}

impl std::ops::Deref for GatewayRef {
    type Target = RemoteGateway;
    fn deref(&self) -> &RemoteGateway {
        &self.entry.remote[self.index]
    }
}

impl PartialEq for GatewayRef {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for GatewayRef {}

impl Target {
    /// The address connected to.
    pub fn addr(&self) -> SocketAddr {
        match self {
            Target::Local(a) => *a,
            Target::Remote(g) => g.address,
        }
    }

    /// Who it is: its address and, for a peer gateway, the SPIFFE ID it must
    /// prove. Backend state is kept by this, never by the address alone.
    pub fn backend(&self) -> BackendRef<'_> {
        match self {
            Target::Local(a) => BackendRef::endpoint(*a),
            Target::Remote(g) => BackendRef::gateway(g.address, &g.spiffe_id),
        }
    }
}

/// How available a target is for one more request or connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Availability {
    /// Healthy and below its limits.
    Up,
    /// Healthy but at a circuit-breaker limit.
    Full,
    /// Failing active health checks, or ejected by outlier detection.
    Down,
}

/// Why a plan has no target for the next attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NoTarget {
    /// Known, but nothing serves it now.
    #[error("no endpoint serves this service")]
    NoEndpoint,
    /// Every backend is at a circuit-breaker limit.
    #[error("every backend of this service is at its limits")]
    Overloaded,
}

/// How many of `keys`, counted from the first, a target's labels (`theirs`)
/// share with this gateway's, subtracted from `keys.len()`: 0 when all
/// match, the first priority (a label absent on both sides matches).
fn label_rank<'a>(
    here: &Labels,
    theirs: impl Fn(&str) -> Option<&'a str>,
    keys: &[String],
) -> usize {
    let matched = keys
        .iter()
        .take_while(|k| here.get(k.as_str()).map(String::as_str) == theirs(k))
        .count();
    keys.len() - matched
}

/// What part of a service a request may go to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Scope<'a> {
    /// Only this subset.
    pub subset: Option<&'a str>,
    /// Only this cluster.
    pub cluster: Option<&'a ClusterName>,
}

/// How one address stands now, from backend protection.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rated {
    /// Up, full or down.
    pub availability: Availability,
    /// Slow start: the share of its weight it carries now, 0.1 to 1.
    pub ramp: f64,
}

impl Rated {
    /// Up with its whole weight.
    pub const UP: Self = Self {
        availability: Availability::Up,
        ramp: 1.0,
    };
}

/// How close a target is to this gateway: what its priority level means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(tag = "proximity", content = "rank", rename_all = "snake_case")]
pub enum Proximity {
    /// Same region, zone and subzone (both have one).
    SameSubzone,
    /// Same region and zone.
    SameZone,
    /// Same region.
    SameRegion,
    /// A region of `failover_order`, by its index there.
    FailoverOrder(usize),
    /// Anywhere else.
    Elsewhere,
}

impl Proximity {
    /// Of a target at `there`, seen from `here`.
    pub fn of(here: &Locality, there: &Locality, failover_order: &[String]) -> Self {
        if here.region() != there.region() {
            return failover_order
                .iter()
                .position(|r| r == there.region())
                .map_or(Self::Elsewhere, Self::FailoverOrder);
        }
        match (here.zone(), there.zone()) {
            (Some(a), Some(b)) if a == b => match (here.subzone(), there.subzone()) {
                (Some(a), Some(b)) if a == b => Self::SameSubzone,
                _ => Self::SameZone,
            },
            _ => Self::SameRegion,
        }
    }

    /// Words for `/debug/explain`.
    pub fn describe(self) -> &'static str {
        match self {
            Self::SameSubzone => "same subzone",
            Self::SameZone => "same zone",
            Self::SameRegion => "same region",
            Self::FailoverOrder(_) => "failover order",
            Self::Elsewhere => "elsewhere",
        }
    }
}

/// Which target of the entry a member is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// `entry.endpoints[i]`
    Endpoint(usize),
    /// `entry.remote[i]`
    Gateway(usize),
}

impl Slot {
    /// Who the target in this slot of `entry` is.
    pub fn backend(self, entry: &ServiceEntry) -> BackendRef<'_> {
        match self {
            Slot::Endpoint(i) => BackendRef::endpoint(entry.endpoints[i]),
            Slot::Gateway(i) => {
                let gw = &entry.remote[i];
                BackendRef::gateway(gw.address, &gw.spiffe_id)
            }
        }
    }

    /// The target in this slot of `entry`.
    pub fn target(self, entry: &Arc<ServiceEntry>) -> Target {
        match self {
            Slot::Endpoint(i) => Target::Local(entry.endpoints[i]),
            Slot::Gateway(index) => Target::Remote(GatewayRef {
                entry: entry.clone(),
                index,
            }),
        }
    }
}

/// One target in a plan.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    /// Which one.
    pub slot: Slot,
    /// Its address.
    pub addr: SocketAddr,
    /// Its configured weight (a peer gateway's announced weight).
    pub weight: u32,
    /// How it stands.
    pub rated: Rated,
    /// This request tried it (this identity) already.
    pub tried: bool,
    /// Its part of its level's weight: its weight, or for a peer gateway
    /// its share of its cluster's one part ([`share_by_cluster`]).
    counted: f64,
    /// Its part of its level's available weight now: 0 when not available,
    /// and slow start applied.
    effective: f64,
}

impl Member {
    /// Whether it may take the next attempt in normal operation.
    fn available(&self) -> bool {
        self.rated.availability == Availability::Up && !self.tried
    }

    /// Its part of its level's available weight now (slow start applied; 0
    /// when not available).
    pub fn effective_weight(&self) -> f64 {
        self.effective
    }
}

/// One priority level.
#[derive(Debug, Clone, PartialEq)]
pub struct Level {
    /// How many `failover_priority` labels, from the last, its targets do not
    /// share with this gateway (0 without a failover priority).
    pub label_rank: usize,
    /// How close its targets are.
    pub proximity: Proximity,
    /// Peer gateways (true) or this cluster's endpoints (false).
    pub remote: bool,
    /// Its targets.
    pub members: Vec<Member>,
    /// Overprovisioned share available, 0 to 1.
    pub health: f64,
    /// Share of the next attempts it gets, 0 to 1.
    pub load: f64,
}

impl Level {
    fn total_weight(&self) -> f64 {
        self.members.iter().map(|m| m.counted).sum()
    }

    fn available_weight(&self) -> f64 {
        self.members.iter().map(|m| m.effective).sum()
    }

    /// Share of the next attempts `member` gets, 0 to 1.
    pub fn member_load(&self, member: &Member, panic: bool, panic_total: f64) -> f64 {
        if panic {
            return if member.rated.availability == Availability::Full || panic_total == 0.0 {
                0.0
            } else {
                member.counted / panic_total
            };
        }
        let available = self.available_weight();
        if available > 0.0 {
            self.load * member.effective / available
        } else {
            0.0
        }
    }
}

/// Where the next attempt of a request may go, and with what odds.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Levels, closest first; levels without targets are left out.
    pub levels: Vec<Level>,
    /// Health is being ignored.
    pub panic: bool,
}

/// The next attempt of a request, to plan: built on the stack per attempt
/// (it only borrows), so planning allocates nothing more than the plan.
#[derive(Debug, Clone, Copy)]
pub struct PlanRequest<'a> {
    /// The service.
    pub entry: &'a ServiceEntry,
    /// The part of it the request may go to.
    pub scope: Scope<'a>,
    /// Leaves peer gateways out (the east-west listener never forwards
    /// onwards).
    pub local_only: bool,
    /// The slots of `entry` this request already tried (every target with
    /// the same identity counts as tried).
    pub tried: &'a [Slot],
}

impl<'a> PlanRequest<'a> {
    /// A first attempt to anywhere in `entry` (peer gateways included).
    pub fn whole(entry: &'a ServiceEntry) -> Self {
        Self {
            entry,
            scope: Scope::default(),
            local_only: false,
            tried: &[],
        }
    }
}

/// Plans `request` for a gateway at `here` under `policy`; `rate` says how
/// each backend stands.
pub fn plan(
    request: PlanRequest<'_>,
    here: &Here,
    policy: &LocalityPolicy,
    rate: impl Fn(BackendRef<'_>) -> Rated,
) -> Plan {
    let PlanRequest {
        entry,
        scope,
        local_only,
        tried,
    } = request;
    let mut levels: Vec<Level> = Vec::new();
    let mut add =
        |label_rank: usize, proximity: Proximity, remote: bool, member: Member| match levels
            .iter_mut()
            .find(|l| l.label_rank == label_rank && l.proximity == proximity && l.remote == remote)
        {
            Some(level) => level.members.push(member),
            None => levels.push(Level {
                label_rank,
                proximity,
                remote,
                members: vec![member],
                health: 0.0,
                load: 0.0,
            }),
        };
    let member = |slot: Slot, addr, weight| {
        let who = slot.backend(entry);
        Member {
            slot,
            addr,
            weight,
            rated: rate(who),
            tried: tried.iter().any(|t| t.backend(entry) == who),
            counted: 0.0,
            effective: 0.0,
        }
    };

    let here_in_scope = scope.cluster.is_none_or(|c| *c == here.cluster);
    let subset = scope.subset.map(|name| entry.subset(name));
    let no_labels = Labels::new();
    if here_in_scope && !matches!(subset, Some(None)) {
        for (i, addr) in entry.endpoints.iter().enumerate() {
            let info = entry.endpoint_info.get(addr);
            let labels = info.map_or(&no_labels, |i| &i.labels);
            if let Some(Some(s)) = subset
                && !s.selects(labels)
            {
                continue;
            }
            let locality = info
                .and_then(|i| i.locality.as_ref())
                .unwrap_or(&here.locality);
            let proximity = Proximity::of(&here.locality, locality, &policy.failover_order);
            let rank = label_rank(
                &here.labels,
                |k| {
                    labels
                        .get(k)
                        .or_else(|| here.labels.get(k))
                        .map(String::as_str)
                },
                &policy.failover_priority,
            );
            let weight = info.map_or(1, |i| i.weight);
            add(
                rank,
                proximity,
                false,
                member(Slot::Endpoint(i), *addr, weight),
            );
        }
    }
    if !local_only {
        for (i, gw) in entry.remote.iter().enumerate() {
            if !in_scope(gw, scope) {
                continue;
            }
            let proximity = Proximity::of(&here.locality, &gw.locality, &policy.failover_order);
            let rank = label_rank(
                &here.labels,
                |k| gw.labels.get(k).map(String::as_str),
                &policy.failover_priority,
            );
            let mut m = member(Slot::Gateway(i), gw.address, gw.weight);
            if !gw.live {
                // Its session closed or its lease lapsed: a last resort only.
                m.rated.availability = Availability::Down;
            }
            add(rank, proximity, true, m);
        }
    }
    levels.sort_by_key(|l| (l.label_rank, l.proximity, l.remote));
    for level in &mut levels {
        if level.remote {
            share_by_cluster(&mut level.members, entry);
        } else {
            for m in &mut level.members {
                m.counted = f64::from(m.weight);
                m.effective = if m.available() {
                    m.counted * m.rated.ramp
                } else {
                    0.0
                };
            }
        }
    }

    let overprovisioning = f64::from(policy.overprovisioning_percent) / 100.0;
    for level in &mut levels {
        let total = level.total_weight();
        level.health = if total > 0.0 {
            (overprovisioning * level.available_weight() / total).min(1.0)
        } else {
            0.0
        };
    }
    let total_health: f64 = levels.iter().map(|l| l.health).sum::<f64>().min(1.0);
    let panic =
        !levels.is_empty() && total_health * 100.0 < f64::from(policy.panic_threshold_percent);
    if !panic {
        let mut remaining = 1.0_f64;
        for level in &mut levels {
            level.load = level.health.min(remaining);
            remaining -= level.load;
        }
        // Less than 100 % healthy in all: scale up so the loads add up to 1.
        if total_health > 0.0 {
            for level in &mut levels {
                level.load /= total_health;
            }
        }
    }
    Plan { levels, panic }
}

/// Weighs the peer gateways of one level by cluster: each cluster is one part
/// of the level, shared among its replicas by their weights. The cluster is
/// as available as its most available replica (a replica that is up carries
/// the cluster alone, its endpoints being the same), and the available
/// replicas share that by weight with slow start applied, so a returning
/// replica ramps up against the one that stood in for it.
fn share_by_cluster(members: &mut [Member], entry: &ServiceEntry) {
    let cluster = |m: &Member| match m.slot {
        Slot::Gateway(i) => Some(&entry.remote[i].cluster),
        Slot::Endpoint(_) => None,
    };
    for i in 0..members.len() {
        if members[..i].iter().any(|m| cluster(m) == cluster(&members[i])) {
            continue; // its cluster is done
        }
        let c = cluster(&members[i]);
        let (mut total, mut available, mut best_ramp) = (0.0, 0.0, 0.0_f64);
        for m in members[i..].iter().filter(|m| cluster(m) == c) {
            total += f64::from(m.weight);
            if m.available() {
                available += f64::from(m.weight) * m.rated.ramp;
                best_ramp = best_ramp.max(m.rated.ramp);
            }
        }
        for m in members[i..].iter_mut().filter(|m| cluster(m) == c) {
            m.counted = if total > 0.0 {
                f64::from(m.weight) / total
            } else {
                0.0
            };
            m.effective = if m.available() && available > 0.0 {
                f64::from(m.weight) * m.rated.ramp / available * best_ramp
            } else {
                0.0
            };
        }
    }
}

/// Plans with `plan` within `scope`, or over the whole service when nothing
/// in `scope` is available, and says which (true: fell back). A route's
/// subset or cluster is a preference, never a reason to fail a request that
/// something else can serve.
pub fn plan_or_fall_back(scope: Scope<'_>, plan: impl Fn(Scope<'_>) -> Plan) -> (Plan, bool) {
    let planned = plan(scope);
    if scope == Scope::default() || planned.has_available() {
        (planned, false)
    } else {
        (plan(Scope::default()), true)
    }
}

/// Whether the gateway serves `scope`.
fn in_scope(gw: &RemoteGateway, scope: Scope<'_>) -> bool {
    scope.cluster.is_none_or(|c| *c == gw.cluster)
        && scope
            .subset
            .is_none_or(|s| gw.subsets.iter().any(|x| x == s))
}

impl Plan {
    /// Whether the plan has any target at all.
    pub fn is_empty(&self) -> bool {
        self.levels.is_empty()
    }

    /// Total configured weight, which shares traffic in panic mode.
    pub fn panic_total(&self) -> f64 {
        self.levels
            .iter()
            .flat_map(|l| &l.members)
            .filter(|m| m.rated.availability != Availability::Full)
            .map(|m| m.counted)
            .sum()
    }

    /// Whether some target is available for the next attempt (a plan without
    /// one sends its attempts to targets that are down, or to none).
    pub fn has_available(&self) -> bool {
        self.levels
            .iter()
            .any(|l| l.members.iter().any(Member::available))
    }

    /// Chooses the next attempt's target with two uniform numbers in [0, 1)
    /// (see [`Draws`]).
    pub fn choose(
        &self,
        entry: &Arc<ServiceEntry>,
        u_level: f64,
        u_member: f64,
    ) -> Result<Target, NoTarget> {
        self.pick(u_level, u_member).map(|slot| slot.target(entry))
    }

    /// [`Self::choose`], saying which slot of the entry it chose.
    pub fn pick(&self, u_level: f64, u_member: f64) -> Result<Slot, NoTarget> {
        if self.levels.is_empty() {
            return Err(NoTarget::NoEndpoint);
        }
        let chosen = if self.panic {
            None
        } else {
            pick_weighted(&self.levels, u_level, |l| l.load).and_then(|level| {
                pick_weighted(
                    level.members.iter().filter(|m| m.available()),
                    u_member,
                    Member::effective_weight,
                )
            })
        };
        let chosen = chosen
            .or_else(|| self.last_resort(u_member, |m| !m.tried))
            .or_else(|| self.last_resort(u_member, |_| true))
            .ok_or(NoTarget::Overloaded)?;
        Ok(chosen.slot)
    }

    /// Panic mode, or nothing available: any target that is not full, by
    /// weight across every level.
    fn last_resort(&self, u: f64, also: impl Fn(&Member) -> bool) -> Option<&Member> {
        pick_weighted(
            self.levels
                .iter()
                .flat_map(|l| &l.members)
                .filter(|m| m.rated.availability != Availability::Full && also(m)),
            u,
            |m| m.counted,
        )
    }
}

/// The uniform numbers in [0, 1) one attempt's choices use.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Draws {
    /// Chooses the priority level.
    pub level: f64,
    /// Chooses the target within it.
    pub member: f64,
    /// Chooses a route's split destination.
    pub split: f64,
}

impl Draws {
    /// For attempt `attempt` of request number `n`: Weyl sequences n·α mod 1
    /// with α the fractional parts of the golden ratio, √2 and √3 (in 64-bit
    /// fixed point, so exact however large `n` grows). They are deterministic
    /// and evenly spread, jointly too, so even a few hundred requests honour
    /// weights closely, which random draws would not.
    pub fn new(n: u64, attempt: u64) -> Self {
        const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;
        const SQRT2: u64 = 0x6A09_E667_F3BC_C908;
        const SQRT3: u64 = 0xBB67_AE85_84CA_A73B;
        let unit = |x: u64| (x >> 11) as f64 / (1u64 << 53) as f64;
        let n = n.wrapping_add(attempt.wrapping_mul(0x1_0000_0001));
        Self {
            level: unit(n.wrapping_mul(GOLDEN)),
            member: unit(n.wrapping_mul(SQRT2)),
            split: unit(n.wrapping_mul(SQRT3)),
        }
    }
}

/// The item whose cumulative weight first exceeds `u` × the total; `None`
/// when nothing weighs anything.
fn pick_weighted<'a, T: 'a>(
    items: impl IntoIterator<Item = &'a T> + Clone,
    u: f64,
    weight: impl Fn(&T) -> f64,
) -> Option<&'a T> {
    let total: f64 = items.clone().into_iter().map(&weight).sum();
    if total <= 0.0 {
        return None;
    }
    let mut point = u.clamp(0.0, 1.0) * total;
    let mut last = None;
    for item in items {
        let w = weight(item);
        if w <= 0.0 {
            continue;
        }
        if point < w {
            return Some(item);
        }
        point -= w;
        last = Some(item);
    }
    last
}

#[cfg(test)]
mod tests;
