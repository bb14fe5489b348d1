//! Pod names for pod IPs, as of a connection's time (issue 13).
//!
//! The collector watches Pods cluster-wide (one watch per collector, see
//! [`watch`]) and keeps, per pod IP, the intervals in which each pod (by
//! UID) held it ([`history`]), durable under `<storage.path>/pods/`
//! ([`journal`]). [`PodHistory`] is the shared handle: the watch task feeds
//! it [`Input`]s; answers ask it [`PodHistory::answer`] /
//! [`PodHistory::at`] / [`PodHistory::for_hit`].
//!
//! Owners are resolved to the workload from metadata-only watches of
//! ReplicaSets and Jobs: ReplicaSet → its Deployment, Job → its CronJob;
//! StatefulSet, DaemonSet and any other controller kind are the workload
//! themselves. A pod seen before its owner is named by its direct owner
//! until the owner's metadata arrives, then upgraded.

pub mod history;
pub mod journal;
pub mod watch;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::Path;
use std::sync::Mutex;

use history::{Change, History};
pub use history::{
    Gap, NoPodReason, PodAnswer, PodFilter, PodRef, PodState, Stats, Tenure, Workload,
};
use journal::{Journal, JournalError};

use crate::store::Hit;

/// Heartbeats (journal write + fsync) and compaction checks run this often:
/// a crash loses at most this much of the journal, and the restart's gap
/// starts at the last heartbeat, so the lost window is never answered as
/// verified.
pub const SYNC_INTERVAL_MS: u64 = 1_000;

/// After a watch failure with no pod event since, the watch counts as
/// re-established once no failure was reported for this long: kube-rs
/// reports every failed attempt and retries at most 30 s apart
/// (`DefaultBackoff`), plus up to 30 s for the attempt itself to fail. A
/// resumed watch replays what it missed, so only the timing within the gap
/// is uncertain.
pub const QUIET_AFTER_FAILURE_MS: u64 = 90_000;

/// How old a live kernel entry without a start time (no
/// `nf_conntrack_timestamp`) is taken to be at most: 5 days, the default
/// `nf_conntrack_tcp_timeout_established` (432000 s), the longest idle
/// timeout of an entry. A connection kept busy for longer than that can be
/// older; its pod is then checked over the last 5 days only.
pub const MAX_ENTRY_AGE_NS: u64 = 432_000 * 1_000_000_000;

/// Workload kind and name of a pod without a controller owner in
/// [`PodHistory::workload_counts`] (a pod's own name is never a label).
pub const NO_WORKLOAD: &str = "_none";

/// A label set of `ctw_collector_workload_new_connections_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WorkloadKey {
    pub namespace: String,
    /// `Deployment`, `StatefulSet`, ... or [`NO_WORKLOAD`].
    pub kind: String,
    pub name: String,
    /// The original tuple's destination port (the port the pod connected to).
    pub port: u16,
}

/// What the watch task reports, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A (re-)list of pods begins (`watcher::Event::Init`).
    ListBegin,
    /// A pod of the list (`InitApply`): intervals of pods first seen here
    /// start at their `status.startTime`.
    Listed(PodState),
    /// The list is complete (`InitDone`): live pods not listed were deleted
    /// unseen; an open gap ends here.
    ListDone,
    /// A pod was added or modified (`Apply`).
    Applied(PodState),
    /// A pod was deleted (`Delete`): its last state.
    Deleted(PodState),
    /// The watch failed (connection, 410 Gone, an error event): events from
    /// here until the next list or event may be missing or late.
    Broken,
    /// A ReplicaSet / Job's metadata: (kind, namespace, name) → its
    /// controller owner (Deployment / CronJob) if any.
    Owner {
        kind: String,
        namespace: String,
        name: String,
        owner: Option<Workload>,
    },
    /// A ReplicaSet / Job was deleted.
    OwnerGone {
        kind: String,
        namespace: String,
        name: String,
    },
}

/// Errors of the pod history.
#[derive(Debug, thiserror::Error)]
pub enum PodsError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("kubernetes: {0}")]
    Kube(String),
}

type OwnerKey = (String, String, String); // (kind, namespace, name)

#[derive(Debug, Default)]
struct Inner {
    history: History,
    journal: Option<Journal>,
    /// ReplicaSet / Job → its controller owner (None: it is the workload).
    owners: HashMap<OwnerKey, Option<Workload>>,
    /// Live pods named by an owner whose metadata has not arrived yet.
    unresolved: HashMap<OwnerKey, Vec<u128>>,
    /// UIDs seen by the current list (between ListBegin and ListDone).
    listing: Option<HashSet<u128>>,
    /// The history is complete up to here (last healthy moment); `None`
    /// while the watch is broken or before the first list.
    alive_ns: Option<u64>,
    /// Where the current gap started (the watch broke, or the last
    /// heartbeat before a restart); `None` when there is none.
    gap_since: Option<u64>,
    /// The last watch failure while the gap is open.
    last_failure_ns: Option<u64>,
    /// Journal write errors (the history in memory stays right; the disk
    /// copy misses lines until a compaction succeeds).
    journal_errors: u64,
    bad_lines: u64,
    retention_ns: u64,
}

/// What [`PodHistory::stats`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryStats {
    pub history: Stats,
    /// Open intervals.
    pub live: usize,
    /// All intervals kept.
    pub intervals: usize,
    pub gaps: usize,
    /// Journal writes that failed.
    pub journal_errors: u64,
    /// Journal lines that did not parse at start-up.
    pub bad_lines: u64,
}

/// The shared pod history: `Sync`, cheap to query under a mutex.
#[derive(Debug)]
pub struct PodHistory {
    inner: Mutex<Inner>,
}

impl PodHistory {
    /// A history in memory only (tests; `kubernetes.enabled: false` keeps
    /// none at all).
    pub fn in_memory(retention_ns: u64) -> PodHistory {
        PodHistory {
            inner: Mutex::new(Inner {
                retention_ns,
                gap_since: Some(0),
                ..Inner::default()
            }),
        }
    }

