//! The ClickHouse schema (version [`VERSION`]) and its start-up check.
//!
//! Written for ClickHouse 18.16 (Debian 12) and later: `MergeTree` with a
//! `Date` partition key (retention drops whole days with
//! `ALTER TABLE ... DROP PARTITION`), addresses as `FixedString(16)`, and
//! no type newer than 18.16 (no `IPv6`, `LowCardinality`; no TTL or skip
//! indexes). On a server of [`CODECS_SINCE`] or later (its `version()`,
//! [`Features`]) every column of the records and pod-address tables gets
//! a compression codec ([`RECORD_CODECS`], [`POD_INDEX_CODECS`]); names
//! and types stay the same, so the check below and the rows are the same
//! on every version. Codecs are set when a table is created: tables that
//! exist keep theirs (nothing is altered), e.g. after a server upgrade
//! from 18.16 new parts of old tables still use the server's compression.
//!
//! | table | sorting key | holds |
//! |---|---|---|
//! | `ctw_records` | (snat_ip, snat_port, event_us) | every record, by day |
//! | `ctw_records_by_pod` | (src_ip, event_us) | for pod-address searches: each record's pod address, time and SNAT address and port (6 columns), filled by the view `ctw_records_by_pod_mv` |
//! | `ctw_batches` | (node, boot_id, seq) | the ledger of stored batches (exactly once across collectors) |
//! | `ctw_gaps` | (node, from_ns) | loss gaps |
//! | `ctw_schema` | - | the schema version, one row per collector start that created it |
//!
//! Cluster mode (`storage.cluster` set): every table above keeps its name
//! but is a `Distributed` table over the `<table>_local` tables of the cluster,
//! which are `ReplicatedMergeTree` (ZooKeeper path
//! `<zookeeper_path>/<database>/<table>`, replica `{replica}`: the
//! `{shard}`/`{replica}` macros of each server), all created `ON CLUSTER`:
//!
//! | table | sharded by | why |
//! |---|---|---|
//! | `ctw_records` | `cityHash64(snat_ip)` | one reverse-SNAT lookup reads one shard's granules (the others answer empty quickly) |
//! | `ctw_records_by_pod` | same as its records (the view runs on the shard that stores them) | a pod's pairs are spread over shards: a pod search asks every shard |
//! | `ctw_batches` | `cityHash64(node)` | a (node, boot id, seq) lives on one shard, replicated on its replicas: every collector's lookup through `Distributed` reads every shard and finds it |
//! | `ctw_gaps` | `cityHash64(node)` | the same, read whole by every search |
//! | `ctw_schema` | - (`TinyLog` on each server) | the version, checked on the server a collector talks to |
//!
//! At start the collector creates what is missing, then compares the
//! columns of every table with this version's and the version in
//! `ctw_schema`: a database written by another version is refused with a
//! message that names both (no migration exists yet). Version 2 stores
//! the kernel's start and stop times relative to the event time
//! (`start_before_us`, `stop_after_us`: about 6 bytes per record less on 18.16,
//! BENCHMARKS.md §5); version 1 (absolute `start_us`, `stop_us`) was never
//! released and is refused.

use std::sync::Arc;

use super::Inner;

/// The schema version this collector writes.
pub const VERSION: u32 = 2;

pub const RECORDS: &str = "ctw_records";
pub const BY_POD: &str = "ctw_records_by_pod";
pub const BY_POD_VIEW: &str = "ctw_records_by_pod_mv";
pub const BATCHES: &str = "ctw_batches";
pub const GAPS: &str = "ctw_gaps";
pub const SCHEMA: &str = "ctw_schema";

/// Tables partitioned by day (`day Date`), dropped by retention (in
/// cluster mode their `_local` tables).
pub const DAY_PARTITIONED: [&str; 4] = [RECORDS, BY_POD, BATCHES, GAPS];

/// Suffix of the local (`ReplicatedMergeTree`) tables in cluster mode.
pub const LOCAL: &str = "_local";

/// Where the tables live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// One server: `MergeTree` tables (the default).
    Single,
    /// A ClickHouse cluster: `Distributed` over `ReplicatedMergeTree`.
    Cluster {
        /// The `remote_servers` name.
        name: String,
        /// ZooKeeper path prefix of the replicated tables (holds `{shard}`).
        zookeeper_path: String,
    },
}

