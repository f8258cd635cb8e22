//! The Isthmus data plane on Pingora and the `isthmus` binary's building blocks:
//! typed configuration, the admin API, metrics, logging and process lifecycle.
//!
//! Module map:
//! - [`cli`]: the command line and exit codes; [`devpki`]: `isthmus ca`;
//!   [`demo`]: `isthmus demo`, a self-contained federation on loopback;
//! - [`config`]: two-stage typed configuration (file + environment);
//! - [`server`]: `isthmus run`, assembling Pingora services from the config;
//! - [`lifecycle`]: signals, reload, drain, systemd notification;
//! - [`health`]: readiness conditions and in-flight tracking;
//! - [`trust`]: SVID, bundles, peer policy at run time; [`bundle_endpoint`]: the
//!   SPIFFE bundle endpoint;
//! - [`discovery`]: the discovery sources' supervisor and the watched-file source;
//! - [`limits`]: connection caps and the header deadline of every HTTP listener;
//! - [`admin`]: the admin HTTP API; [`metrics`]: the Prometheus registry;
//! - [`logging`]: JSON / text / journald output for `tracing` and `log`.
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
pub mod trust;
pub mod upstream;