    /// Open the durable history in `dir` (`<storage.path>/pods`), replaying
    /// it, with the default bound on closed intervals
    /// ([`history::DEFAULT_MAX_CLOSED`]). The time since its last heartbeat
    /// (or, for a new history, since the epoch) becomes a gap once the
    /// first list completes.
    pub fn open(dir: &Path, retention_ns: u64) -> Result<PodHistory, PodsError> {
        Self::open_bounded(dir, retention_ns, history::DEFAULT_MAX_CLOSED)
    }

    /// [`PodHistory::open`] keeping at most `max_closed` closed intervals
    /// (`kubernetes.max_closed_intervals`): a journal holding more (written
    /// with a larger bound, or closes since the last compaction) is cut to
    /// the bound and rewritten at once.
    pub fn open_bounded(
        dir: &Path,
        retention_ns: u64,
        max_closed: usize,
    ) -> Result<PodHistory, PodsError> {
        let mut history = History::new(max_closed);
        let (mut journal, loaded) = Journal::open(dir, &mut history)?;
        let mut evicted = Vec::new();
        history.enforce_bound(&mut evicted);
        if !evicted.is_empty() {
            journal.compact(&history, loaded.alive_ns)?;
        }
        Ok(PodHistory {
            inner: Mutex::new(Inner {
                history,
                journal: Some(journal),
                gap_since: Some(loaded.alive_ns.unwrap_or(0)),
                bad_lines: loaded.bad_lines,
                retention_ns,
                ..Inner::default()
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Apply one watch input observed at `now_ns` (ns since the epoch).
    pub fn apply(&self, input: Input, now_ns: u64) {
        let mut g = self.lock();
        let g = &mut *g;
        let mut out = Vec::new();
        match input {
            Input::ListBegin => g.listing = Some(HashSet::new()),
            Input::Listed(mut pod) => {
                if let Some(l) = g.listing.as_mut() {
                    l.insert(pod.uid);
                }
                // A pod new to the history got its IP after the history was
                // last complete (the gap's start): never earlier, whatever
                // its startTime says.
                if let (Some(s), Some(gap)) = (pod.start_ns, g.gap_since) {
                    pod.start_ns = Some(s.max(gap));
                }
                observe(g, &pod, now_ns, true, &mut out);
            }
            Input::ListDone => {
                let present = g.listing.take().unwrap_or_default();
                g.history.reconcile(&present, now_ns, &mut out);
                end_gap(g, now_ns, &mut out);
            }
            Input::Applied(pod) => {
                // The interval opens at first sight of the IP; the pod's
                // start opens its handover window (history::Interval).
                end_gap(g, now_ns, &mut out);
                observe(g, &pod, now_ns, false, &mut out);
            }
            Input::Deleted(pod) => {
                end_gap(g, now_ns, &mut out);
                if let Some(o) = &pod.owner {
                    let key = (o.kind.clone(), pod.namespace.clone(), o.name.clone());
                    if let Some(v) = g.unresolved.get_mut(&key) {
                        v.retain(|u| *u != pod.uid);
                        if v.is_empty() {
                            g.unresolved.remove(&key);
                        }
                    }
                }
                g.history.delete(pod.uid, now_ns, &mut out);
            }
            Input::Broken => {
                if g.gap_since.is_none() {
                    g.gap_since = Some(now_ns);
                }
                g.last_failure_ns = Some(now_ns);
                g.alive_ns = None;
            }
            Input::Owner {
                kind,
                namespace,
                name,
                owner,
            } => {
                let key = (kind, namespace, name);
                if let Some(uids) = g.unresolved.remove(&key) {
                    let w = owner.clone().unwrap_or_else(|| Workload {
                        kind: key.0.clone(),
                        name: key.2.clone(),
                    });
                    for uid in uids {
                        g.history.set_workload(uid, &w, &mut out);
                    }
                }
                g.owners.insert(key, owner);
            }
            Input::OwnerGone {
                kind,
                namespace,
                name,
            } => {
                g.owners.remove(&(kind, namespace, name));
            }
        }
        g.history.enforce_bound(&mut out);
        if !out.is_empty() {
            if let Some(j) = g.journal.as_mut() {
                if let Err(e) = j.append(&g.history, &out) {
                    g.journal_errors += 1;
                    tracing::warn!(error = %e, "pod history: cannot write the journal");
                }
            }
        }
    }

    /// Heartbeat (every [`SYNC_INTERVAL_MS`]): when the watch is healthy,
    /// the history is complete up to `now_ns`; write and fsync the journal;
    /// prune past the retention and compact when the file holds more than
    /// twice the live lines.
    pub fn tick(&self, now_ns: u64) {
        let mut g = self.lock();
        let g = &mut *g;
        if let Some(f) = g.last_failure_ns {
            if g.listing.is_none() && now_ns.saturating_sub(f) >= QUIET_AFTER_FAILURE_MS * 1_000_000
            {
                let mut out = Vec::new();
                end_gap(g, now_ns, &mut out);
                if let Some(j) = g.journal.as_mut() {
                    if let Err(e) = j.append(&g.history, &out) {
                        g.journal_errors += 1;
                        tracing::warn!(error = %e, "pod history: cannot write the journal");
                    }
                }
            }
        }
        if g.gap_since.is_none() {
            g.alive_ns = Some(now_ns);
        }
        let cutoff = now_ns.saturating_sub(g.retention_ns);
        // While a gap is open the history is complete up to its start: a
        // compacted file keeps that (not "never"), so a restart's gap starts
        // there.
        let alive = g.alive_ns.or(g.gap_since);
        let Some(j) = g.journal.as_mut() else {
            g.history.prune(cutoff);
            return;
        };
        let r = if j.lines > 2 * g.history.intervals() as u64 + 10_000 {
            g.history.prune(cutoff);
            j.compact(&g.history, alive)
        } else {
            j.sync(alive)
        };
        if let Err(e) = r {
            g.journal_errors += 1;
            tracing::warn!(error = %e, "pod history: cannot sync the journal");
        }
    }

    /// Prune and rewrite the journal now (retention; on shutdown).
    pub fn compact(&self, now_ns: u64) -> Result<(), PodsError> {
        let mut g = self.lock();
        let g = &mut *g;
        g.history.prune(now_ns.saturating_sub(g.retention_ns));
        if let Some(j) = g.journal.as_mut() {
            j.compact(&g.history, g.alive_ns.or(g.gap_since))?;
        }
        Ok(())
    }

    /// The pod that held `ip` at `t_ns` (ns since the epoch).
    pub fn at(&self, ip: IpAddr, t_ns: u64) -> PodAnswer {
        self.answer(ip, t_ns, t_ns)
    }

    /// The pod that held `ip` at `start_ns`, and whether the IP changed
    /// hands before `end_ns` (`pod_ip_reused`, with every holder listed).
    pub fn answer(&self, ip: IpAddr, start_ns: u64, end_ns: u64) -> PodAnswer {
        self.lock().history.answer(ip, start_ns, end_ns)
    }

    /// Integration point for answers (search hits, resolve, gRPC, UI,
    /// `ctw`): the pod of the connection's source (the pod address of the
    /// original tuple) as of its start, with reuse checked up to its end
    /// (the last time seen alive, or its start when neither is known).
    pub fn for_hit(&self, hit: &Hit) -> PodAnswer {
        self.for_hit_with_skew(hit, 0)
    }

    /// [`PodHistory::for_hit`] with the reuse window widened by `skew_ns`
    /// on both sides (a resolve query's clock skew between the log and the
    /// node): a reuse within the skew is reported too. A record without a
    /// kernel start time that is not a NEW seen from the connection's start
    /// (a table dump's entry, a connection picked up mid-stream, a DESTROY
    /// whose NEW was lost) started up to [`MAX_ENTRY_AGE_NS`] before it: it
    /// is answered as a live entry without a start time
    /// ([`history::History::answer_unknown_start`]).
    pub fn for_hit_with_skew(&self, hit: &Hit, skew_ns: u64) -> PodAnswer {
        let start = hit.start_ns();
        let end = hit
            .closed_ns
            .or(hit.last_seen_ns)
            .unwrap_or(start)
            .max(start);
        let r = &hit.record;
        if r.start_ns.is_none() && (r.kind != ctw_common::EventKind::New || r.midstream()) {
            return self.lock().history.answer_unknown_start(
                r.orig.src,
                start,
                MAX_ENTRY_AGE_NS,
                end.saturating_add(skew_ns),
            );
        }
        self.lock().history.answer_in(
            hit.record.orig.src,
            start,
            start.saturating_sub(skew_ns),
            end.saturating_add(skew_ns),
        )
    }

    /// Integration point for live lookups (a kernel entry, no stored end):
    /// the pod of the record's original source as of its kernel start time
    /// up to `now_ns`. Without a start time (no `nf_conntrack_timestamp`)
    /// the entry may be up to [`MAX_ENTRY_AGE_NS`] old: see
    /// [`history::History::answer_unknown_start`] (the pod holding the
    /// address now, unverified when another pod held it in that time or
    /// the history may miss one).
    pub fn for_record(&self, record: &ctw_common::ConnRecord, now_ns: u64) -> PodAnswer {
        match record.start_ns {
            Some(start) => self.answer(record.orig.src, start, now_ns.max(start)),
            None => self.lock().history.answer_unknown_start(
                record.orig.src,
                now_ns,
                MAX_ENTRY_AGE_NS,
                now_ns,
            ),
        }
    }

    /// New connections per workload in `records` (what
    /// `ctw_collector_workload_new_connections_total` counts): NEW records
    /// not picked up mid-stream whose source (original tuple) a pod held at
    /// the connection's start (kernel start, else the record's time), keyed
    /// by (namespace, workload kind, workload name, original destination
    /// port); a pod without a controller has kind and name
    /// [`NO_WORKLOAD`]. hostNetwork pods and unnamed sources are not
    /// counted. One lock for the whole batch.
    pub fn workload_counts(&self, records: &[ctw_common::ConnRecord]) -> Vec<(WorkloadKey, u64)> {
        let g = self.lock();
        let mut out: Vec<(WorkloadKey, u64)> = Vec::new();
        for r in records {
            if r.kind != ctw_common::EventKind::New || r.midstream() {
                continue;
            }
            let start = r.start_ns.unwrap_or(r.event_ns);
            let Some((ns, kind, name)) = g.history.workload_at(r.orig.src, start) else {
                continue;
            };
            let (kind, name) = if name.is_empty() {
                (NO_WORKLOAD, NO_WORKLOAD)
            } else {
                (kind, name)
            };
            let port = r.orig.dst_port;
            // A batch names few workloads: a linear scan beats hashing.
            match out.iter_mut().find(|(k, _)| {
                k.port == port && k.namespace == ns && k.kind == kind && k.name == name
            }) {
                Some((_, n)) => *n += 1,
                None => out.push((
                    WorkloadKey {
                        namespace: ns.to_string(),
                        kind: kind.to_string(),
                        name: name.to_string(),
                        port,
                    },
                    1,
                )),
            }
        }
        out
    }

    /// Sizes and counters, for metrics.
    pub fn stats(&self) -> HistoryStats {
        let g = self.lock();
        HistoryStats {
            history: g.history.stats,
            live: g.history.live_intervals(),
            intervals: g.history.intervals(),
            gaps: g.history.gaps().len(),
            journal_errors: g.journal_errors,
            bad_lines: g.bad_lines,
        }
    }

    /// The tenures of the pods matching `f` overlapping `[from_ns, to_ns]`
    /// (see [`history::History::tenures`]): what a search by pod searches.
    pub fn tenures(&self, f: &PodFilter, from_ns: u64, to_ns: u64) -> Vec<Tenure> {
        self.lock().history.tenures(f, from_ns, to_ns)
    }

    /// The recorded gaps (oldest first).
    pub fn gaps(&self) -> Vec<Gap> {
        self.lock().history.gaps().to_vec()
    }

    /// The parts of `[from_ns, to_ns]` (ns since the epoch) in which the
    /// history may miss a pod's tenure, oldest first, each clipped to the
    /// range: the watch gaps overlapping it and, when closed intervals were
    /// evicted by `kubernetes.max_closed_intervals`, the range up to the
    /// newest evicted end. What a search by pod adds as `pod_history_gap`.
    pub fn missing(&self, from_ns: u64, to_ns: u64) -> Vec<Gap> {
        let g = self.lock();
        let h = &g.history;
        let mut out: Vec<Gap> = Vec::new();
        let evicted = h.evicted_through_ns();
        if evicted > 0 && from_ns <= evicted {
            out.push(Gap {
                from_ns,
                to_ns: evicted.min(to_ns),
            });
        }
        for gap in h.gaps() {
            if gap.from_ns <= to_ns && gap.to_ns >= from_ns {
                out.push(Gap {
                    from_ns: gap.from_ns.max(from_ns),
                    to_ns: gap.to_ns.min(to_ns),
                });
            }
        }
        out.sort_by_key(|g| (g.from_ns, g.to_ns));
        out
    }
}

fn end_gap(g: &mut Inner, now_ns: u64, out: &mut Vec<Change>) {
    g.last_failure_ns = None;
    if let Some(from) = g.gap_since.take() {
        g.history.gap(from, now_ns, out);
    }
}

/// Resolve the pod's owner to its workload and observe it (`listed`: by a
/// list, else by the watch).
fn observe(g: &mut Inner, pod: &PodState, now_ns: u64, listed: bool, out: &mut Vec<Change>) {
    let workload = pod.owner.as_ref().map(|o| {
        if o.kind != "ReplicaSet" && o.kind != "Job" {
            return o.clone();
        }
        let key = (o.kind.clone(), pod.namespace.clone(), o.name.clone());
        match g.owners.get(&key) {
            Some(Some(w)) => w.clone(),
            Some(None) => o.clone(),
            None => {
                let v = g.unresolved.entry(key).or_default();
                if !v.contains(&pod.uid) {
                    v.push(pod.uid);
                }
                o.clone()
            }
        }
    });
    if listed {
        g.history.observe(pod, workload.as_ref(), now_ns, out);
    } else {
        g.history
            .observe_watched(pod, workload.as_ref(), now_ns, out);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const S: u64 = 1_000_000_000;
    const IP: &str = "198.18.1.11";

    fn ip() -> IpAddr {
        IP.parse().unwrap()
    }

    fn pod(uid: u128, name: &str, ips: &[&str]) -> PodState {
        PodState {
            uid,
            namespace: "payments".into(),
            name: name.into(),
            owner: Some(Workload {
                kind: "ReplicaSet".into(),
                name: "checkout-7d9f".into(),
            }),
            node: "node-3".into(),
            host_network: false,
            ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
            terminal: false,
            start_ns: None,
        }
    }

    /// A history whose first list (empty) completed at 1 s.
    fn started() -> PodHistory {
        let h = PodHistory::in_memory(u64::MAX);
        h.apply(Input::ListBegin, S);
        h.apply(Input::ListDone, S);
        h
    }

    fn name_at(h: &PodHistory, t: u64) -> Option<String> {
        h.at(ip(), t).pod.map(|p| p.name)
    }

    #[test]
    fn create_a_delete_a_create_b() {
        let h = started();
        h.apply(Input::Applied(pod(1, "a", &[IP])), 10 * S);
        h.apply(Input::Deleted(pod(1, "a", &[IP])), 20 * S);
        h.apply(Input::Applied(pod(2, "b", &[IP])), 30 * S);
        assert_eq!(name_at(&h, 15 * S).as_deref(), Some("a"));
        let between = h.at(ip(), 25 * S);
        assert_eq!(between.pod, None);
        assert_eq!(between.reason, Some(NoPodReason::NoPodAtTime));
        assert_eq!(name_at(&h, 35 * S).as_deref(), Some("b"));
        assert_eq!(name_at(&h, 5 * S), None);
        let a = h.at(ip(), 15 * S).pod.unwrap();
        assert_eq!(a.uid, "00000000-0000-0000-0000-000000000001");
        assert_eq!((a.from_ns, a.to_ns), (10 * S, Some(20 * S)));
        assert!(h.at(ip(), 15 * S).verified);
    }

    #[test]
    fn late_delete_of_a_leaves_b_holding_the_ip() {
        let h = started();
        h.apply(Input::Applied(pod(1, "a", &[IP])), 10 * S);
        h.apply(Input::Applied(pod(2, "b", &[IP])), 30 * S);
        h.apply(Input::Deleted(pod(1, "a", &[IP])), 40 * S);
        assert_eq!(name_at(&h, 20 * S).as_deref(), Some("a"));
        assert_eq!(name_at(&h, 35 * S).as_deref(), Some("b"));
        assert_eq!(name_at(&h, 50 * S).as_deref(), Some("b"));
        let st = h.stats();
        assert_eq!((st.history.fenced, st.live), (1, 1));
        // A later update of A (still terminating) does not take the IP back.
        let mut a = pod(1, "a", &[]);
        a.terminal = true;
        h.apply(Input::Applied(a), 45 * S);
        assert_eq!(name_at(&h, 50 * S).as_deref(), Some("b"));
    }

    #[test]
    fn phase_succeeded_closes_the_interval() {
        let h = started();
        h.apply(Input::Applied(pod(1, "a", &[IP])), 10 * S);
        let mut done = pod(1, "a", &[IP]);
        done.terminal = true;
        h.apply(Input::Applied(done), 20 * S);
        assert_eq!(name_at(&h, 15 * S).as_deref(), Some("a"));
        assert_eq!(h.at(ip(), 25 * S).reason, Some(NoPodReason::NoPodAtTime));
        // The delete after completion changes nothing.
        h.apply(Input::Deleted(pod(1, "a", &[IP])), 30 * S);
        assert_eq!(h.at(ip(), 25 * S).reason, Some(NoPodReason::NoPodAtTime));
    }

    #[test]
    fn reuse_within_the_connection_lists_both_holders() {
        let h = started();
        h.apply(Input::Applied(pod(1, "a", &[IP])), 10 * S);
        h.apply(Input::Deleted(pod(1, "a", &[IP])), 20 * S);
        h.apply(Input::Applied(pod(2, "b", &[IP])), 30 * S);
        let a = h.answer(ip(), 15 * S, 35 * S);
        assert_eq!(a.pod.unwrap().name, "a");
        assert!(a.pod_ip_reused);
        let names: Vec<_> = a.holders.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert!(!h.answer(ip(), 15 * S, 19 * S).pod_ip_reused);
        // B took the IP at 30 s: a connection of A's until 29 s is reused
        // within a 2 s skew (window to 31 s), not without.
        let hist = h.lock();
        assert!(
            hist.history
                .answer_in(ip(), 15 * S, 13 * S, 31 * S)
                .pod_ip_reused
        );
        assert!(
            !hist
                .history
                .answer_in(ip(), 15 * S, 14 * S, 29 * S)
                .pod_ip_reused
        );
        drop(hist);
    }

    #[test]
    fn host_network_pods_are_never_named() {
        let h = started();
        let mut p = pod(1, "node-exporter-x", &[IP]);
        p.host_network = true;
        h.apply(Input::Applied(p), 10 * S);
        let mut q = pod(2, "kube-proxy-y", &[IP]);
        q.host_network = true;
        h.apply(Input::Applied(q), 11 * S);
        let a = h.at(ip(), 20 * S);
        assert_eq!(a.pod, None);
        assert_eq!(a.reason, Some(NoPodReason::HostNetwork));
        assert_eq!(
            a.holders.len(),
            2,
            "both hostNetwork pods listed, none fenced"
        );
    }

    #[test]
    fn watch_gap_makes_names_unverified() {
        let h = started();
        h.apply(Input::Applied(pod(1, "a", &[IP])), 10 * S);
        h.apply(Input::Broken, 20 * S);
        h.apply(Input::Broken, 22 * S);
        // The watch comes back with a re-list (410): A is gone, B listed.
        h.apply(Input::ListBegin, 30 * S);
        h.apply(Input::Listed(pod(2, "b", &["198.18.1.12"])), 30 * S);
        h.apply(Input::ListDone, 30 * S);
        assert_eq!(
            h.gaps(),
            vec![
                Gap {
                    from_ns: 20 * S,
                    to_ns: 30 * S
                },
                Gap {
                    from_ns: 0,
                    to_ns: S
                }
            ]
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
        );
        let before = h.at(ip(), 15 * S);
        assert!(before.verified && before.pod.is_some());
        let inside = h.at(ip(), 25 * S);
        assert_eq!(
            inside.pod.unwrap().name,
            "a",
            "best guess: A until the re-list"
        );
        assert!(!inside.verified);
        let after = h.at(ip(), 31 * S);
        assert_eq!(after.reason, Some(NoPodReason::NoPodAtTime));
        let other = h.at("198.18.1.12".parse().unwrap(), 25 * S);
        assert_eq!(other.reason, Some(NoPodReason::HistoryGap));
        // Before the history began: a gap too.
        assert_eq!(h.at(ip(), S / 2).reason, Some(NoPodReason::HistoryGap));
    }

    #[test]
    fn a_pod_first_listed_after_a_gap_starts_no_earlier_than_the_gap() {
        let h = started();
        h.apply(Input::Applied(pod(1, "a", &[IP])), 10 * S);
        h.apply(Input::Broken, 20 * S);
        // A was deleted and B took its IP while the watch was down; B's
        // startTime is older than the gap (kubelet clock, or a pod that
        // waited for its sandbox).
        h.apply(Input::ListBegin, 30 * S);
        let mut b = pod(2, "b", &[IP]);
        b.start_ns = Some(5 * S);
        h.apply(Input::Listed(b), 30 * S);
        h.apply(Input::ListDone, 30 * S);
        assert_eq!(
            name_at(&h, 15 * S).as_deref(),
            Some("a"),
            "A keeps its verified past"
        );
        let b = h.at(ip(), 25 * S).pod.unwrap();
        assert_eq!((b.name.as_str(), b.from_ns), ("b", 20 * S));
        assert!(!h.at(ip(), 25 * S).verified);
        assert_eq!(name_at(&h, 31 * S).as_deref(), Some("b"));
    }

    #[test]
    fn dropped_watch_resumed_without_relist_is_a_gap_until_the_next_event() {
        let h = started();
        h.apply(Input::Applied(pod(1, "a", &[IP])), 10 * S);
        h.apply(Input::Broken, 20 * S);
        h.apply(Input::Deleted(pod(1, "a", &[IP])), 25 * S);
        assert_eq!(
            h.gaps().last(),
            Some(&Gap {
                from_ns: 20 * S,
                to_ns: 25 * S
            })
        );
        assert!(!h.at(ip(), 22 * S).verified);
    }

    #[test]
    fn a_quiet_watch_after_a_failure_ends_the_gap_after_the_quiet_window() {
        let h = started();
        h.apply(Input::Applied(pod(1, "a", &[IP])), 10 * S);
        h.apply(Input::Broken, 20 * S);
        h.apply(Input::Broken, 50 * S);
        h.tick(100 * S);
        assert_eq!(h.gaps().len(), 1, "failures 50 s ago: still in the gap");
        h.tick(141 * S);
        assert_eq!(
            h.gaps().last(),
            Some(&Gap {
                from_ns: 20 * S,
                to_ns: 141 * S
            })
        );
        assert!(h.at(ip(), 142 * S).verified);
        assert!(!h.at(ip(), 60 * S).verified);
    }

    #[test]
    fn owner_resolved_to_workload_also_when_it_arrives_later() {
        let h = started();
        h.apply(
            Input::Owner {
                kind: "Job".into(),
                namespace: "payments".into(),
                name: "report-29000".into(),
                owner: Some(Workload {
                    kind: "CronJob".into(),
                    name: "report".into(),
                }),
            },
            2 * S,
        );
        let mut j = pod(3, "report-29000-abc", &["198.18.1.13"]);
        j.owner = Some(Workload {
            kind: "Job".into(),
            name: "report-29000".into(),
        });
        h.apply(Input::Applied(j), 3 * S);
        let w = h
            .at("198.18.1.13".parse().unwrap(), 4 * S)
            .pod
            .unwrap()
            .workload
            .unwrap();
        assert_eq!((w.kind.as_str(), w.name.as_str()), ("CronJob", "report"));

        h.apply(Input::Applied(pod(1, "a", &[IP])), 10 * S);
        assert_eq!(
            h.at(ip(), 11 * S).pod.unwrap().workload.unwrap().kind,
            "ReplicaSet"
        );
        h.apply(
            Input::Owner {
                kind: "ReplicaSet".into(),
                namespace: "payments".into(),
                name: "checkout-7d9f".into(),
                owner: Some(Workload {
                    kind: "Deployment".into(),
                    name: "checkout".into(),
                }),
            },
            12 * S,
        );
        let w = h.at(ip(), 11 * S).pod.unwrap().workload.unwrap();
        assert_eq!(
            (w.kind.as_str(), w.name.as_str()),
            ("Deployment", "checkout")
        );
    }

    #[test]
    fn answer_json_shape() {
        let h = started();
        h.apply(Input::Applied(pod(1, "a", &[IP])), 10 * S);
        let a = serde_json::to_value(h.at(ip(), 11 * S)).unwrap();
        assert_eq!(
            a,
            serde_json::json!({
                "pod": {
                    "namespace": "payments", "name": "a",
                    "uid": "00000000-0000-0000-0000-000000000001",
                    "workload": {"kind": "ReplicaSet", "name": "checkout-7d9f"},
                    "node": "node-3", "host_network": false,
                    "from_ns": 10 * S, "to_ns": null
                },
                "reason": null, "verified": true, "pod_ip_reused": false, "holders": []
            })
        );
        let none = serde_json::to_value(h.at(ip(), 5 * S)).unwrap();
        assert_eq!(
            none,
            serde_json::json!({"pod": null, "reason": "no_pod_at_time", "verified": true,
                               "pod_ip_reused": false, "holders": []})
        );
    }

    fn temp_dir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("ctw-pods-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn restart_replays_the_journal_and_reconciles_with_a_gap() {
        let dir = temp_dir("restart");
        {
            let h = PodHistory::open(&dir, u64::MAX).unwrap();
            h.apply(Input::ListBegin, S);
            h.apply(Input::ListDone, S);
            h.apply(Input::Applied(pod(1, "a", &[IP])), 10 * S);
            h.apply(Input::Applied(pod(2, "b", &["198.18.1.12"])), 11 * S);
            h.tick(20 * S);
        }
        // Lines after the last heartbeat may be lost in a crash: none here.
        let h = PodHistory::open(&dir, u64::MAX).unwrap();
        assert_eq!(name_at(&h, 15 * S).as_deref(), Some("a"));
        // The re-list after the restart: A was deleted while down.
        h.apply(Input::ListBegin, 60 * S);
        let mut b = pod(2, "b", &["198.18.1.12"]);
        b.start_ns = Some(11 * S);
        h.apply(Input::Listed(b), 60 * S);
        h.apply(Input::ListDone, 60 * S);
        assert_eq!(
            h.gaps().last(),
            Some(&Gap {
                from_ns: 20 * S,
                to_ns: 60 * S
            })
        );
        assert!(h.at(ip(), 15 * S).verified);
        let down = h.at(ip(), 40 * S);
        assert_eq!(down.pod.unwrap().name, "a");
        assert!(!down.verified);
        assert_eq!(h.at(ip(), 61 * S).reason, Some(NoPodReason::NoPodAtTime));
        let b = h.at("198.18.1.12".parse().unwrap(), 61 * S).pod.unwrap();
        assert_eq!(
            (b.name.as_str(), b.from_ns),
            ("b", 11 * S),
            "B's interval continues"
        );
        // A workload resolved late is journaled too.
        h.apply(
            Input::Owner {
                kind: "ReplicaSet".into(),
                namespace: "payments".into(),
                name: "checkout-7d9f".into(),
                owner: Some(Workload {
                    kind: "Deployment".into(),
                    name: "checkout".into(),
                }),
            },
            62 * S,
        );
        h.tick(63 * S);
        drop(h);
        let h = PodHistory::open(&dir, u64::MAX).unwrap();
        let w = h
            .at("198.18.1.12".parse().unwrap(), 61 * S)
            .pod
            .unwrap()
            .workload;
        assert_eq!(w.unwrap().kind, "Deployment");
        // Compaction keeps the same answers.
        h.compact(70 * S).unwrap();
        drop(h);
        let h = PodHistory::open(&dir, u64::MAX).unwrap();
        assert_eq!(name_at(&h, 15 * S).as_deref(), Some("a"));
        assert!(!h.at(ip(), 40 * S).verified);
        assert_eq!(h.at(ip(), 61 * S).reason, Some(NoPodReason::NoPodAtTime));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn compaction_during_a_gap_keeps_where_the_history_was_complete() {
        let dir = temp_dir("gapcompact");
        {
            let h = PodHistory::open(&dir, u64::MAX).unwrap();
            h.apply(Input::ListBegin, S);
            h.apply(Input::ListDone, S);
            h.apply(Input::Applied(pod(1, "a", &[IP])), 10 * S);
            h.tick(15 * S);
            h.apply(Input::Broken, 20 * S);
            h.compact(25 * S).unwrap();
        }
        let h = PodHistory::open(&dir, u64::MAX).unwrap();
        h.apply(Input::ListBegin, 60 * S);
        h.apply(Input::Listed(pod(1, "a", &[IP])), 60 * S);
        h.apply(Input::ListDone, 60 * S);
        assert_eq!(
            h.gaps().last(),
            Some(&Gap {
                from_ns: 20 * S,
                to_ns: 60 * S
            })
        );
        assert!(h.at(ip(), 12 * S).verified);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bad_journal_lines_are_counted_and_skipped() {
        let dir = temp_dir("bad");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("history.jsonl"),
            "{\"t\":\"gap\",\"from_ns\":1,\"to_ns\":2}\nnot json\n{\"t\":\"alive\",\"at_ns\":5}\n",
        )
        .unwrap();
        let h = PodHistory::open(&dir, u64::MAX).unwrap();
        assert_eq!(h.stats().bad_lines, 1);
        assert_eq!(
            h.gaps(),
            vec![Gap {
                from_ns: 1,
                to_ns: 2
            }]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_closed_interval_bound_holds_across_a_restart_and_compaction() {
        let dir = temp_dir("bound");
        let ip2: IpAddr = "198.18.1.12".parse().unwrap();
        {
            let h = PodHistory::open_bounded(&dir, u64::MAX, 2).unwrap();
            h.apply(Input::ListBegin, S);
            h.apply(Input::ListDone, S);
            // A, B, C one after another on the address; D live on another.
            h.apply(Input::Applied(pod(4, "d", &["198.18.1.12"])), 2 * S);
            for (k, (uid, name)) in [(1, "a"), (2, "b"), (3, "c")].into_iter().enumerate() {
                let t = 10 * S + 10 * S * k as u64;
                h.apply(Input::Applied(pod(uid, name, &[IP])), t);
                h.apply(Input::Deleted(pod(uid, name, &[IP])), t + 5 * S);
            }
            assert_eq!(h.stats().history.evicted, 1, "A (the oldest) evicted");
            let m = crate::metrics::Metrics::new();
            m.sync_pods(&h);
            let text = m.render();
            assert!(
                text.contains("ctw_collector_pod_intervals_evicted_total 1"),
                "{text}"
            );
            h.tick(40 * S);
        }
        let check = |h: &PodHistory| {
            let a = h.at(ip(), 12 * S);
            assert_eq!((a.pod, a.reason), (None, Some(NoPodReason::HistoryGap)));
            assert!(!a.verified);
            assert_eq!(name_at(h, 22 * S).as_deref(), Some("b"));
            assert_eq!(name_at(h, 32 * S).as_deref(), Some("c"));
            assert_eq!(h.at(ip(), 27 * S).reason, Some(NoPodReason::NoPodAtTime));
            assert_eq!(h.at(ip2, 3 * S).pod.unwrap().name, "d");
        };
        // Replayed from the journal's lines (no compaction yet): the same.
        let h = PodHistory::open_bounded(&dir, u64::MAX, 2).unwrap();
        check(&h);
        // Compacted: A is gone from the file and the answers stay.
        h.compact(41 * S).unwrap();
        drop(h);
        let text = std::fs::read_to_string(dir.join("history.jsonl")).unwrap();
        assert!(
            !text.contains("00000000-0000-0000-0000-000000000001"),
            "{text}"
        );
        assert!(text.contains("\"t\":\"evicted\""), "{text}");
        let h = PodHistory::open_bounded(&dir, u64::MAX, 2).unwrap();
        check(&h);
        drop(h);
        // A smaller bound at restart cuts the file to it at once: B goes.
        let h = PodHistory::open_bounded(&dir, u64::MAX, 1).unwrap();
        assert_eq!(h.at(ip(), 22 * S).reason, Some(NoPodReason::HistoryGap));
        assert_eq!(name_at(&h, 32 * S).as_deref(), Some("c"));
        drop(h);
        let text = std::fs::read_to_string(dir.join("history.jsonl")).unwrap();
        assert!(
            !text.contains("00000000-0000-0000-0000-000000000002"),
            "{text}"
        );
        let h = PodHistory::open_bounded(&dir, u64::MAX, 1).unwrap();
        assert_eq!(h.at(ip(), 22 * S).reason, Some(NoPodReason::HistoryGap));
        assert_eq!(h.at(ip2, 50 * S).pod.unwrap().name, "d");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_watched_pod_connecting_before_its_pod_ip_is_posted_is_never_a_verified_wrong_pod() {
        let dir = temp_dir("handover");
        {
            let h = PodHistory::open(&dir, u64::MAX).unwrap();
            h.apply(Input::ListBegin, S);
            h.apply(Input::ListDone, S);
            h.apply(Input::Applied(pod(1, "a", &[IP])), 10 * S);
            // B started at 30 s; its podIP is posted at 32 s; A's delete
            // arrives at 35 s. B connected at 31 s.
            let mut b = pod(2, "b", &[]);
            b.start_ns = Some(30 * S);
            h.apply(Input::Applied(b.clone()), 30 * S);
            b.ips = vec![ip()];
            h.apply(Input::Applied(b), 32 * S);
            h.apply(Input::Deleted(pod(1, "a", &[IP])), 35 * S);
            let a = h.at(ip(), 31 * S);
            assert_eq!(a.reason, Some(NoPodReason::IpHandover));
            assert!(a.pod.is_none() && !a.verified && a.pod_ip_reused);
            h.tick(40 * S);
        }
        // The window survives a restart (journal `maybe_from_ns`).
        let h = PodHistory::open(&dir, u64::MAX).unwrap();
        let a = h.at(ip(), 31 * S);
        assert_eq!(a.reason, Some(NoPodReason::IpHandover));
        assert_eq!(a.holders.len(), 2);
        assert!(h.at(ip(), 33 * S).verified);
        drop(h);
        // A journal written before the window existed still loads.
        std::fs::write(
            dir.join("history.jsonl"),
            "{\"t\":\"open\",\"ip\":\"198.18.1.11\",\"uid\":\"00000000-0000-0000-0000-000000000001\",\"from_ns\":10000000000,\"namespace\":\"payments\",\"name\":\"a\",\"node\":\"node-3\"}\n",
        )
        .unwrap();
        let h = PodHistory::open(&dir, u64::MAX).unwrap();
        assert_eq!(h.stats().bad_lines, 0);
        assert_eq!(name_at(&h, 11 * S).as_deref(), Some("a"));
        assert!(h.at(ip(), 11 * S).verified);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn missing_lists_watch_gaps_and_the_evicted_range_clipped_to_the_range() {
        let h = started();
        h.lock().history.max_closed = 1;
        h.apply(Input::Applied(pod(1, "a", &[IP])), 10 * S);
        h.apply(Input::Deleted(pod(1, "a", &[IP])), 20 * S);
        h.apply(Input::Applied(pod(2, "b", &[IP])), 30 * S);
        h.apply(Input::Deleted(pod(2, "b", &[IP])), 40 * S);
        assert_eq!(h.stats().history.evicted, 1, "A evicted: ended at 20 s");
        h.apply(Input::Broken, 50 * S);
        h.apply(Input::ListBegin, 60 * S);
        h.apply(Input::ListDone, 60 * S);
        let g = |from: u64, to: u64| Gap {
            from_ns: from * S,
            to_ns: to * S,
        };
        // The first list's gap (0 to 1 s), A's evicted range (to 20 s) and
        // the watch gap (50 to 60 s), clipped to 5..55 s.
        assert_eq!(h.missing(5 * S, 55 * S), [g(5, 20), g(50, 55)]);
        assert_eq!(h.missing(0, 2 * S), [g(0, 1), g(0, 2)]);
        assert_eq!(h.missing(21 * S, 49 * S), []);
    }

    /// A kernel entry from `IP` to 198.18.2.1:80 as a live lookup (GET)
    /// returns it at `event_ns`, with the kernel start time `start_ns`.
    fn live_entry(event_ns: u64, start_ns: Option<u64>) -> ctw_common::ConnRecord {
        use ctw_common::{ConnRecord, EventKind, Protocol, Tuple};
        let server: IpAddr = "198.18.2.1".parse().unwrap();
        ConnRecord {
            start_ns,
            ..ConnRecord::new(
                EventKind::Recovered,
                event_ns,
                Protocol::Tcp,
                Tuple::new(ip(), 40000, server, 80),
                Tuple::new(server, 80, ip(), 40000),
            )
        }
    }

    #[test]
    fn a_live_entry_without_start_time_is_not_named_as_the_new_holder_verified() {
        const DAY: u64 = 86_400 * S;
        let h = started();
        // A held the address (day 1 to day 2), B holds it since day 3; the
        // node has no nf_conntrack_timestamp: the leftover entry of A's
        // connection is looked up on day 4 with no start time.
        h.apply(Input::Applied(pod(1, "a", &[IP])), DAY);
        h.apply(Input::Deleted(pod(1, "a", &[IP])), 2 * DAY);
        h.apply(Input::Applied(pod(2, "b", &[IP])), 3 * DAY);
        let now = 4 * DAY;
        let a = h.for_record(&live_entry(now, None), now);
        assert_eq!(a.pod.as_ref().unwrap().name, "b");
        assert!(!a.verified && a.pod_ip_reused, "{a:?}");
        let names: Vec<_> = a.holders.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        // With the kernel's start time the entry is proven B's (or A's).
        let b = h.for_record(&live_entry(now, Some(3 * DAY + S)), now);
        assert!(b.verified && !b.pod_ip_reused && b.pod.unwrap().name == "b");
        let old = h.for_record(&live_entry(now, Some(DAY + S)), now);
        assert_eq!(old.pod.unwrap().name, "a");
        // Five days after A left, B alone held it within any entry's
        // lifetime: verified again.
        let later = 2 * DAY + MAX_ENTRY_AGE_NS + S;
        let c = h.for_record(&live_entry(later, None), later);
        assert!(c.verified && !c.pod_ip_reused && c.pod.unwrap().name == "b");
        // B deleted, no pod now: A and B listed, no pod proven absent.
        h.apply(Input::Deleted(pod(2, "b", &[IP])), 5 * DAY);
        let d = h.for_record(&live_entry(6 * DAY, None), 6 * DAY);
        assert_eq!(d.reason, Some(NoPodReason::NoPodAtTime));
        assert!(!d.verified && d.pod_ip_reused && d.holders.len() == 2);
    }

    #[test]
    fn a_stored_dump_entry_without_start_time_is_answered_over_its_possible_lifetime() {
        use ctw_common::{EventKind, TcpState};
        const DAY: u64 = 86_400 * S;
        let h = started();
        h.apply(Input::Applied(pod(1, "a", &[IP])), DAY);
        h.apply(Input::Deleted(pod(1, "a", &[IP])), 2 * DAY);
        h.apply(Input::Applied(pod(2, "b", &[IP])), 3 * DAY);
        // The agent restarted on day 4 and found A's leftover entry in the
        // table dump (no kernel start time): stored as Recovered at day 4.
        let dumped = crate::store::Hit::open("node-3", live_entry(4 * DAY, None));
        let a = h.for_hit(&dumped);
        assert_eq!(a.pod.as_ref().unwrap().name, "b");
        assert!(
            !a.verified && a.pod_ip_reused && a.holders.len() == 2,
            "{a:?}"
        );
        // The same for a connection picked up mid-stream (NEW, established).
        let mut mid = live_entry(4 * DAY, None);
        mid.kind = EventKind::New;
        mid.tcp_state = Some(TcpState::Established);
        let a = h.for_hit(&crate::store::Hit::open("node-3", mid));
        assert!(!a.verified && a.pod_ip_reused, "{a:?}");
        // A NEW seen from its SYN starts at its event time: B, proven.
        let mut new = live_entry(4 * DAY, None);
        new.kind = EventKind::New;
        new.tcp_state = Some(TcpState::SynSent);
        let a = h.for_hit(&crate::store::Hit::open("node-3", new));
        assert!(a.verified && !a.pod_ip_reused && a.pod.unwrap().name == "b");
    }

    #[test]
    fn a_live_entry_without_start_time_is_unverified_when_the_history_may_miss_a_holder() {
        const DAY: u64 = 86_400 * S;
        let now = 8 * DAY;
        // B holds the address since day 7; the history is complete since
        // 1 s: no pod held it in the 5 days before, B is proven.
        let h = started();
        h.apply(Input::Applied(pod(2, "b", &[IP])), 7 * DAY);
        assert!(h.for_record(&live_entry(now, None), now).verified);
        // The same with a watch gap on day 5: a pod that held the address
        // then (and left the entry) may be missing from the history.
        let h = started();
        h.apply(Input::Broken, 5 * DAY);
        h.apply(Input::ListBegin, 5 * DAY + 60 * S);
        h.apply(Input::ListDone, 5 * DAY + 60 * S);
        h.apply(Input::Applied(pod(2, "b", &[IP])), 7 * DAY);
        let a = h.for_record(&live_entry(now, None), now);
        assert_eq!(a.pod.as_ref().unwrap().name, "b");
        assert!(!a.verified && !a.pod_ip_reused, "{a:?}");
        // A kernel start time after the gap proves B.
        assert!(
            h.for_record(&live_entry(now, Some(7 * DAY + S)), now)
                .verified
        );
    }

    #[test]
    fn retention_prunes_closed_intervals_only() {
        let h = started();
        h.apply(Input::Applied(pod(1, "a", &[IP])), 10 * S);
        h.apply(Input::Deleted(pod(1, "a", &[IP])), 20 * S);
        h.apply(Input::Applied(pod(2, "b", &["198.18.1.12"])), 21 * S);
        h.lock().retention_ns = 10 * S;
        h.tick(100 * S);
        assert_eq!(name_at(&h, 15 * S), None);
        assert!(h.at("198.18.1.12".parse().unwrap(), 99 * S).pod.is_some());
    }
}