impl Layout {
    /// The table that holds the rows of `table` on a server (`table` itself
    /// on a single server, `<table>_local` in a cluster).
    pub fn local(&self, table: &str) -> String {
        match self {
            Layout::Single => table.to_string(),
            Layout::Cluster { .. } => format!("{table}{LOCAL}"),
        }
    }

    /// ` ON CLUSTER name` in a cluster, else nothing.
    fn on_cluster(&self) -> String {
        match self {
            Layout::Single => String::new(),
            Layout::Cluster { name, .. } => format!(" ON CLUSTER {name}"),
        }
    }

    /// The engine `ctw_records` has in this layout (as `system.tables` names it).
    fn records_engine(&self) -> &'static str {
        match self {
            Layout::Single => "MergeTree",
            Layout::Cluster { .. } => "Distributed",
        }
    }
}

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
    ("start_before_us", "Int64"),
    ("stop_after_us", "Int64"),
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

/// The first ClickHouse version whose tables get column codecs: 20.3, the
/// first long-term-support release with every codec used here (codecs
/// came in 19.1, `T64` in 19.10; 20.3's stable releases fixed codecs on
/// compact parts, which 20.3 introduced). Older servers (Debian 12's
/// 18.16) get the same columns with the server's part compression.
pub const CODECS_SINCE: (u32, u32) = (20, 3);

/// What the server can do beyond 18.16 that the schema uses, decided by
/// its `version()` when the store opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Features {
    /// Per-column codecs ([`RECORD_CODECS`], [`POD_INDEX_CODECS`]): server
    /// [`CODECS_SINCE`] or later.
    pub codecs: bool,
}

impl Features {
    /// The features of a server whose `version()` is `version`
    /// (`major.minor.patch[.build]`, e.g. `18.16.1` or `26.9.2.1`). A
    /// version that does not parse gets none (today's 18.16 schema).
    pub fn of_version(version: &str) -> Features {
        let mut parts = version.trim().split('.').map(|p| p.parse::<u32>().ok());
        let (Some(Some(major)), Some(Some(minor))) = (parts.next(), parts.next()) else {
            return Features::default();
        };
        Features {
            codecs: (major, minor) >= CODECS_SINCE,
        }
    }
}

/// Codecs of the records table's columns on servers with
/// [`Features::codecs`], one per column so the part compression configured
/// on the server does not matter. Chosen by measurement (BENCHMARKS.md
/// section 5, `bench/clickhouse_codecs.py`): for each column the smallest
/// of LZ4, ZSTD(1), ZSTD(3), T64 and Delta before ZSTD, preferring ZSTD(1)
/// within 0.02 bytes per record. Times and ports sorted within a
/// (SNAT address, port) key: `T64` for `event_us` (Delta does worse: the
/// key changes every few rows), `Delta` for `snat_port`.
pub const RECORD_CODECS: [(&str, &str); 27] = [
    ("day", "ZSTD(1)"),
    ("family", "ZSTD(1)"),
    ("snat_ip", "ZSTD(1)"),
    ("snat_port", "Delta, ZSTD(1)"),
    ("event_us", "T64, ZSTD(1)"),
    ("node", "ZSTD(3)"),
    ("kind", "T64, ZSTD(1)"),
    ("protocol", "ZSTD(1)"),
    ("zone", "ZSTD(1)"),
    ("src_ip", "ZSTD(1)"),
    ("src_port", "T64, ZSTD(1)"),
    ("dst_ip", "ZSTD(1)"),
    ("dst_port", "ZSTD(1)"),
    ("reply_src_ip", "ZSTD(1)"),
    ("reply_src_port", "ZSTD(1)"),
    ("mark", "ZSTD(1)"),
    ("status", "T64, ZSTD(1)"),
    ("tcp_state", "T64, ZSTD(1)"),
    ("tcp_flags_orig", "ZSTD(1)"),
    ("tcp_flags_reply", "ZSTD(1)"),
    ("present", "T64, ZSTD(1)"),
    ("start_before_us", "ZSTD(1)"),
    ("stop_after_us", "ZSTD(1)"),
    ("orig_packets", "ZSTD(1)"),
    ("orig_bytes", "ZSTD(1)"),
    ("reply_packets", "ZSTD(1)"),
    ("reply_bytes", "ZSTD(1)"),
];

