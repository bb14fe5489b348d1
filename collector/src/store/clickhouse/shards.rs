//! Direct inserts into the shards' local tables (`storage.cluster.shards`).
//!
//! Without it every insert goes through the `Distributed` tables: the
//! server that receives a flush splits it by the sharding key and relays
//! the other shards' rows over its native protocol (BENCHMARKS.md §5: about
//! 1.8 times the server CPU per record of one server). With it the
//! collector splits each flush itself, the way `Distributed` would, and
//! inserts each shard's rows into that shard's `<table>_local` table on one
//! of its replicas:
//!
//! - The shard of a row: `slot = cityHash64(key) % total_weight`, the shard
//!   whose range of slots holds `slot` (shards in `remote_servers` order,
//!   each owning `weight` consecutive slots), as ClickHouse's `Distributed`
//!   engine chooses (its docs, "Distributed" table engine, sharding key).
//!   The key is the table's sharding key ([`schema`](super::schema):
//!   `snat_ip` for records, `node` for the ledger); its `cityHash64` is
//!   asked of the server itself (one query for the keys a flush has not
//!   met before, in parts within `max_query_size`, then remembered), so the collector can never disagree
//!   with the server's hash function.
//! - A replica: the one that answered last, else the next of its shard
//!   (not for an insert the server refused for its data, which goes back
//!   to the flush as is: see `rejection_code`).
//!   A retry sends the same rows to the same shard, so a replica that
//!   already wrote a block drops the repeat (replicated block
//!   deduplication, shared by the shard's replicas through ZooKeeper).
//! - The materialized view of the pod-address index runs on the local
//!   records table, so the index stays with its records.
//!
//! At start each listed URL is asked which shard of the cluster it is
//! (`system.clusters`, `is_local`): a URL of another shard, or a list whose
//! shard count differs from the cluster's, is refused with a message that
//! names them. A URL that does not answer then is checked at a later
//! start; at least one replica of every shard must answer.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use clickhouse::Row;
use futures_util::future::try_join_all;
use serde::{Deserialize, Serialize};

use super::{ch_err, hex, literal_lists, quote, rejection_code, schema, Inner, StoreError};

/// Past this many remembered hashes the memory is cleared (SNAT addresses
/// and node names are few: one or a few per node).
const MAX_REMEMBERED: usize = 1_000_000;

/// A sharding key value.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum Key {
    /// A `FixedString(16)` address (`snat_ip`).
    Addr([u8; 16]),
    /// A `String` (`node`).
    Text(String),
}

/// An address and its `cityHash64`.
#[derive(Row, Deserialize)]
struct AddrHash {
    k: [u8; 16],
    h: u64,
}

/// Where each shard's local tables are reached.
#[derive(Debug)]
pub(super) struct ShardMap {
    /// Per shard, in `remote_servers` order: the HTTP URLs of its replicas.
    urls: Vec<Vec<String>>,
    /// Slot (`hash % slots.len()`) → shard index.
    slots: Vec<usize>,
    /// Per shard: the replica to try first (the last that answered).
    preferred: Vec<AtomicUsize>,
    /// `cityHash64` of the keys met so far, as the server computed them.
    hashes: Mutex<HashMap<Key, u64>>,
}

/// Slot → shard index for shard weights in order (a weight of 0 owns no
/// slot). Empty when every weight is 0.
pub(super) fn slot_table(weights: &[u32]) -> Vec<usize> {
    let mut out = Vec::new();
    for (i, w) in weights.iter().enumerate() {
        out.extend(std::iter::repeat_n(i, *w as usize));
    }
    out
}

impl ShardMap {
    /// The shard index of a key's hash.
    fn shard_of(&self, hash: u64) -> usize {
        self.slots[(hash % self.slots.len() as u64) as usize]
    }

    /// Shards in the map.
    pub(super) fn shards(&self) -> usize {
        self.urls.len()
    }

