//! Prometheus metric definitions shared by the agent and the collector.
//! Metrics are defined once at start-up from static names and help texts,
//! so an invalid definition or a second registration is a programming
//! error, not an input error: both panic at start-up.

use prometheus::core::Collector;
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// Register a newly defined metric and return it.
pub fn register<M: Collector + Clone + 'static>(r: &Registry, m: prometheus::Result<M>) -> M {
    let m = m.expect("static metric definition");
    r.register(Box::new(m.clone()))
        .expect("metric registered once");
    m
}

pub fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    register(r, IntCounter::new(name, help))
}

pub fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    register(r, IntGauge::new(name, help))
}

pub fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(r, IntCounterVec::new(Opts::new(name, help), labels))
}
