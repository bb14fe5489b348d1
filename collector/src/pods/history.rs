//! Pod IP interval history: which pod held an IP at a time.
//!
//! One [`Interval`] per (pod UID, pod IP): it opens when the watch first sees
//! the IP in `status.podIPs` and closes at the pod's deletion, at phase
//! `Succeeded`/`Failed`, when the IP leaves the pod's status, or when a newer
//! pod (another UID) is seen holding the same IP ("create A, create B,
//! delete A (late)": A's interval ends at B's start and the late delete only
//! closes what A still holds). hostNetwork pods share their node's IP: they
//! are kept but never fence other pods and are never named as proven.
//!
//! Watch gaps (the collector was down, the watch broke, a 410 re-list) are
//! kept as time ranges; a name inside one is answered `verified: false`.
//!
//! Memory: a live pod costs one interval (about 90 bytes plus its name) and
//! one map slot; strings that repeat (namespace, node, workload) are interned.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// `u64::MAX` as an interval's end: still open.
pub const OPEN: u64 = u64::MAX;

/// The workload a pod belongs to: its controller owner resolved upward
/// (ReplicaSet to Deployment, Job to CronJob); `kind` is the Kubernetes kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    pub kind: String,
    pub name: String,
}

/// A pod as the watch saw it, the input of [`History::observe`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodState {
    /// `metadata.uid` (a UUID).
    pub uid: u128,
    pub namespace: String,
    pub name: String,
    /// The pod's controller owner as found (`metadata.ownerReferences`
    /// with `controller: true`), not yet resolved to the workload.
    pub owner: Option<Workload>,
    /// `spec.nodeName`; empty while unscheduled.
    pub node: String,
    /// `spec.hostNetwork`.
    pub host_network: bool,
    /// `status.podIPs` (empty until the sandbox has its network).
    pub ips: Vec<IpAddr>,
    /// `status.phase` is `Succeeded` or `Failed`: the IP is released.
    pub terminal: bool,
    /// `status.startTime` in ns since the epoch, when set: the interval of a
    /// pod first seen by a re-list starts there, not at the list's time.
    pub start_ns: Option<u64>,
}

/// One pod's tenure of one IP, as stored (strings interned).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interval {
    pub uid: u128,
    /// ns since the epoch.
    pub from_ns: u64,
    /// ns since the epoch; [`OPEN`] while the pod holds the IP.
    pub to_ns: u64,
    pub name: Box<str>,
    pub namespace: Sym,
    pub node: Sym,
    /// Interned workload kind and name; `Sym::NONE` when the pod has no
    /// controller owner.
    pub workload_kind: Sym,
    pub workload_name: Sym,
    pub host_network: bool,
}

/// An interned string (index into [`Interner`]); 0 is the empty string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sym(pub u32);

impl Sym {
    pub const NONE: Sym = Sym(0);
}

/// Append-only string table for the few distinct namespaces, nodes and
/// workloads.
#[derive(Debug)]
pub struct Interner {
    strings: Vec<Arc<str>>,
    ids: HashMap<Arc<str>, u32>,
}

impl Default for Interner {
    fn default() -> Self {
        let empty: Arc<str> = Arc::from("");
        Interner {
            strings: vec![empty.clone()],
            ids: HashMap::from([(empty, 0)]),
        }
    }
}

impl Interner {
    pub fn intern(&mut self, s: &str) -> Sym {
        if let Some(&i) = self.ids.get(s) {
            return Sym(i);
        }
        let a: Arc<str> = Arc::from(s);
        let i = self.strings.len() as u32;
        self.strings.push(a.clone());
        self.ids.insert(a, i);
        Sym(i)
    }
    pub fn get(&self, s: Sym) -> &str {
        self.strings.get(s.0 as usize).map_or("", |a| a)
    }
}

/// A watch gap: `[from_ns, to_ns]` in which pod events may have been missed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gap {
    pub from_ns: u64,
    pub to_ns: u64,
}

/// A pod as answered (`pod` in every answer of issue 13).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    /// `metadata.uid`, UUID text.
    pub uid: String,
    pub workload: Option<Workload>,
    pub node: String,
    pub host_network: bool,
    /// When the pod got the IP and when it gave it up (ns since the epoch;
    /// `None` while it holds it).
    pub from_ns: u64,
    pub to_ns: Option<u64>,
}

