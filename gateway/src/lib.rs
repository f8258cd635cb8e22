//! The Isthmus data plane on Pingora and the `isthmus` binary's building blocks:
//! typed configuration, the admin API, metrics, logging and process lifecycle.
//!
//! Module map (no two modules use each other, even through others:
//! `gateway/tests/module_graph.rs` prints the graph and fails on any circle):
//! - [`cli`]: the command line; [`exit`]: the exit codes and the typed start-up
//!   errors mapped to them; [`devpki`]: `isthmus ca`; [`demo`]: `isthmus demo`,
//!   a self-contained federation on loopback;
//! - [`server`]: `isthmus run`: loads the configuration, builds the Pingora
//!   services from it and runs them;
//! - [`lifecycle`]: signals, reload, binary upgrade, readiness probes, systemd
//!   notification;
//! - [`config`]: two-stage typed configuration (file + environment);
//! - [`federation`]: the peering hub, listener and diallers in the process;
//!   [`discovery`]: the discovery sources' supervisor and the watched-file source;
//! - [`dns`]: the `clusterset.local` DNS server and the clusterset listeners;
//! - [`proxy`]: the listeners (outbound, east-west, TCP) and their request
//!   logic; [`upstream`]: backends' health, outlier ejection, leases and the
//!   per-attempt plan; [`mesh`]: the connector that opens east-west connections;
//! - [`trust`]: SVID, bundles, peer policy at run time; [`bundle_endpoint`]: the
//!   SPIFFE bundle endpoint;
//! - [`limits`]: connection caps and the header deadline of every HTTP listener;
//! - [`health`]: readiness conditions and in-flight tracking;
//! - [`admin`]: the admin HTTP API; [`metrics`]: the Prometheus registry;
//!   [`telemetry`]: request spans exported over OTLP;
//! - [`logging`]: JSON / text / journald output for `tracing` and `log`;
//! - [`net`]: listening sockets made by hand (SO_REUSEPORT, freebind).
#![forbid(unsafe_code)]

pub mod admin;
pub mod bundle_endpoint;
pub mod cli;
pub mod config;
pub mod demo;
pub mod devpki;
pub mod discovery;
pub mod dns;
pub mod exit;
pub mod federation;
pub mod health;
pub mod lifecycle;
pub mod limits;
pub mod logging;
pub mod mesh;
pub mod metrics;
pub mod net;
pub mod proxy;
pub mod server;
pub mod telemetry;
pub mod trust;
pub mod upstream;