    /// The hash of every key in `keys`, asking the server for those not
    /// remembered (one query).
    async fn hashes_of(&self, inner: &Inner, keys: &[&Key]) -> Result<Vec<u64>, StoreError> {
        let missing: HashSet<&Key> = {
            let known = self.hashes.lock().unwrap_or_else(|p| p.into_inner());
            keys.iter()
                .copied()
                .filter(|k| !known.contains_key(k))
                .collect()
        };
        if !missing.is_empty() {
            let (mut addrs, mut texts) = (Vec::new(), Vec::new());
            for k in &missing {
                match k {
                    // Hex text, not a function call per key: 18.16 takes
                    // seconds to analyze thousands of `toFixedString(...)`.
                    Key::Addr(a) => addrs.push(format!("'{}'", hex(a))),
                    Key::Text(t) => texts.push(quote(t)),
                }
            }
            let mut learned: Vec<(Key, u64)> =
                ask_hashes::<AddrHash>(inner, "toFixedString(unhex(h), 16)", &addrs)
                    .await?
                    .into_iter()
                    .map(|r| (Key::Addr(r.k), r.h))
                    .collect();
            learned.extend(
                ask_hashes::<(String, u64)>(inner, "h", &texts)
                    .await?
                    .into_iter()
                    .map(|(t, h)| (Key::Text(t), h)),
            );
            let mut known = self.hashes.lock().unwrap_or_else(|p| p.into_inner());
            if known.len() + learned.len() > MAX_REMEMBERED {
                known.clear();
            }
            known.extend(learned);
        }
        let known = self.hashes.lock().unwrap_or_else(|p| p.into_inner());
        keys.iter()
            .map(|k| {
                known.get(*k).copied().ok_or_else(|| {
                    StoreError::Index(format!(
                        "clickhouse sharding key hash: the server did not hash {k:?}"
                    ))
                })
            })
            .collect()
    }

    /// Insert `rows` into `<table>_local` of the shards their keys choose
    /// (all shards at once; each on one replica, trying its others when one
    /// fails). Rows keep their order within a shard. Errors: a shard none of
    /// whose replicas took its rows (the last replica's error).
    pub(super) async fn insert<R>(
        &self,
        inner: &Inner,
        table: &str,
        rows: &[&R],
        key: impl Fn(&R) -> Key,
    ) -> Result<(), StoreError>
    where
        R: Row + Serialize + Send + Sync,
    {
        if rows.is_empty() {
            return Ok(());
        }
        let keys: Vec<Key> = rows.iter().map(|r| key(r)).collect();
        let refs: Vec<&Key> = keys.iter().collect();
        let hashes = self.hashes_of(inner, &refs).await?;
        let mut per_shard: Vec<Vec<&R>> = vec![Vec::new(); self.shards()];
        for (row, h) in rows.iter().zip(hashes) {
            per_shard[self.shard_of(h)].push(*row);
        }
        let local = format!("{}.{table}{}", inner.cfg.database, schema::LOCAL);
        try_join_all(
            per_shard
                .iter()
                .enumerate()
                .filter(|(_, r)| !r.is_empty())
                .map(|(shard, r)| self.insert_shard(inner, shard, &local, r)),
        )
        .await?;
        Ok(())
    }