/// Why an answer has no pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoPodReason {
    /// The history holds no pod with this IP at that time (a node, a
    /// service, an address outside the cluster, or before the history).
    NoPodAtTime,
    /// The time falls in a watch gap and no interval covers it.
    HistoryGap,
    /// Only hostNetwork pods held the IP (the node's address): shared, so
    /// never named as if proven; see `candidates`.
    HostNetwork,
}

/// The pod answer for (IP, connection start, connection end).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodAnswer {
    /// The pod that held the IP at the connection's start.
    pub pod: Option<PodRef>,
    /// Set exactly when `pod` is `None`.
    pub reason: Option<NoPodReason>,
    /// `false` when the time falls in a watch gap (the name is the best
    /// guess from before/after the gap, not proven).
    pub verified: bool,
    /// The IP changed hands within `[start, end]`: `holders` lists every
    /// pod that held it in that window, oldest first.
    pub pod_ip_reused: bool,
    /// Every non-hostNetwork holder in the window when `pod_ip_reused`, or
    /// the hostNetwork pods when the reason is `host_network`; else empty.
    pub holders: Vec<PodRef>,
}

/// Which pods a search by pod asks for (`namespace`, `pod`, `workload`
/// search parameters): every given field must match; `workload_kind` only
/// with `workload_name`. Names are Kubernetes names, compared exactly.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodFilter {
    pub namespace: Option<String>,
    /// The pod's `metadata.name`.
    pub pod: Option<String>,
    /// The workload's kind (`Deployment`, `StatefulSet`, ...); `None`: any.
    pub workload_kind: Option<String>,
    pub workload_name: Option<String>,
}

/// One pod's tenure of one address: connections from `ip` that started in
/// `[from_ns, to_ns)` (ns since the epoch; `to_ns` [`OPEN`] while held) are
/// the pod's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tenure {
    pub ip: IpAddr,
    pub from_ns: u64,
    pub to_ns: u64,
}

/// Counters of what the history did with its input (exported as metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub opened: u64,
    /// Intervals closed because another UID was seen with the IP.
    pub fenced: u64,
    pub closed: u64,
    /// Deletes of pods whose intervals were already all closed (late).
    pub late_deletes: u64,
}

