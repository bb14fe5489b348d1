//! conntrack-watch collector: receives record batches from agents over one
//! mTLS gRPC stream each, stores them durably in a tantivy index, and serves
//! the cluster-wide search API and live lookups proxied to agents.

pub mod answer;
pub mod auth;
pub mod certs;
pub mod config;
pub mod grpc_query;
pub mod http;
pub mod ingest;
pub mod metrics;
pub mod peers;
pub mod pods;
pub mod query;
pub mod registry;
pub mod resolve;
pub mod store;
pub mod tls;
pub mod ui;
