//! `GET /debug/explain?service=<ns>/<svc>`: which clusters and endpoints serve
//! a service now, at which priority, with what share of new requests, and
//! why each one gets traffic or not. It runs the same planning as requests do.

use std::net::SocketAddr;
use std::time::Instant;

use isthmus_federation::catalog::{Catalog, ServiceEntry, ServiceKey};
use serde::Serialize;

use super::balance::{
    Availability, Level, Member, Plan, PlanRequest, Scope, Slot, plan_or_fall_back,
};
use super::{BackendRef, ServiceBackends, Upstreams, Use};
use crate::config::model::LocalityPolicy;
use crate::config::traffic::{HeaderMatch, SplitTarget};
use crate::config::upstream::UpstreamConfig;

/// The whole answer.
#[derive(Debug, Serialize)]
pub struct Explain {
    /// `namespace/name`.
    pub service: String,
    /// This gateway's cluster and locality.
    pub gateway: GatewayView,
    /// The locality policy in force.
    pub policy: LocalityPolicy,
    /// Whether the whole service is in panic mode now.
    pub panic: bool,
    /// Where requests go: one destination per route split, or the whole
    /// service when it has no routes.
    pub destinations: Vec<DestinationView>,
}

/// This gateway.
#[derive(Debug, Serialize)]
pub struct GatewayView {
    /// Its cluster.
    pub cluster: String,
    /// Its locality.
    pub locality: String,
}

/// One destination of the service's routes.
#[derive(Debug, Serialize)]
pub struct DestinationView {
    /// The route rule it belongs to (index); none for the whole service,
    /// where requests go when the service has no routes or no rule matches.
    pub rule: Option<usize>,
    /// The rule's header matches.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatch>,
    /// The subset it is confined to.
    pub subset: Option<String>,
    /// The cluster it is confined to.
    pub cluster: Option<String>,
    /// Its share of the rule's requests, in percent.
    pub weight_percent: f64,
    /// Nothing in the destination is available: its requests go to the
    /// whole service.
    pub fell_back: bool,
    /// Health is being ignored.
    pub panic: bool,
    /// Priority levels, closest first.
    pub levels: Vec<LevelView>,
}

/// One priority level.
#[derive(Debug, Serialize)]
pub struct LevelView {
    /// 0 is the first choice.
    pub priority: usize,
    /// `failover_priority` labels (counted from the last) its targets do not
    /// share with this gateway; 0 without a failover priority.
    pub labels_unmatched: usize,
    /// `same subzone`, `same zone`, `same region`, `failover order` or
    /// `elsewhere`.
    pub reason: &'static str,
    /// Peer gateways (true) or endpoints in this cluster (false).
    pub remote: bool,
    /// Overprovisioned share available, percent.
    pub health_percent: f64,
    /// Share of new requests, percent.
    pub load_percent: f64,
    /// Its targets.
    pub targets: Vec<TargetView>,
}

/// One target.
#[derive(Debug, Serialize)]
pub struct TargetView {
    /// `endpoint` (in this cluster) or `gateway` (a peer's).
    pub kind: &'static str,
    /// Its cluster.
    pub cluster: String,
    /// Its address.
    pub address: SocketAddr,
    /// The SPIFFE ID a peer gateway must prove; absent for an endpoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// Its locality.
    pub locality: String,
    /// `up`, `down` or `full`.
    pub state: &'static str,
    /// Why it gets the traffic it gets.
    pub reasons: Vec<String>,
    /// Configured weight.
    pub weight: u32,
    /// Weight with slow start applied.
    pub effective_weight: f64,
    /// Share of new requests, percent.
    pub load_percent: f64,
}

/// What one explanation looks at throughout: the service, its backends and
/// the policy in force.
#[derive(Clone, Copy)]
struct Subject<'a> {
    entry: &'a ServiceEntry,
    backends: &'a ServiceBackends,
    policy: &'a UpstreamConfig,
}

/// One destination of a route rule (or the whole service).
struct Destination<'a> {
    /// Where it confines requests.
    target: &'a SplitTarget,
    /// The rule's index; none for the whole service.
    rule: Option<usize>,
    /// The rule's header matches.
    headers: &'a [HeaderMatch],
    /// Its share of the rule's requests, 0 to 1.
    share: f64,
}

/// One target of a plan, with the level it is in and the share it gets.
struct Placed<'a> {
    level: &'a Level,
    member: &'a Member,
    load: f64,
}

fn percent(x: f64) -> f64 {
    (x * 1000.0).round() / 10.0
}

impl Upstreams {
    /// Explains how `key` is served now; `None` when the catalog has no such service.
    pub fn explain(&self, catalog: &Catalog, key: &ServiceKey) -> Option<Explain> {
        let entry = catalog.get(key)?;
        let policy = self.policy();
        let backends = self.service(key);
        let subject = Subject {
            entry,
            backends: &backends,
            policy: &policy,
        };
        let mut destinations = Vec::new();
        let routes = self.routes(key);
        let whole = SplitTarget {
            subset: None,
            cluster: None,
            weight: 1,
        };
        let rules = routes.as_ref().map_or(&[][..], |r| &r.rules[..]);
        for (i, rule) in rules.iter().enumerate() {
            let total: u32 = rule.split.iter().map(|t| t.weight).sum();
            for target in &rule.split {
                let share = f64::from(target.weight) / f64::from(total.max(1));
                destinations.push(self.destination(
                    subject,
                    Destination {
                        target,
                        rule: Some(i),
                        headers: &rule.headers,
                        share,
                    },
                ));
            }
        }
        // Without routes, or when no rule matches every request, requests
        // also go to the whole service.
        if rules.iter().all(|rule| !rule.headers.is_empty()) {
            destinations.push(self.destination(
                subject,
                Destination {
                    target: &whole,
                    rule: None,
                    headers: &[],
                    share: 1.0,
                },
            ));
        }
        let whole_plan =
            self.plan_uncounted(&backends, PlanRequest::whole(entry), Use::Http, &policy);
        Some(Explain {
            service: key.to_string(),
            gateway: GatewayView {
                cluster: self.here.cluster.to_string(),
                locality: self.here.locality.to_string(),
            },
            policy: policy.locality.clone(),
            panic: whole_plan.panic,
            destinations,
        })
    }