/// Format a UID as the 36-character UUID text.
pub fn uid_text(uid: u128) -> String {
    let h = format!("{uid:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Parse a UUID text (`metadata.uid`); `None` when it is not 32 hex digits
/// with optional dashes.
pub fn parse_uid(s: &str) -> Option<u128> {
    let hex: String = s.chars().filter(|c| *c != '-').collect();
    if hex.len() != 32 {
        return None;
    }
    u128::from_str_radix(&hex, 16).ok()
}

/// The IPs a live pod holds: at most one per family (`status.podIPs`),
/// kept inline (no heap allocation per pod).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LiveIps([Option<IpAddr>; 2]);

impl LiveIps {
    fn to_vec(self) -> Vec<IpAddr> {
        self.0.into_iter().flatten().collect()
    }
    fn len(&self) -> usize {
        self.0.iter().flatten().count()
    }
    /// Add `ip`; a third address (never sent by Kubernetes) replaces the
    /// second.
    fn add(&mut self, ip: IpAddr) {
        if self.0.contains(&Some(ip)) {
            return;
        }
        match self.0.iter_mut().find(|s| s.is_none()) {
            Some(slot) => *slot = Some(ip),
            None => self.0[1] = Some(ip),
        }
    }
    fn remove(&mut self, ip: IpAddr) {
        for s in &mut self.0 {
            if *s == Some(ip) {
                *s = None;
            }
        }
    }
    fn is_empty(&self) -> bool {
        self.0.iter().all(Option::is_none)
    }
}

/// The in-memory history (no I/O: [`super::store`] persists its changes).
#[derive(Debug, Default)]
pub struct History {
    pub(crate) strings: Interner,
    /// Intervals per IP, ordered by `from_ns`.
    pub(crate) by_ip: HashMap<IpAddr, Vec<Interval>>,
    /// The IPs each live pod holds (to close them on delete).
    pub(crate) live: HashMap<u128, LiveIps>,
    pub(crate) gaps: Vec<Gap>,
    pub stats: Stats,
}

/// A change to persist: what [`History`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Opened(IpAddr, Interval),
    Closed {
        ip: IpAddr,
        uid: u128,
        to_ns: u64,
    },
    Gap(Gap),
    /// The open interval's workload became known (its owner's metadata
    /// arrived after the pod).
    Workload {
        ip: IpAddr,
        uid: u128,
        workload: Workload,
    },
}

impl History {
    /// Number of open intervals (live pods with an IP, per IP).
    pub fn live_intervals(&self) -> usize {
        self.live.values().map(LiveIps::len).sum()
    }

    /// Number of stored intervals, open and closed.
    pub fn intervals(&self) -> usize {
        self.by_ip.values().map(Vec::len).sum()
    }

    /// The recorded watch gaps, oldest first.
    pub fn gaps(&self) -> &[Gap] {
        &self.gaps
    }

    /// The tenures of the pods matching `f` that overlap `[from_ns, to_ns]`,
    /// oldest first. hostNetwork pods are never matched (their address is
    /// the node's, shared). A scan of the intervals in memory (about one
    /// per live pod plus the retained closed ones), never of records.
    pub fn tenures(&self, f: &PodFilter, from_ns: u64, to_ns: u64) -> Vec<Tenure> {
        let eq = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
        let mut out: Vec<Tenure> = self
            .by_ip
            .iter()
            .flat_map(|(ip, ivs)| ivs.iter().map(move |i| (*ip, i)))
            .filter(|(_, i)| {
                !i.host_network
                    && i.from_ns <= to_ns
                    && i.to_ns >= from_ns
                    && eq(&f.namespace, self.strings.get(i.namespace))
                    && eq(&f.pod, &i.name)
                    && eq(&f.workload_kind, self.strings.get(i.workload_kind))
                    && eq(&f.workload_name, self.strings.get(i.workload_name))
            })
            .map(|(ip, i)| Tenure {
                ip,
                from_ns: i.from_ns,
                to_ns: i.to_ns,
            })
            .collect();
        out.sort_by_key(|t| (t.from_ns, t.ip));
        out
    }

    /// Apply one observation of a pod at `now_ns` (when the watch delivered
    /// it), named by `workload` (its owner resolved); the changes are
    /// appended to `out`. An IP new to the pod opens an interval at
    /// `pod.start_ns` (capped at `now_ns`) when set, else at `now_ns`.
    pub fn observe(
        &mut self,
        pod: &PodState,
        workload: Option<&Workload>,
        now_ns: u64,
        out: &mut Vec<Change>,
    ) {
        let holds = if pod.terminal { &[][..] } else { &pod.ips[..] };
        // Close what the pod no longer holds.
        let old: Vec<IpAddr> = self
            .live
            .get(&pod.uid)
            .map(|l| l.to_vec())
            .unwrap_or_default();
        for ip in &old {
            if !holds.contains(ip) {
                self.close(*ip, pod.uid, now_ns, out);
            }
        }
        for ip in holds {
            if old.contains(ip) {
                continue;
            }
            // A pod's IP is assigned at or after its start; the watch sees it
            // later. Start at the start time when known (a pod first seen by
            // a re-list, or a slow watch), never after now.
            let from_ns = pod.start_ns.map_or(now_ns, |s| s.min(now_ns));
            if !pod.host_network {
                // Fence: any other non-hostNetwork holder ends where this one
                // starts (its delete is late or was missed).
                let others: Vec<u128> = self
                    .by_ip
                    .get(ip)
                    .map(|v| {
                        v.iter()
                            .filter(|i| i.to_ns == OPEN && !i.host_network && i.uid != pod.uid)
                            .map(|i| i.uid)
                            .collect()
                    })
                    .unwrap_or_default();
                for uid in others {
                    let prev_from = self.open_from(*ip, uid).unwrap_or(from_ns);
                    self.close(*ip, uid, from_ns.max(prev_from), out);
                    self.stats.fenced += 1;
                }
            }
            let iv = Interval {
                uid: pod.uid,
                from_ns,
                to_ns: OPEN,
                name: pod.name.as_str().into(),
                namespace: self.strings.intern(&pod.namespace),
                node: self.strings.intern(&pod.node),
                workload_kind: workload.map_or(Sym::NONE, |w| self.strings.intern(&w.kind)),
                workload_name: workload.map_or(Sym::NONE, |w| self.strings.intern(&w.name)),
                host_network: pod.host_network,
            };
            self.insert(*ip, iv.clone());
            out.push(Change::Opened(*ip, iv));
        }
    }

    /// The pod was deleted (watch `DELETED`, or absent from a re-list) at
    /// `now_ns`: close what it still holds.
    pub fn delete(&mut self, uid: u128, now_ns: u64, out: &mut Vec<Change>) {
        match self.live.get(&uid).map(|l| l.to_vec()) {
            Some(ips) => {
                for ip in ips {
                    self.close(ip, uid, now_ns, out);
                }
            }
            None => self.stats.late_deletes += 1,
        }
    }

    /// After a full list at `now_ns`: every live pod not in `present` was
    /// deleted while the watch was not looking.
    pub fn reconcile(
        &mut self,
        present: &std::collections::HashSet<u128>,
        now_ns: u64,
        out: &mut Vec<Change>,
    ) {
        let gone: Vec<u128> = self
            .live
            .keys()
            .filter(|u| !present.contains(u))
            .copied()
            .collect();
        for uid in gone {
            self.delete(uid, now_ns, out);
        }
    }

    /// Record a window in which events may have been missed.
    pub fn gap(&mut self, from_ns: u64, to_ns: u64, out: &mut Vec<Change>) {
        if to_ns < from_ns {
            return;
        }
        let g = Gap { from_ns, to_ns };
        self.push_gap(g);
        out.push(Change::Gap(g));
    }

    /// Set the workload of open intervals whose owner was unresolved.
    pub fn set_workload(&mut self, uid: u128, workload: &Workload, out: &mut Vec<Change>) {
        let Some(ips) = self.live.get(&uid).map(|l| l.to_vec()) else {
            return;
        };
        for ip in ips {
            if self.set_workload_at(ip, uid, workload) {
                out.push(Change::Workload {
                    ip,
                    uid,
                    workload: workload.clone(),
                });
            }
        }
    }

    fn set_workload_at(&mut self, ip: IpAddr, uid: u128, workload: &Workload) -> bool {
        let kind = self.strings.intern(&workload.kind);
        let name = self.strings.intern(&workload.name);
        match self
            .by_ip
            .get_mut(&ip)
            .and_then(|v| v.iter_mut().rev().find(|i| i.uid == uid))
        {
            Some(iv) => {
                iv.workload_kind = kind;
                iv.workload_name = name;
                true
            }
            None => false,
        }
    }

    /// Drop closed intervals and gaps that ended before `cutoff_ns`.
    pub fn prune(&mut self, cutoff_ns: u64) {
        self.by_ip.retain(|_, v| {
            v.retain(|i| i.to_ns >= cutoff_ns);
            if v.capacity() > 2 * v.len() + 2 {
                v.shrink_to_fit();
            }
            !v.is_empty()
        });
        self.gaps.retain(|g| g.to_ns >= cutoff_ns);
    }

    /// Apply a change read back from disk (no fencing: it was done).
    pub fn replay(&mut self, c: Change) {
        match c {
            Change::Opened(ip, iv) => {
                if !self
                    .by_ip
                    .get(&ip)
                    .is_some_and(|v| v.iter().any(|i| i.uid == iv.uid && i.from_ns == iv.from_ns))
                {
                    self.insert(ip, iv);
                }
            }
            Change::Closed { ip, uid, to_ns } => {
                let mut ignore = Vec::new();
                self.close(ip, uid, to_ns, &mut ignore);
            }
            Change::Gap(g) => self.push_gap(g),
            Change::Workload { ip, uid, workload } => {
                self.set_workload_at(ip, uid, &workload);
            }
        }
    }

    /// The answer for `ip` for a connection from `start_ns` to `end_ns`
    /// (`end_ns == start_ns` for an instant).
    pub fn answer(&self, ip: IpAddr, start_ns: u64, end_ns: u64) -> PodAnswer {
        self.answer_in(ip, start_ns, start_ns, end_ns)
    }

    /// The pod that held `ip` at `at_ns`; `pod_ip_reused` when another pod
    /// held it within `[lo_ns, hi_ns]` (the connection's lifetime widened by
    /// the query's clock skew).
    pub fn answer_in(&self, ip: IpAddr, at_ns: u64, lo_ns: u64, hi_ns: u64) -> PodAnswer {
        let start_ns = at_ns;
        let lo_ns = lo_ns.min(at_ns);
        let end_ns = hi_ns.max(at_ns);
        let in_gap = self
            .gaps
            .iter()
            .any(|g| g.from_ns <= start_ns && start_ns <= g.to_ns);
        let empty = Vec::new();
        let ivs = self.by_ip.get(&ip).unwrap_or(&empty);
        let covers = |i: &&Interval| i.from_ns <= start_ns && start_ns < i.to_ns;
        let at: Option<&Interval> = ivs.iter().rev().find(|i| !i.host_network && covers(i));
        let overlapping: Vec<&Interval> = ivs
            .iter()
            .filter(|i| !i.host_network && i.from_ns <= end_ns && lo_ns < i.to_ns)
            .collect();
        let mut uids: Vec<u128> = overlapping.iter().map(|i| i.uid).collect();
        uids.dedup();
        let reused = uids.len() > 1;
        let holders = if reused {
            overlapping.iter().map(|i| self.pod_ref(i)).collect()
        } else {
            Vec::new()
        };
        if let Some(iv) = at {
            return PodAnswer {
                pod: Some(self.pod_ref(iv)),
                reason: None,
                verified: !in_gap,
                pod_ip_reused: reused,
                holders,
            };
        }
        let host: Vec<PodRef> = ivs
            .iter()
            .filter(|i| i.host_network && covers(i))
            .map(|i| self.pod_ref(i))
            .collect();
        let (reason, holders) = if !host.is_empty() {
            (NoPodReason::HostNetwork, host)
        } else if in_gap {
            (NoPodReason::HistoryGap, holders)
        } else {
            (NoPodReason::NoPodAtTime, holders)
        };
        PodAnswer {
            pod: None,
            reason: Some(reason),
            verified: !in_gap,
            pod_ip_reused: reused,
            holders,
        }
    }

    fn pod_ref(&self, i: &Interval) -> PodRef {
        let s = |x: Sym| self.strings.get(x).to_string();
        PodRef {
            namespace: s(i.namespace),
            name: i.name.to_string(),
            uid: uid_text(i.uid),
            workload: (i.workload_kind != Sym::NONE).then(|| Workload {
                kind: s(i.workload_kind),
                name: s(i.workload_name),
            }),
            node: s(i.node),
            host_network: i.host_network,
            from_ns: i.from_ns,
            to_ns: (i.to_ns != OPEN).then_some(i.to_ns),
        }
    }

    fn open_from(&self, ip: IpAddr, uid: u128) -> Option<u64> {
        self.by_ip
            .get(&ip)?
            .iter()
            .find(|i| i.uid == uid && i.to_ns == OPEN)
            .map(|i| i.from_ns)
    }

    fn insert(&mut self, ip: IpAddr, iv: Interval) {
        let uid = iv.uid;
        let open = iv.to_ns == OPEN;
        let v = self.by_ip.entry(ip).or_default();
        // Exact growth: most IPs hold one or two intervals (a Vec would
        // otherwise reserve four).
        v.reserve_exact(1);
        let pos = v.partition_point(|i| i.from_ns <= iv.from_ns);
        v.insert(pos, iv);
        if open {
            self.live.entry(uid).or_default().add(ip);
        }
        self.stats.opened += 1;
    }

    fn close(&mut self, ip: IpAddr, uid: u128, to_ns: u64, out: &mut Vec<Change>) {
        if let Some(iv) = self
            .by_ip
            .get_mut(&ip)
            .and_then(|v| v.iter_mut().find(|i| i.uid == uid && i.to_ns == OPEN))
        {
            iv.to_ns = to_ns.max(iv.from_ns);
            self.stats.closed += 1;
            out.push(Change::Closed {
                ip,
                uid,
                to_ns: iv.to_ns,
            });
        }
        if let Some(ips) = self.live.get_mut(&uid) {
            ips.remove(ip);
            if ips.is_empty() {
                self.live.remove(&uid);
            }
        }
    }

    fn push_gap(&mut self, g: Gap) {
        if let Some(last) = self.gaps.last_mut() {
            if g.from_ns <= last.to_ns && g.to_ns >= last.from_ns {
                last.from_ns = last.from_ns.min(g.from_ns);
                last.to_ns = last.to_ns.max(g.to_ns);
                return;
            }
        }
        self.gaps.push(g);
    }
}
