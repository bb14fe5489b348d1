//! conntrack-watch collector: receives record batches from agents over one
//! mTLS gRPC stream each, stores them durably in a tantivy index, and serves
//! the cluster-wide search API and live lookups proxied to agents.

pub mod config;
pub mod store;