    async fn insert_shard<R>(
        &self,
        inner: &Inner,
        shard: usize,
        table: &str,
        rows: &[&R],
    ) -> Result<(), StoreError>
    where
        R: Row + Serialize + Send + Sync,
    {
        let urls = &self.urls[shard];
        let first = self.preferred[shard].load(Ordering::Relaxed) % urls.len();
        let mut last = None;
        for i in 0..urls.len() {
            let replica = (first + i) % urls.len();
            let url = &urls[replica];
            match insert_on(inner, url, table, rows).await {
                Ok(()) => {
                    self.preferred[shard].store(replica, Ordering::Relaxed);
                    return Ok(());
                }
                // Refused for its data: not sent to another replica, which
                // may take it as a duplicate of a part this one wrote before
                // refusing (18.16 runs views after the part) and run no view.
                Err(e) if rejection_code(&e).is_some() => return Err(e),
                Err(e) => {
                    tracing::warn!(shard = shard + 1, url = %url, error = %e,
                        "ClickHouse shard insert failed");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| StoreError::Index("clickhouse: a shard without URLs".into())))
    }
}

async fn insert_on<R>(inner: &Inner, url: &str, table: &str, rows: &[&R]) -> Result<(), StoreError>
where
    R: Row + Serialize + Send + Sync,
{
    let what = |e| ch_err(&format!("insert into {table} at {url}"), e);
    let mut ins = inner
        .client()
        .with_url(url)
        .insert::<R>(table)
        .map_err(what)?;
    for r in rows {
        ins.write(*r).await.map_err(what)?;
    }
    ins.end().await.map_err(what)
}

/// `(value, cityHash64(value))` rows for the string literals, the value
/// being `value` of each (`h`) (one query per list of
/// [`literal_lists`], within the server's `max_query_size`; none for no
/// literals).
async fn ask_hashes<T>(
    inner: &Inner,
    value: &str,
    literals: &[String],
) -> Result<Vec<T>, StoreError>
where
    T: Row + for<'b> Deserialize<'b>,
{
    let mut out = Vec::with_capacity(literals.len());
    for list in literal_lists(literals) {
        let rows: Vec<T> = inner
            .client
            .query(&format!(
                "SELECT k, cityHash64(k) FROM \
                 (SELECT {value} AS k FROM (SELECT arrayJoin([{list}]) AS h))"
            ))
            .fetch_all()
            .await
            .map_err(|e| ch_err("sharding key hash", e))?;
        out.extend(rows);
    }
    Ok(out)
}

/// Why the shard list cannot be used.
pub(super) enum CheckError {
    /// Wrong for good (the message says how).
    Refused(String),
    /// A shard none of whose URLs answered (worth retrying).
    Unreachable(String),
}

/// Check `urls` (per shard, the HTTP URLs of its replicas) against cluster
/// `name` as the server of `inner.cfg.url` defines it, and build the map.
pub(super) async fn check(
    inner: &Inner,
    name: &str,
    urls: &[Vec<String>],
) -> Result<ShardMap, CheckError> {
    let shards: Vec<(u32, u32)> = inner
        .client
        .query(&format!(
            "SELECT shard_num, any(shard_weight) FROM system.clusters WHERE cluster = {} \
             GROUP BY shard_num ORDER BY shard_num",
            quote(name)
        ))
        .fetch_all()
        .await
        .map_err(|e| CheckError::Unreachable(format!("system.clusters: {e}")))?;
    if shards.len() != urls.len() {
        return Err(CheckError::Refused(format!(
            "storage.cluster.shards lists {} shard(s) but cluster {name:?} has {} \
             (in remote_servers order, the HTTP URLs of each shard's replicas)",
            urls.len(),
            shards.len()
        )));
    }
    let slots = slot_table(&shards.iter().map(|s| s.1).collect::<Vec<_>>());
    if slots.is_empty() {
        return Err(CheckError::Refused(format!(
            "cluster {name:?}: every shard has weight 0"
        )));
    }
    let mut preferred = Vec::with_capacity(urls.len());
    for (i, (list, (shard_num, _))) in urls.iter().zip(&shards).enumerate() {
        let mut answered = None;
        let mut errors = Vec::new();
        for (r, url) in list.iter().enumerate() {
            let local: Result<Vec<u32>, _> = inner
                .client
                .clone()
                .with_url(url)
                .query(&format!(
                    "SELECT shard_num FROM system.clusters WHERE cluster = {} AND is_local",
                    quote(name)
                ))
                .fetch_all()
                .await;
            match local {
                Ok(nums) if nums.contains(shard_num) => {
                    answered.get_or_insert(r);
                }
                Ok(nums) => {
                    return Err(CheckError::Refused(format!(
                        "storage.cluster.shards[{i}] lists {url}, but that server is {} of \
                         cluster {name:?}, not shard {shard_num}",
                        match nums.as_slice() {
                            [] => "no shard".to_string(),
                            n => format!(
                                "shard {}",
                                n.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
                            ),
                        }
                    )))
                }
                Err(e) => {
                    tracing::warn!(shard = shard_num, url = %url, error = %e,
                        "ClickHouse shard replica not reachable; not checked");
                    errors.push(format!("{url}: {e}"));
                }
            }
        }
        match answered {
            Some(r) => preferred.push(AtomicUsize::new(r)),
            None => {
                return Err(CheckError::Unreachable(format!(
                    "no replica of shard {shard_num} answered: {}",
                    errors.join("; ")
                )))
            }
        }
    }
    Ok(ShardMap {
        urls: urls.to_vec(),
        slots,
        preferred,
        hashes: Mutex::new(HashMap::new()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_weights_in_order() {
        assert_eq!(slot_table(&[1, 1]), vec![0, 1]);
        assert_eq!(slot_table(&[2, 1]), vec![0, 0, 1]);
        assert_eq!(slot_table(&[1, 0, 3]), vec![0, 2, 2, 2]);
        assert!(slot_table(&[0, 0]).is_empty());
    }
}
