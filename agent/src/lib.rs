//! conntrack-watch node agent.
//!
//! Data flow: [`capture`] reads ctnetlink events from a netlink socket that a
//! classic BPF filter ([`netlink::bpf`]) has already narrowed to the watched
//! ports, decodes them ([`netlink::decode`]), applies the same filter in user
//! space ([`filter`]), counts them ([`metrics`]) and hands batches to the log
//! writer ([`logfile`]). [`http`] serves `/metrics`, `/healthz`, the live
//! lookup API ([`lookup`]) and the query page.

pub mod capture;
pub mod config;
pub mod filter;
pub mod http;
pub mod logfile;
pub mod lookup;
pub mod metrics;
pub mod netlink;
pub mod startup;
pub mod uplink;
