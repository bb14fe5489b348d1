//! The ClickHouse schema (version [`VERSION`]) and its start-up check.
//!
//! Written for ClickHouse 18.16 (Debian 12) and later: `MergeTree` with a
//! `Date` partition key (retention drops whole days with
//! `ALTER TABLE ... DROP PARTITION`), addresses as `FixedString(16)`, and
//! nothing newer (no `IPv6`, `LowCardinality`, codecs, TTL, skip indexes).
//!
//! | table | sorting key | holds |
//! |---|---|---|
//! | `ctw_records` | (snat_ip, snat_port, event_us) | every record, by day |
//! | `ctw_records_by_pod` | (src_ip, event_us) | for pod-address searches: each record's pod address, time and SNAT address and port (6 columns), filled by the view `ctw_records_by_pod_mv` |
//! | `ctw_batches` | (node, boot_id, seq) | the ledger of stored batches (exactly once across collectors) |
//! | `ctw_gaps` | (node, from_ns) | loss gaps |
//! | `ctw_schema` | - | the schema version, one row per collector start that created it |
//!
//! At start the collector creates what is missing, then compares the
//! columns of every table with this version's and the version in
//! `ctw_schema`: a database written by another version is refused with a
//! message that names both (no migration exists yet: version 1 is the
//! first).

use std::sync::Arc;

use super::Inner;

/// The schema version this collector writes.
pub const VERSION: u32 = 1;

pub const RECORDS: &str = "ctw_records";
pub const BY_POD: &str = "ctw_records_by_pod";
pub const BY_POD_VIEW: &str = "ctw_records_by_pod_mv";
pub const BATCHES: &str = "ctw_batches";
pub const GAPS: &str = "ctw_gaps";
pub const SCHEMA: &str = "ctw_schema";

/// Tables partitioned by day (`day Date`), dropped by retention.
pub const DAY_PARTITIONED: [&str; 4] = [RECORDS, BY_POD, BATCHES, GAPS];

/// Columns of the record tables, in order, with their types.
pub const RECORD_COLUMN_TYPES: [(&str, &str); 27] = [
    ("day", "Date"),
    ("family", "UInt8"),
    ("snat_ip", "FixedString(16)"),
    ("snat_port", "UInt16"),
    ("event_us", "UInt64"),
    ("node", "String"),
    ("kind", "UInt8"),
    ("protocol", "UInt8"),
    ("zone", "UInt16"),
    ("src_ip", "FixedString(16)"),
    ("src_port", "UInt16"),
    ("dst_ip", "FixedString(16)"),
    ("dst_port", "UInt16"),
    ("reply_src_ip", "FixedString(16)"),
    ("reply_src_port", "UInt16"),
    ("mark", "UInt32"),
    ("status", "UInt32"),
    ("tcp_state", "UInt8"),
    ("tcp_flags_orig", "UInt8"),
    ("tcp_flags_reply", "UInt8"),
    ("present", "UInt8"),
    ("start_us", "UInt64"),
    ("stop_us", "UInt64"),
    ("orig_packets", "UInt64"),
    ("orig_bytes", "UInt64"),
    ("reply_packets", "UInt64"),
    ("reply_bytes", "UInt64"),
];

/// Column names of the record tables, in order.
pub const RECORD_COLUMNS: [&str; 27] = {
    let mut out = [""; 27];
    let mut i = 0;
    while i < 27 {
        out[i] = RECORD_COLUMN_TYPES[i].0;
        i += 1;
    }
    out
};

/// Columns of the pod-address index `ctw_records_by_pod`, in order.
pub const POD_INDEX_COLUMN_TYPES: [(&str, &str); 6] = [
    ("day", "Date"),
    ("family", "UInt8"),
    ("src_ip", "FixedString(16)"),
    ("event_us", "UInt64"),
    ("snat_ip", "FixedString(16)"),
    ("snat_port", "UInt16"),
];

const BATCH_COLUMN_TYPES: [(&str, &str); 6] = [
    ("day", "Date"),
    ("node", "String"),
    ("boot_id", "String"),
    ("seq", "UInt64"),
    ("records", "UInt32"),
    ("stored_us", "UInt64"),
];

const GAP_COLUMN_TYPES: [(&str, &str); 7] = [
    ("day", "Date"),
    ("node", "String"),
    ("from_ns", "UInt64"),
    ("to_ns", "UInt64"),
    ("reason", "String"),
    ("count", "UInt64"),
    ("seen_ns", "UInt64"),
];

/// Why the schema check failed.
#[derive(Debug)]
pub enum Error {
    /// The server could not be asked (down, refused, timed out, bad
    /// credentials): worth retrying.
    Unreachable(String),
    /// The database holds something this version must not write into.
    Refused(String),
}

impl From<String> for Error {
    fn from(m: String) -> Error {
        Error::Unreachable(m)
    }
}