    fn destination(&self, subject: Subject<'_>, destination: Destination<'_>) -> DestinationView {
        let Destination {
            target,
            rule,
            headers,
            share,
        } = destination;
        let scope = Scope {
            subset: target.subset.as_deref(),
            cluster: target.cluster.as_ref(),
        };
        let (planned, fell_back) = plan_or_fall_back(scope, |scope| {
            let request = PlanRequest {
                scope,
                ..PlanRequest::whole(subject.entry)
            };
            self.plan_uncounted(subject.backends, request, Use::Http, subject.policy)
        });
        DestinationView {
            rule,
            headers: headers.to_vec(),
            subset: target.subset.clone(),
            cluster: target.cluster.as_ref().map(ToString::to_string),
            weight_percent: percent(share),
            fell_back,
            panic: planned.panic,
            levels: self.levels(subject, &planned),
        }
    }

    fn levels(&self, subject: Subject<'_>, plan: &Plan) -> Vec<LevelView> {
        let panic_total = plan.panic_total();
        let now = Instant::now();
        plan.levels
            .iter()
            .enumerate()
            .map(|(priority, level)| {
                let loads: Vec<f64> = level
                    .members
                    .iter()
                    .map(|m| level.member_load(m, plan.panic, panic_total))
                    .collect();
                LevelView {
                    priority,
                    labels_unmatched: level.label_rank,
                    reason: level.proximity.describe(),
                    remote: level.remote,
                    health_percent: percent(level.health),
                    // In panic mode too: what its targets get.
                    load_percent: percent(loads.iter().sum()),
                    targets: level
                        .members
                        .iter()
                        .zip(loads)
                        .map(|(member, load)| {
                            let placed = Placed {
                                level,
                                member,
                                load,
                            };
                            self.target_view(subject, plan, placed, now)
                        })
                        .collect(),
                }
            })
            .collect()
    }

    fn target_view(
        &self,
        subject: Subject<'_>,
        plan: &Plan,
        placed: Placed<'_>,
        now: Instant,
    ) -> TargetView {
        let Subject {
            entry, backends, ..
        } = subject;
        let Placed {
            level,
            member: m,
            load,
        } = placed;
        let (kind, cluster, locality, live) = match m.slot {
            Slot::Endpoint(_) => {
                let locality = entry
                    .endpoint_info
                    .get(&m.addr)
                    .and_then(|i| i.locality.as_ref())
                    .unwrap_or(&self.here.locality);
                (
                    "endpoint",
                    self.here.cluster.to_string(),
                    locality.to_string(),
                    true,
                )
            }
            Slot::Gateway(i) => {
                let gw = &entry.remote[i];
                (
                    "gateway",
                    gw.cluster.to_string(),
                    gw.locality.to_string(),
                    gw.live,
                )
            }
        };
        let mut reasons = Vec::new();
        if !live {
            reasons.push("its peering session closed or its lease lapsed".to_owned());
        }
        let who = m.slot.backend(entry);
        let (healthy, ejected_for) = self.backend_state(backends, who, now);
        if !healthy {
            reasons.push("fails active health checks".to_owned());
        }
        if let Some(secs) = ejected_for {
            reasons.push(format!("ejected by outlier detection for {secs:.1}s more"));
        }
        let state = match m.rated.availability {
            Availability::Up => "up",
            Availability::Full => {
                reasons.push("at its circuit-breaker limits".to_owned());
                "full"
            }
            Availability::Down => "down",
        };
        if m.rated.ramp < 1.0 {
            reasons.push(format!(
                "slow start: carries {:.0}% of its weight",
                m.rated.ramp * 100.0
            ));
        }
        if plan.panic {
            reasons.push(
                "panic mode: too few backends are available, so health is ignored".to_owned(),
            );
        } else if m.rated.availability == Availability::Up && level.load == 0.0 {
            reasons.push("a closer priority level has enough available capacity".to_owned());
        }
        if load > 0.0 {
            reasons.push(format!("gets {:.1}% of new requests", load * 100.0));
        } else if m.rated.availability != Availability::Up && !plan.panic {
            reasons.push("gets no new requests (only as a last resort)".to_owned());
        }
        TargetView {
            kind,
            cluster,
            address: m.addr,
            identity: who.peer.map(ToString::to_string),
            locality,
            state,
            reasons,
            weight: m.weight,
            effective_weight: (m.effective_weight() * 100.0).round() / 100.0,
            load_percent: percent(load),
        }
    }

    /// Active health and the remaining ejection of `service`'s backend `id`.
    fn backend_state(
        &self,
        service: &ServiceBackends,
        id: BackendRef<'_>,
        now: Instant,
    ) -> (bool, Option<f64>) {
        let healthy = self.health.read().get(id).is_none_or(|h| h.is_healthy());
        let ejected_for = service
            .backends
            .load()
            .get(id)
            .and_then(|b| b.outlier.lock().ejected_until())
            .filter(|until| *until > now)
            .map(|until| (until - now).as_secs_f64());
        (healthy, ejected_for)
    }
}
