//! Tantivy-backed store: see the module docs of `store`.