/// Codecs of the pod-address index's columns, as [`RECORD_CODECS`]:
/// `event_us` is sorted within a pod address, so `Delta`.
pub const POD_INDEX_CODECS: [(&str, &str); 6] = [
    ("day", "ZSTD(1)"),
    ("family", "ZSTD(1)"),
    ("src_ip", "ZSTD(1)"),
    ("event_us", "Delta, ZSTD(1)"),
    ("snat_ip", "ZSTD(1)"),
    ("snat_port", "ZSTD(1)"),
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

/// The column list of a `CREATE TABLE`: `name Type`, with
/// `CODEC(...)` from `codecs` for the columns it names.
fn columns(cols: &[(&str, &str)], codecs: &[(&str, &str)]) -> String {
    cols.iter()
        .map(|(n, t)| match codecs.iter().find(|c| c.0 == *n) {
            Some((_, codec)) => format!("{n} {t} CODEC({codec})"),
            None => format!("{n} {t}"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The `CREATE` statements of this version for `layout` on a server with
/// `features`, in order. Column names and types do not depend on
/// `features` (the check above compares them); only the codecs of the
/// records and pod-address tables do (their `_local` tables in a cluster:
/// `Distributed` tables store nothing; the ledger and gap tables, about one
/// row per batch, keep the server's compression).
pub fn create_statements(db: &str, layout: &Layout, features: Features) -> Vec<String> {
    let on = layout.on_cluster();
    let codecs = |c| if features.codecs { c } else { &[][..] };
    // (table, columns, sorting key, sharding key, codecs)
    let tables = [
        (
            RECORDS,
            &RECORD_COLUMN_TYPES[..],
            "snat_ip, snat_port, event_us",
            "cityHash64(snat_ip)",
            codecs(&RECORD_CODECS[..]),
        ),
        (
            BY_POD,
            &POD_INDEX_COLUMN_TYPES[..],
            "src_ip, event_us",
            "cityHash64(snat_ip)",
            codecs(&POD_INDEX_CODECS[..]),
        ),
        (
            BATCHES,
            &BATCH_COLUMN_TYPES[..],
            "node, boot_id, seq",
            "cityHash64(node)",
            &[][..],
        ),
        (
            GAPS,
            &GAP_COLUMN_TYPES[..],
            "node, from_ns",
            "cityHash64(node)",
            &[][..],
        ),
    ];
    let mut out = vec![format!("CREATE DATABASE IF NOT EXISTS {db}{on}")];
    for (table, col_types, order, shard_by, codecs) in tables {
        let cols = columns(col_types, &[]);
        let stored_cols = columns(col_types, codecs);
        let local = layout.local(table);
        let engine = match layout {
            Layout::Single => "MergeTree".to_string(),
            Layout::Cluster { zookeeper_path, .. } => format!(
                "ReplicatedMergeTree('{}/{db}/{table}', '{{replica}}')",
                zookeeper_path.trim_end_matches('/')
            ),
        };
        out.push(format!(
            "CREATE TABLE IF NOT EXISTS {db}.{local}{on} ({stored_cols}) ENGINE = {engine} \
             PARTITION BY day ORDER BY ({order})"
        ));
        if let Layout::Cluster { name, .. } = layout {
            out.push(format!(
                "CREATE TABLE IF NOT EXISTS {db}.{table}{on} ({cols}) \
                 ENGINE = Distributed({name}, {db}, {local}, {shard_by})"
            ));
        }
        if table == BY_POD {
            // The view runs where the records are stored: on each shard.
            out.push(format!(
                "CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.{BY_POD_VIEW}{on} TO {db}.{local} \
                 AS SELECT {} FROM {db}.{}",
                POD_INDEX_COLUMN_TYPES
                    .iter()
                    .map(|c| c.0)
                    .collect::<Vec<_>>()
                    .join(", "),
                layout.local(RECORDS),
            ));
        }
    }
    out.push(format!(
        "CREATE TABLE IF NOT EXISTS {db}.{SCHEMA}{on} (version UInt32) ENGINE = TinyLog"
    ));
    out
}

/// How long the start-up check may take: `timeout_ms`, and in a cluster
/// at least 2 minutes (each `ON CLUSTER` statement waits until every
/// server ran it from the ZooKeeper queue: seconds each).
pub fn ensure_timeout(cfg: &super::ClickHouseOptions) -> std::time::Duration {
    let ms = match cfg.cluster {
        None => cfg.timeout_ms,
        Some(_) => cfg.timeout_ms.max(120_000),
    };
    std::time::Duration::from_millis(ms)
}

/// Every table and view `create_statements` makes for `layout`.
fn all_tables(layout: &Layout) -> Vec<String> {
    let mut out = vec![BY_POD_VIEW.to_string(), SCHEMA.to_string()];
    for t in DAY_PARTITIONED {
        out.push(t.to_string());
        out.push(layout.local(t));
    }
    out.sort();
    out.dedup();
    out
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
    // Columns and types are the same on every version (18.16 has no
    // IPv6, TTL, LowCardinality); newer servers get column codecs.
    let features = Features::of_version(&version);
    tracing::info!(server_version = %version, database = %db, codecs = features.codecs,
        "ClickHouse reachable");
    let layout = inner.cfg.layout();
    if let (Layout::Cluster { name, .. }, Some(c)) = (&layout, &inner.cfg.cluster) {
        // Replicas of each shard, as the server's remote_servers has them.
        let shards: Vec<(u32, u64)> = client
            .query(&format!(
                "SELECT shard_num, count() FROM system.clusters WHERE cluster = {} \
                 GROUP BY shard_num ORDER BY shard_num",
                super::quote(name)
            ))
            .fetch_all()
            .await
            .map_err(unreachable)?;
        let Some(replicas) = shards.iter().map(|s| s.1).min() else {
            return Err(Error::Refused(format!(
                "storage.cluster.name: the ClickHouse server at {} has no cluster {name:?} \
                 in its remote_servers",
                inner.cfg.url
            )));
        };
        let quorum = c.insert_quorum.map_or(replicas, u64::from);
        if quorum > replicas {
            return Err(Error::Refused(format!(
                "storage.cluster.insert_quorum is {quorum} but cluster {name:?} has shards of \
                 {replicas} replica(s): no insert could succeed"
            )));
        }
        let quorum = if quorum > 1 { quorum as u32 } else { 0 };
        inner
            .quorum
            .store(quorum, std::sync::atomic::Ordering::SeqCst);
        tracing::info!(cluster = %name, shards = shards.len(), replicas, insert_quorum = quorum,
            "ClickHouse cluster");
    }
    // What is there before anything is created.
    let tables: Vec<(String, String)> = client
        .query(&format!(
            "SELECT name, engine FROM system.tables WHERE database = {}",
            super::quote(&db)
        ))
        .fetch_all()
        .await
        .map_err(unreachable)?;
    if let Some((_, engine)) = tables.iter().find(|t| t.0 == RECORDS) {
        if engine != layout.records_engine() {
            return Err(Error::Refused(format!(
                "ClickHouse table {db}.{RECORDS} is a {engine} table but this collector is \
                 configured for {} (storage.cluster {}): use another storage.database, or \
                 the layout that wrote it",
                layout.records_engine(),
                if matches!(layout, Layout::Single) {
                    "unset"
                } else {
                    "set"
                }
            )));
        }
    }
    let tables: Vec<String> = tables.into_iter().map(|t| t.0).collect();
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
    // In a cluster each statement is a trip through the ZooKeeper queue to
    // every server: skipped when this server has every table already.
    let complete = matches!(layout, Layout::Cluster { .. })
        && all_tables(&layout).iter().all(|t| tables.contains(t));
    let statements = if complete {
        Vec::new()
    } else {
        create_statements(&db, &layout, features)
    };
    for sql in statements {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_server_gets_merge_trees_and_a_cluster_distributed_over_replicated() {
        let single = create_statements("d", &Layout::Single, Features::default());
        assert!(single.iter().all(|s| !s.contains("ON CLUSTER")));
        assert!(single.iter().all(|s| !s.contains("Distributed")));
        assert!(single.iter().any(|s| s.starts_with(
            "CREATE TABLE IF NOT EXISTS d.ctw_records (day Date, family UInt8, snat_ip FixedString(16)"
        ) && s.ends_with(
            "ENGINE = MergeTree PARTITION BY day ORDER BY (snat_ip, snat_port, event_us)"
        )));
        let layout = Layout::Cluster {
            name: "c".into(),
            zookeeper_path: "/ch/{shard}/".into(),
        };
        let cl = create_statements("d", &layout, Features::default());
        assert!(cl.iter().all(|s| s.contains(" ON CLUSTER c")));
        let find = |prefix: &str| {
            cl.iter()
                .find(|s| s.starts_with(prefix))
                .cloned()
                .unwrap_or_default()
        };
        assert!(
            find("CREATE TABLE IF NOT EXISTS d.ctw_records_local ").ends_with(
                "ENGINE = ReplicatedMergeTree('/ch/{shard}/d/ctw_records', '{replica}') \
             PARTITION BY day ORDER BY (snat_ip, snat_port, event_us)"
            )
        );
        for (table, key) in [
            ("ctw_records", "cityHash64(snat_ip)"),
            ("ctw_records_by_pod", "cityHash64(snat_ip)"),
            ("ctw_batches", "cityHash64(node)"),
            ("ctw_gaps", "cityHash64(node)"),
        ] {
            let d = find(&format!("CREATE TABLE IF NOT EXISTS d.{table} ON CLUSTER"));
            assert!(
                d.ends_with(&format!("ENGINE = Distributed(c, d, {table}_local, {key})")),
                "{d}"
            );
        }
        // The view fills the local pod index from the local records, and
        // comes after both.
        let view = cl
            .iter()
            .position(|s| s.contains("MATERIALIZED VIEW"))
            .unwrap_or(0);
        assert!(cl[view].contains("TO d.ctw_records_by_pod_local AS SELECT"));
        assert!(cl[view].ends_with("FROM d.ctw_records_local"));
        assert!(cl[..view]
            .iter()
            .any(|s| s.contains("d.ctw_records_by_pod_local ON CLUSTER")));
        let mut tables = all_tables(&layout);
        tables.sort();
        assert_eq!(tables.len(), 10);
    }
}

#[cfg(test)]
mod codec_tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use std::io::{Read as _, Write as _};

    #[test]
    fn versions_before_20_3_get_todays_ddl_and_later_ones_codecs() {
        for v in ["18.16.1", "19.17.4.11", "20.2.1", "", "dev", "20"] {
            assert_eq!(Features::of_version(v), Features::default(), "{v}");
        }
        for v in ["20.3.1.2", "21.8.15.7", "26.9.2.1", "100.1"] {
            assert!(Features::of_version(v).codecs, "{v}");
        }
        let cluster = Layout::Cluster {
            name: "c".into(),
            zookeeper_path: "/ch/{shard}".into(),
        };
        for layout in [Layout::Single, cluster] {
            let old = create_statements("d", &layout, Features::of_version("18.16.1"));
            assert!(old.iter().all(|s| !s.contains("CODEC")), "{old:#?}");
            let new = create_statements("d", &layout, Features::of_version("26.9.2.1"));
            assert_eq!(old.len(), new.len());
            for (o, n) in old.iter().zip(&new) {
                let stored = [RECORDS, BY_POD].iter().any(|t| {
                    n.starts_with(&format!(
                        "CREATE TABLE IF NOT EXISTS d.{} ",
                        layout.local(t)
                    ))
                });
                if stored {
                    // Every column has its codec; without them the
                    // statement is the old one.
                    let codecs = if n.contains(&layout.local(BY_POD)) {
                        &POD_INDEX_CODECS[..]
                    } else {
                        &RECORD_CODECS[..]
                    };
                    assert_eq!(n.matches(" CODEC(").count(), codecs.len(), "{n}");
                    let mut stripped = n.clone();
                    for (_, c) in codecs {
                        stripped = stripped.replacen(&format!(" CODEC({c})"), "", 1);
                    }
                    assert_eq!(&stripped, o);
                } else {
                    assert_eq!(n, o, "only the records and pod-address tables get codecs");
                }
            }
        }
        // Each codec names a column of its table, in the table's order.
        fn names(c: &[(&'static str, &'static str)]) -> Vec<&'static str> {
            c.iter().map(|c| c.0).collect()
        }
        assert_eq!(names(&RECORD_CODECS), names(&RECORD_COLUMN_TYPES));
        assert_eq!(names(&POD_INDEX_CODECS), names(&POD_INDEX_COLUMN_TYPES));
    }

    /// The Python of a venv with `chdb` (ClickHouse's current engine
    /// in-process): `CTW_CHDB_PYTHON`, else the venv `scripts/test.sh`
    /// installs.
    fn chdb_python() -> Option<String> {
        let python = std::env::var("CTW_CHDB_PYTHON").unwrap_or_else(|_| {
            format!(
                "{}/.cache/ctw/chdb-venv/bin/python",
                std::env::var("HOME").unwrap_or_default()
            )
        });
        let ok = std::process::Command::new(&python)
            .args(["-c", "import chdb"])
            .output()
            .is_ok_and(|o| o.status.success());
        ok.then_some(python)
    }

    /// One chunk-encoded or sized HTTP request body in `buf` (after the
    /// head), or `None` while incomplete.
    fn http_body(head: &str, buf: &[u8]) -> Option<Vec<u8>> {
        let head = head.to_ascii_lowercase();
        if !head.contains("transfer-encoding: chunked") {
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            return (buf.len() >= len).then(|| buf[..len].to_vec());
        }
        let (mut body, mut at) = (Vec::new(), 0);
        loop {
            let eol = at + buf[at..].windows(2).position(|w| w == b"\r\n")?;
            let size_text = std::str::from_utf8(&buf[at..eol]).ok()?;
            let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
            let start = eol + 2;
            if buf.len() < start + size + 2 {
                return None;
            }
            if size == 0 {
                return Some(body);
            }
            body.extend_from_slice(&buf[start..start + size]);
            at = start + size + 2;
        }
    }

    /// Accept one HTTP request on `listener`, answer 200 with no body;
    /// returns the request's head and body.
    fn capture_request(listener: std::net::TcpListener) -> (String, Vec<u8>) {
        let (mut s, _) = listener.accept().unwrap();
        let (mut buf, mut chunk) = (Vec::new(), vec![0u8; 1 << 16]);
        let mut head: Option<(String, usize)> = None;
        loop {
            if let Some((h, at)) = &head {
                if let Some(body) = http_body(h, &buf[*at..]) {
                    s.write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    )
                    .unwrap();
                    return (h.clone(), body);
                }
            }
            let n = s.read(&mut chunk).unwrap();
            assert!(n > 0, "request ended early");
            buf.extend_from_slice(&chunk[..n]);
            if head.is_none() {
                if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    head = Some((String::from_utf8_lossy(&buf[..p]).into_owned(), p + 4));
                }
            }
        }
    }

    /// Records of every shape `RecordRow` has: IPv4, IPv6, IPv4-mapped
    /// IPv6, extreme counters and times, a node name with quotes and
    /// non-ASCII; sorted by the records table's key.
    fn rows() -> Vec<super::super::row::RecordRow> {
        use ctw_common::{ConnRecord, Counters, EventKind, Protocol, TcpState, Tuple};
        use std::net::{IpAddr, Ipv4Addr};
        let v4 = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1));
        let snat4 = IpAddr::V4(Ipv4Addr::new(198, 19, 255, 254));
        let mapped = IpAddr::V6(Ipv4Addr::new(198, 18, 0, 2).to_ipv6_mapped());
        let v6: IpAddr = "fd00::1".parse().unwrap();
        let snat6: IpAddr = "fd00:ffff::2".parse().unwrap();
        let mut out = Vec::new();
        for (i, (src, snat)) in [(v4, snat4), (mapped, mapped), (v6, snat6)]
            .into_iter()
            .enumerate()
        {
            for k in 0..3u64 {
                let event_ns = 1_764_000_000_000_000_000 + k * 1_000_000_007_000 + i as u64;
                let event_ns = event_ns - event_ns % 1000;
                let mut r = ConnRecord::new(
                    [EventKind::New, EventKind::Destroy, EventKind::Recovered][k as usize],
                    event_ns,
                    [Protocol::Tcp, Protocol::Udp, Protocol::UdpLite][k as usize],
                    Tuple::new(src, 40000 + k as u16, snat, 443),
                    Tuple::new(snat, 443, snat, 1024 + k as u16),
                );
                r.zone = k as u16;
                r.mark = u32::MAX - k as u32;
                r.status = 0x1ff;
                r.tcp_state = (k == 1).then_some(TcpState::Other(200));
                r.tcp_flags_orig = 0xff;
                r.start_ns = Some(event_ns - 5_000_000_000 * k);
                r.stop_ns = (k == 1).then_some(event_ns + 1000);
                r.counters_orig = Some(Counters {
                    packets: u64::MAX,
                    bytes: u64::MAX - k,
                });
                r.counters_reply = (k != 2).then_some(Counters {
                    packets: 3,
                    bytes: 180,
                });
                out.push(super::super::row::RecordRow::from_record(
                    ["node-01", "nœud 'à' \"q\" \\", ""][k as usize],
                    &r,
                ));
            }
        }
        out.sort_by(|a, b| {
            (a.snat_ip, a.snat_port, a.event_us).cmp(&(b.snat_ip, b.snat_port, b.event_us))
        });
        out
    }

    const CHDB_SCRIPT: &str = r#"
import sys
from chdb import session
data, ddl, rows, structure, out = sys.argv[1:6]
s = session.Session(data)
for sql in open(ddl).read().split("\n"):
    if sql.strip():
        s.query(sql)
s.query(f"INSERT INTO ctw.ctw_records SELECT * FROM file('{rows}', 'RowBinary', '{structure}')")
back = s.query("SELECT * FROM ctw.ctw_records ORDER BY snat_ip, snat_port, event_us", "RowBinary")
open(out, "wb").write(back.bytes())
print(s.query("SELECT version()", "TSV").bytes().decode().strip())
print(s.query("SELECT count() FROM ctw.ctw_records_by_pod", "TSV").bytes().decode().strip())
for t in ["ctw_records", "ctw_records_by_pod"]:
    print(s.query(f"SELECT name, type, compression_codec FROM system.columns WHERE database = 'ctw' AND table = '{t}' ORDER BY position", "TSV").bytes().decode(), end="")
s.close()
"#;

    /// The collector's DDL for a server with codecs runs on ClickHouse
    /// 26.9 (chdb, in-process) with the types the start-up check expects;
    /// rows the collector encodes (`RecordRow`, the `clickhouse` crate's
    /// RowBinary as sent to the server) go in and come back byte for byte,
    /// and the view fills the pod index.
    #[test]
    fn codec_ddl_and_record_rows_work_on_current_clickhouse() {
        let Some(python) = chdb_python() else {
            ctw_testkit::skip(
                "needs chdb (scripts/test.sh installs it: pip install chdb into ~/.cache/ctw/chdb-venv)",
            );
            return;
        };
        let rows = rows();
        // The crate's own encoding, captured from the insert it sends.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = std::thread::spawn(move || capture_request(listener));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let client = clickhouse::Client::default()
                .with_url(&url)
                .with_compression(clickhouse::Compression::None);
            let mut insert = client.insert(RECORDS).unwrap();
            for r in &rows {
                insert.write(r).await.unwrap();
            }
            insert.end().await.unwrap();
        });
        let (head, body) = server.join().unwrap();
        // The insert names the columns in table order.
        let quoted: Vec<String> = RECORD_COLUMNS
            .iter()
            .map(|c| format!("%60{c}%60"))
            .collect();
        assert!(
            head.contains(&format!(
                "INSERT+INTO+{RECORDS}%28{}%29+FORMAT+RowBinary",
                quoted.join("%2C")
            )),
            "{head}"
        );
        let dir = std::env::temp_dir().join(format!("ctw-chdb-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ddl = create_statements("ctw", &Layout::Single, Features::of_version("26.9.2.1"));
        std::fs::write(dir.join("ddl.sql"), ddl.join("\n")).unwrap();
        std::fs::write(dir.join("rows.bin"), &body).unwrap();
        let out = std::process::Command::new(&python)
            .arg("-c")
            .arg(CHDB_SCRIPT)
            .arg(dir.join("data"))
            .arg(dir.join("ddl.sql"))
            .arg(dir.join("rows.bin"))
            .arg(columns(&RECORD_COLUMN_TYPES, &[]))
            .arg(dir.join("back.bin"))
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "chdb: {}\n{stdout}",
            String::from_utf8_lossy(&out.stderr)
        );
        let back = std::fs::read(dir.join("back.bin")).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(!body.is_empty());
        assert!(back == body, "rows read back differ from the rows inserted");
        let mut lines = stdout.lines();
        let version = lines.next().unwrap_or_default();
        assert!(Features::of_version(version).codecs, "{version}");
        assert_eq!(
            lines.next(),
            Some(rows.len().to_string().as_str()),
            "pod index rows"
        );
        // (name, type, codec) as ClickHouse reports them: the types the
        // start-up check compares, and every column with a codec.
        let cols: Vec<Vec<&str>> = lines.map(|l| l.split('\t').collect()).collect();
        let want: Vec<(&str, &str)> = RECORD_COLUMN_TYPES
            .iter()
            .chain(&POD_INDEX_COLUMN_TYPES)
            .copied()
            .collect();
        assert_eq!(
            cols.iter().map(|c| (c[0], c[1])).collect::<Vec<_>>(),
            want,
            "{stdout}"
        );
        assert!(cols.iter().all(|c| c[2].starts_with("CODEC(")), "{stdout}");
    }
}