fn columns(cols: &[(&str, &str)]) -> String {
    cols.iter()
        .map(|(n, t)| format!("{n} {t}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The `CREATE` statements of this version, in order.
pub fn create_statements(db: &str) -> Vec<String> {
    let rec = columns(&RECORD_COLUMN_TYPES);
    vec![
        format!("CREATE DATABASE IF NOT EXISTS {db}"),
        format!(
            "CREATE TABLE IF NOT EXISTS {db}.{RECORDS} ({rec}) ENGINE = MergeTree \
             PARTITION BY day ORDER BY (snat_ip, snat_port, event_us)"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {db}.{BY_POD} ({}) ENGINE = MergeTree \
             PARTITION BY day ORDER BY (src_ip, event_us)",
            columns(&POD_INDEX_COLUMN_TYPES)
        ),
        format!(
            "CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.{BY_POD_VIEW} TO {db}.{BY_POD} \
             AS SELECT {} FROM {db}.{RECORDS}",
            POD_INDEX_COLUMN_TYPES
                .iter()
                .map(|c| c.0)
                .collect::<Vec<_>>()
                .join(", ")
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {db}.{BATCHES} ({}) ENGINE = MergeTree \
             PARTITION BY day ORDER BY (node, boot_id, seq)",
            columns(&BATCH_COLUMN_TYPES)
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {db}.{GAPS} ({}) ENGINE = MergeTree \
             PARTITION BY day ORDER BY (node, from_ns)",
            columns(&GAP_COLUMN_TYPES)
        ),
        format!("CREATE TABLE IF NOT EXISTS {db}.{SCHEMA} (version UInt32) ENGINE = TinyLog"),
    ]
}

/// Check the database against this version, creating what is missing.
pub(super) async fn ensure(inner: Arc<Inner>) -> Result<(), Error> {
    let db = inner.cfg.database.clone();
    let client = &inner.client;
    let unreachable = |e: clickhouse::error::Error| Error::Unreachable(e.to_string());
    let version: String = client
        .query("SELECT version()")
        .fetch_one()
        .await
        .map_err(unreachable)?;
    // Nothing newer than 18.16 is used yet; features of later versions
    // (codecs, TTL, IPv6) would be chosen here by this version.
    tracing::info!(server_version = %version, database = %db, "ClickHouse reachable");
    // What is there before anything is created.
    let tables: Vec<String> = client
        .query(&format!(
            "SELECT name FROM system.tables WHERE database = {}",
            super::quote(&db)
        ))
        .fetch_all()
        .await
        .map_err(unreachable)?;
    let had_records = tables.iter().any(|t| t == RECORDS);
    if had_records && !tables.iter().any(|t| t == SCHEMA) {
        return Err(Error::Refused(format!(
            "ClickHouse database {db} has a table {RECORDS} but no {SCHEMA}: written by \
             an unknown (older) version; this collector writes schema version {VERSION}. \
             Use another storage.database, or drop the database to start afresh"
        )));
    }
    if had_records {
        let versions: Vec<u32> = client
            .query(&format!("SELECT DISTINCT version FROM {db}.{SCHEMA}"))
            .fetch_all()
            .await
            .map_err(unreachable)?;
        if versions.iter().any(|&v| v != VERSION) {
            return Err(Error::Refused(format!(
                "ClickHouse database {db} holds conntrack-watch schema version(s) {versions:?}; \
                 this collector writes version {VERSION} and cannot migrate them. Use another \
                 storage.database, or the collector version that wrote it"
            )));
        }
    }
    // Tables already there must have this version's columns: checked
    // before anything is created, so a refused database is left as it was.
    for (table, want) in [
        (RECORDS, &RECORD_COLUMN_TYPES[..]),
        (BY_POD, &POD_INDEX_COLUMN_TYPES[..]),
        (BATCHES, &BATCH_COLUMN_TYPES[..]),
        (GAPS, &GAP_COLUMN_TYPES[..]),
    ] {
        if !tables.iter().any(|t| t == table) {
            continue;
        }
        let have: Vec<(String, String)> = client
            .query(&format!(
                // In table order (18.16 has no `position` column).
                "SELECT name, type FROM system.columns WHERE database = {} AND table = {}",
                super::quote(&db),
                super::quote(table)
            ))
            .fetch_all()
            .await
            .map_err(unreachable)?;
        let want: Vec<(String, String)> = want
            .iter()
            .map(|(n, t)| (n.to_string(), t.to_string()))
            .collect();
        if have != want {
            let diff = want
                .iter()
                .zip(have.iter().map(Some).chain(std::iter::repeat(None)))
                .find(|(w, h)| Some(*w) != *h)
                .map(|(w, h)| format!("expected column {} {}, found {:?}", w.0, w.1, h))
                .unwrap_or_else(|| format!("{} columns, expected {}", have.len(), want.len()));
            return Err(Error::Refused(format!(
                "ClickHouse table {db}.{table} does not have schema version {VERSION}'s \
                 columns ({diff}); it was written by another version. Use another \
                 storage.database, or drop the table"
            )));
        }
    }
    for sql in create_statements(&db) {
        client
            .query(&sql)
            .execute()
            .await
            .map_err(|e| Error::Unreachable(format!("{e} (running {sql})")))?;
    }
    let n: u64 = client
        .query(&format!("SELECT count() FROM {db}.{SCHEMA}"))
        .fetch_one()
        .await
        .map_err(unreachable)?;
    if n == 0 {
        client
            .query(&format!(
                "INSERT INTO {db}.{SCHEMA} (version) VALUES ({VERSION})"
            ))
            .execute()
            .await
            .map_err(unreachable)?;
    }
    Ok(())
}
