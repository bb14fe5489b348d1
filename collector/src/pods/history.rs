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
//! A pod the watch sees with a new IP may have held it since its start (the
//! kubelet posts `podIP` after the containers can connect): the interval
//! keeps that start as its handover window ([`Interval::maybe_from_ns`]), in
//! which no answer is verified and every possible holder is listed
//! ([`NoPodReason::IpHandover`] when there are several).
//!
//! Watch gaps (the collector was down, the watch broke, a 410 re-list) are
//! kept as time ranges; a name inside one is answered `verified: false`.
//!
//! Memory: a live pod costs one interval (about 90 bytes plus its name) and
//! one map slot; strings that repeat (namespace, node, workload) are interned.
//! Closed intervals (about 103 bytes each) are kept until the retention and
//! at most [`History::max_closed`] of them: past that bound the oldest
//! closed ones (smallest end) are evicted, and every time before the
//! newest evicted end ([`History::evicted_through_ns`]) that no kept
//! interval covers is answered `history_gap`, never `no_pod_at_time`.

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
    /// `status.startTime` (else `metadata.creationTimestamp`) in ns since
    /// the epoch, when set: the interval of a pod first seen by a re-list
    /// starts there, not at the list's time; for a pod first seen with the
    /// IP by the watch it starts the handover window
    /// ([`Interval::maybe_from_ns`]).
    pub start_ns: Option<u64>,
}

/// One pod's tenure of one IP, as stored (strings interned).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interval {
    pub uid: u128,
    /// ns since the epoch: when the watch first saw the pod hold the IP
    /// (or, for a pod first seen by a re-list, its start, never before the
    /// gap's start).
    pub from_ns: u64,
    /// ns since the epoch, at most `from_ns`: the pod's start
    /// (`status.startTime`, else `metadata.creationTimestamp`). The IP is
    /// assigned at sandbox creation and the pod can connect before its
    /// `podIP` is posted, so in `[maybe_from_ns, from_ns)` (the handover
    /// window) the pod may already hold the IP: never named as verified
    /// there. Equal to `from_ns` when there is no window. Never before the
    /// first sight of the pod's previous address of the same family (a
    /// recreated sandbox gets its new address after that).
    pub maybe_from_ns: u64,
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
    /// No interval covers the time and it falls in a watch gap, or before
    /// the end of the newest interval evicted by the
    /// `kubernetes.max_closed_intervals` bound (the pod that held the IP
    /// then may have been forgotten).
    HistoryGap,
    /// Only hostNetwork pods held the IP (the node's address): shared, so
    /// never named as if proven; see `candidates`.
    HostNetwork,
    /// The time falls in a handover window: a pod that started but whose
    /// `podIP` was not seen yet may already hold the IP while another pod
    /// is still seen holding it; both are in `holders`, neither is named.
    IpHandover,
}

/// The pod answer for (IP, connection start, connection end).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodAnswer {
    /// The pod that held the IP at the connection's start.
    pub pod: Option<PodRef>,
    /// Set exactly when `pod` is `None`.
    pub reason: Option<NoPodReason>,
    /// `false` when the time falls in a watch gap (the name is the best
    /// guess from before/after the gap, not proven), for `history_gap`, in
    /// a handover window ([`Interval::maybe_from_ns`]), and see
    /// [`History::answer_unknown_start`].
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
/// `[from_ns, to_ns)` (ns since the epoch; `to_ns` [`OPEN`] while held) may
/// be the pod's (`from_ns` is its handover window's start: the part before
/// the pod was seen with the address may also be the previous holder's).
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
    /// Closed intervals evicted by the [`History::max_closed`] bound.
    pub evicted: u64,
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

/// Default of [`History::max_closed`] (`kubernetes.max_closed_intervals`):
/// about 103 MB of closed intervals (103 bytes each, BENCHMARKS.md §4).
pub const DEFAULT_MAX_CLOSED: usize = 1_000_000;

/// The in-memory history (no I/O: [`super::journal`] persists its changes).
#[derive(Debug)]
pub struct History {
    pub(crate) strings: Interner,
    /// Intervals per IP, ordered by `from_ns`.
    pub(crate) by_ip: HashMap<IpAddr, Vec<Interval>>,
    /// The IPs each live pod holds (to close them on delete).
    pub(crate) live: HashMap<u128, LiveIps>,
    pub(crate) gaps: Vec<Gap>,
    /// Closed intervals kept (open ones are `intervals() - closed`).
    closed: usize,
    /// Most closed intervals kept; see [`History::enforce_bound`].
    pub max_closed: usize,
    /// Every closed interval that ended at or before this (ns since the
    /// epoch) may have been evicted; 0: none was.
    evicted_through_ns: u64,
    pub stats: Stats,
}

impl Default for History {
    fn default() -> Self {
        History {
            strings: Interner::default(),
            by_ip: HashMap::new(),
            live: HashMap::new(),
            gaps: Vec::new(),
            closed: 0,
            max_closed: DEFAULT_MAX_CLOSED,
            evicted_through_ns: 0,
            stats: Stats::default(),
        }
    }
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
    /// Closed intervals that ended at or before `through_ns` were evicted
    /// by the [`History::max_closed`] bound.
    Evicted {
        through_ns: u64,
    },
}

impl History {
    /// An empty history keeping at most `max_closed` closed intervals.
    pub fn new(max_closed: usize) -> History {
        History {
            max_closed,
            ..History::default()
        }
    }

    /// Number of open intervals (live pods with an IP, per IP).
    pub fn live_intervals(&self) -> usize {
        self.live.values().map(LiveIps::len).sum()
    }

    /// Number of stored intervals, open and closed.
    pub fn intervals(&self) -> usize {
        self.by_ip.values().map(Vec::len).sum()
    }

    /// Number of closed intervals kept.
    pub fn closed_intervals(&self) -> usize {
        self.closed
    }

    /// Closed intervals that ended at or before this time (ns since the
    /// epoch) may have been evicted; 0 when none was.
    pub fn evicted_through_ns(&self) -> u64 {
        self.evicted_through_ns
    }

    /// The recorded watch gaps, oldest first.
    pub fn gaps(&self) -> &[Gap] {
        &self.gaps
    }

    /// Keep at most [`History::max_closed`] closed intervals: past it, evict
    /// the oldest (smallest end) down to 90% of the bound (so the scan runs
    /// once per tenth of the bound's closes, not per close). Every closed
    /// interval ending at or before the cut-off goes (ties included), the
    /// cut-off becomes [`History::evicted_through_ns`] and a
    /// [`Change::Evicted`] is appended to `out`. Cost: one pass over the
    /// intervals and a temporary `u64` per closed one.
    pub fn enforce_bound(&mut self, out: &mut Vec<Change>) {
        if self.closed <= self.max_closed {
            return;
        }
        let target = self.max_closed - self.max_closed / 10;
        let excess = self.closed - target;
        let mut ends: Vec<u64> = self
            .by_ip
            .values()
            .flatten()
            .filter(|i| i.to_ns != OPEN)
            .map(|i| i.to_ns)
            .collect();
        if ends.is_empty() || excess == 0 {
            return;
        }
        let k = excess.min(ends.len()) - 1;
        let (_, cut, _) = ends.select_nth_unstable(k);
        let through_ns = *cut;
        drop(ends);
        self.evict_through(through_ns);
        out.push(Change::Evicted { through_ns });
    }

    /// Drop every closed interval that ended at or before `through_ns`.
    fn evict_through(&mut self, through_ns: u64) {
        let mut n = 0usize;
        self.by_ip.retain(|_, v| {
            let before = v.len();
            v.retain(|i| i.to_ns == OPEN || i.to_ns > through_ns);
            n += before - v.len();
            if v.capacity() > 2 * v.len() + 2 {
                v.shrink_to_fit();
            }
            !v.is_empty()
        });
        self.closed -= n.min(self.closed);
        self.stats.evicted += n as u64;
        self.evicted_through_ns = self.evicted_through_ns.max(through_ns);
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
                    && i.maybe_from_ns <= to_ns
                    && i.to_ns >= from_ns
                    && eq(&f.namespace, self.strings.get(i.namespace))
                    && eq(&f.pod, &i.name)
                    && eq(&f.workload_kind, self.strings.get(i.workload_kind))
                    && eq(&f.workload_name, self.strings.get(i.workload_name))
            })
            .map(|(ip, i)| Tenure {
                ip,
                from_ns: i.maybe_from_ns,
                to_ns: i.to_ns,
            })
            .collect();
        out.sort_by_key(|t| (t.from_ns, t.ip));
        out
    }

    /// Apply one observation of a pod by a list at `now_ns`, named by
    /// `workload` (its owner resolved); the changes are appended to `out`.
    /// An IP new to the pod opens an interval at `pod.start_ns` (capped at
    /// `now_ns`) when set, else at `now_ns` (the caller caps the start at
    /// the open gap's start, so the guessed part is inside the gap).
    pub fn observe(
        &mut self,
        pod: &PodState,
        workload: Option<&Workload>,
        now_ns: u64,
        out: &mut Vec<Change>,
    ) {
        self.observe_as(pod, workload, now_ns, true, out);
    }

    /// Apply one observation of a pod delivered by the watch at `now_ns`:
    /// an IP new to the pod opens an interval at `now_ns` (the first sight
    /// of the IP), with the handover window
    /// ([`Interval::maybe_from_ns`]) from `pod.start_ns` (capped at
    /// `now_ns`): the pod may have used the IP since then, but that is not
    /// proven, so other holders are fenced at `now_ns`, not before.
    pub fn observe_watched(
        &mut self,
        pod: &PodState,
        workload: Option<&Workload>,
        now_ns: u64,
        out: &mut Vec<Change>,
    ) {
        self.observe_as(pod, workload, now_ns, false, out);
    }

    fn observe_as(
        &mut self,
        pod: &PodState,
        workload: Option<&Workload>,
        now_ns: u64,
        listed: bool,
        out: &mut Vec<Change>,
    ) {
        let holds = if pod.terminal { &[][..] } else { &pod.ips[..] };
        // Close what the pod no longer holds.
        let old: Vec<IpAddr> = self
            .live
            .get(&pod.uid)
            .map(|l| l.to_vec())
            .unwrap_or_default();
        // When the pod was seen holding it, an address of a family held the
        // pod's sandbox of then: a new address of that family (a recreated
        // sandbox) came later, so its handover window starts no earlier.
        let seen_v4 = |v4: bool| {
            old.iter()
                .filter(|ip| ip.is_ipv4() == v4)
                .filter_map(|ip| self.open_from(*ip, pod.uid))
                .max()
        };
        let (seen4, seen6) = (seen_v4(true), seen_v4(false));
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
            // later. A listed pod starts at its start time when known (never
            // after now); a watched one at first sight, its start only
            // opening the handover window.
            let start = pod.start_ns.map_or(now_ns, |s| s.min(now_ns));
            let seen = if ip.is_ipv4() { seen4 } else { seen6 };
            let (from_ns, maybe_from_ns) = if listed {
                (start, start)
            } else {
                (now_ns, start.max(seen.unwrap_or(0)).min(now_ns))
            };
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
                maybe_from_ns,
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
        let mut n = 0usize;
        self.by_ip.retain(|_, v| {
            let before = v.len();
            v.retain(|i| i.to_ns >= cutoff_ns);
            n += before - v.len();
            if v.capacity() > 2 * v.len() + 2 {
                v.shrink_to_fit();
            }
            !v.is_empty()
        });
        // Only closed intervals end before a cut-off (OPEN is u64::MAX).
        self.closed -= n.min(self.closed);
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
            Change::Evicted { through_ns } => self.evict_through(through_ns),
        }
    }

    /// The answer for `ip` for a connection from `start_ns` to `end_ns`
    /// (`end_ns == start_ns` for an instant).
    pub fn answer(&self, ip: IpAddr, start_ns: u64, end_ns: u64) -> PodAnswer {
        self.answer_in(ip, start_ns, start_ns, end_ns)
    }

    /// The workload of the non-hostNetwork pod that held `ip` at `at_ns`
    /// (the pod [`History::answer`] names): (namespace, workload kind,
    /// workload name), kind and name empty for a pod without a controller;
    /// `None` when no pod is named. No allocation.
    pub fn workload_at(&self, ip: IpAddr, at_ns: u64) -> Option<(&str, &str, &str)> {
        let iv = self
            .by_ip
            .get(&ip)?
            .iter()
            .rev()
            .find(|i| !i.host_network && i.from_ns <= at_ns && at_ns < i.to_ns)?;
        Some((
            self.strings.get(iv.namespace),
            self.strings.get(iv.workload_kind),
            self.strings.get(iv.workload_name),
        ))
    }

    /// The pod that held `ip` at `at_ns`; `pod_ip_reused` when another pod
    /// held it within `[lo_ns, hi_ns]` (the connection's lifetime widened by
    /// the query's clock skew), a pod's handover window counting as held.
    ///
    /// Inside a handover window ([`Interval::maybe_from_ns`]) the answer is
    /// never verified: with one possible holder that pod is named
    /// unverified; with more, `pod` is `None` with reason
    /// [`NoPodReason::IpHandover`]; the reuse window then reaches back to
    /// the window's start, so every possible holder is in `holders`.
    pub fn answer_in(&self, ip: IpAddr, at_ns: u64, lo_ns: u64, hi_ns: u64) -> PodAnswer {
        let start_ns = at_ns;
        let mut lo_ns = lo_ns.min(at_ns);
        let end_ns = hi_ns.max(at_ns);
        let in_gap = self
            .gaps
            .iter()
            .any(|g| g.from_ns <= start_ns && start_ns <= g.to_ns);
        // Before the newest evicted end, an uncovered time may have been an
        // evicted pod's: a gap, never "no pod".
        let evicted = start_ns < self.evicted_through_ns;
        let empty = Vec::new();
        let ivs = self.by_ip.get(&ip).unwrap_or(&empty);
        let covers = |i: &&Interval| i.from_ns <= start_ns && start_ns < i.to_ns;
        let maybe = |i: &&Interval| {
            !i.host_network && i.maybe_from_ns <= start_ns && start_ns < i.from_ns.min(i.to_ns)
        };
        let at: Option<&Interval> = ivs.iter().rev().find(|i| !i.host_network && covers(i));
        let window: Vec<&Interval> = ivs.iter().filter(maybe).collect();
        if let Some(w) = window.iter().map(|i| i.maybe_from_ns).min() {
            lo_ns = lo_ns.min(w);
        }
        let overlapping: Vec<&Interval> = ivs
            .iter()
            .filter(|i| !i.host_network && i.maybe_from_ns <= end_ns && lo_ns < i.to_ns)
            .collect();
        let mut uids: Vec<u128> = overlapping.iter().map(|i| i.uid).collect();
        uids.sort_unstable();
        uids.dedup();
        let reused = uids.len() > 1;
        let holders = if reused {
            overlapping.iter().map(|i| self.pod_ref(i)).collect()
        } else {
            Vec::new()
        };
        if !window.is_empty() {
            // The possible holders at the time: the definite one (if any)
            // and every pod in its handover window.
            let mut possible: Vec<&Interval> = window;
            possible.extend(at);
            let mut puids: Vec<u128> = possible.iter().map(|i| i.uid).collect();
            puids.sort_unstable();
            puids.dedup();
            let (pod, reason) = if puids.len() == 1 {
                (Some(self.pod_ref(possible[0])), None)
            } else {
                (None, Some(NoPodReason::IpHandover))
            };
            return PodAnswer {
                pod,
                reason,
                verified: false,
                pod_ip_reused: reused,
                holders,
            };
        }
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
        } else if in_gap || evicted {
            (NoPodReason::HistoryGap, holders)
        } else {
            (NoPodReason::NoPodAtTime, holders)
        };
        PodAnswer {
            pod: None,
            reason: Some(reason),
            verified: !(in_gap || evicted),
            pod_ip_reused: reused,
            holders,
        }
    }

    /// The answer for a kernel entry from `ip` whose start is unknown (no
    /// `nf_conntrack_timestamp`), seen at `now_ns` (a live lookup, a table
    /// dump, a connection picked up mid-stream): it may be up to
    /// `max_age_ns` old; reuse is checked up to `hi_ns` (its last sight,
    /// at least `now_ns`). The pod holding `ip` at `now_ns` is named, but
    /// verified only when the entry cannot be an earlier holder's: no other
    /// pod held `ip` in `[now_ns - max_age_ns, now_ns]` and the pod held it
    /// since the window's start or the history is complete (no watch gap,
    /// no eviction) from the window's start to the pod's. Any other holder
    /// in the window (also one that is gone now, with no pod named) sets
    /// `pod_ip_reused` and is listed in `holders`.
    pub fn answer_unknown_start(
        &self,
        ip: IpAddr,
        now_ns: u64,
        max_age_ns: u64,
        hi_ns: u64,
    ) -> PodAnswer {
        let lo = now_ns.saturating_sub(max_age_ns);
        let mut a = self.answer_in(ip, now_ns, lo, hi_ns.max(now_ns));
        if a.pod_ip_reused {
            a.verified = false;
            return a;
        }
        let complete = |hi: u64| {
            self.evicted_through_ns <= lo
                && !self.gaps.iter().any(|g| g.from_ns <= hi && g.to_ns >= lo)
        };
        match &a.pod {
            Some(p) if p.from_ns > lo && !complete(p.from_ns) => a.verified = false,
            None if a.reason == Some(NoPodReason::NoPodAtTime) => {
                // No pod now, but one may have held the address while the
                // entry lived: list it, and name none as proven.
                let past: Vec<PodRef> = self
                    .by_ip
                    .get(&ip)
                    .into_iter()
                    .flatten()
                    .filter(|i| !i.host_network && i.maybe_from_ns <= now_ns && lo < i.to_ns)
                    .map(|i| self.pod_ref(i))
                    .collect();
                if !past.is_empty() {
                    a.pod_ip_reused = true;
                    a.holders = past;
                    a.verified = false;
                } else if !complete(now_ns) {
                    a.verified = false;
                }
            }
            _ => {}
        }
        a
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
            self.closed += 1;
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const S: u64 = 1_000_000_000;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([198, 18, 1, n])
    }

    fn pod(uid: u128, ip_n: u8) -> PodState {
        PodState {
            uid,
            namespace: "payments".into(),
            name: format!("p{uid}"),
            owner: None,
            node: "node-3".into(),
            host_network: false,
            ips: vec![ip(ip_n)],
            terminal: false,
            start_ns: None,
        }
    }

    /// Pod `uid` holds address `ip_n` from `from` s to `to` s.
    fn tenure(h: &mut History, uid: u128, ip_n: u8, from: u64, to: u64, out: &mut Vec<Change>) {
        h.observe(&pod(uid, ip_n), None, from * S, out);
        h.delete(uid, to * S, out);
        h.enforce_bound(out);
    }

    fn name(h: &History, ip_n: u8, t: u64) -> Option<String> {
        h.answer(ip(ip_n), t * S, t * S).pod.map(|p| p.name)
    }

    /// Pod `uid` with address `ip_n`, started (`status.startTime`) at
    /// `start` s.
    fn started_pod(uid: u128, ip_n: u8, start: u64) -> PodState {
        PodState {
            start_ns: Some(start * S),
            ..pod(uid, ip_n)
        }
    }

    fn names(a: &PodAnswer) -> Vec<&str> {
        a.holders.iter().map(|p| p.name.as_str()).collect()
    }

    #[test]
    fn handover_b_connects_before_its_ip_is_seen_then_a_is_deleted() {
        let mut h = History::default();
        let mut out = Vec::new();
        // A holds the address from 10 s. B starts at 30 s (startTime, no
        // podIP yet), connects at 31 s; its podIP is seen at 32 s; A's
        // delete arrives at 35 s.
        h.observe_watched(&started_pod(1, 1, 10), None, 10 * S, &mut out);
        h.observe_watched(&started_pod(2, 1, 30), None, 32 * S, &mut out);
        h.delete(1, 35 * S, &mut out);
        // B's first connection: A or B, never A verified.
        let a = h.answer(ip(1), 31 * S, 31 * S);
        assert_eq!((&a.pod, a.reason), (&None, Some(NoPodReason::IpHandover)));
        assert!(!a.verified);
        assert!(a.pod_ip_reused);
        assert_eq!(names(&a), ["p1", "p2"]);
        // Before B's start A is proven; an A connection lasting into B's
        // window is reused with both listed.
        let before = h.answer(ip(1), 20 * S, 20 * S);
        assert_eq!(before.pod.unwrap().name, "p1");
        assert!(before.verified && !before.pod_ip_reused);
        let long = h.answer(ip(1), 20 * S, 31 * S);
        assert_eq!(long.pod.as_ref().unwrap().name, "p1");
        assert!(long.verified && long.pod_ip_reused);
        assert_eq!(names(&long), ["p1", "p2"]);
        // From first sight B is proven; the late delete took nothing back.
        let after = h.answer(ip(1), 33 * S, 33 * S);
        assert_eq!(after.pod.unwrap().name, "p2");
        assert!(after.verified);
        assert_eq!(name(&h, 1, 40).as_deref(), Some("p2"));
        // A search by pod B covers its window.
        let f = PodFilter {
            pod: Some("p2".into()),
            ..PodFilter::default()
        };
        assert_eq!(h.tenures(&f, 0, u64::MAX)[0].from_ns, 30 * S);
    }

    #[test]
    fn handover_a_deleted_before_b_ip_is_seen() {
        let mut h = History::default();
        let mut out = Vec::new();
        // A holds the address from 10 s; B starts at 30 s and connects at
        // 31 s and 33 s; A's delete arrives at 32 s, B's podIP at 34 s.
        h.observe_watched(&started_pod(1, 1, 10), None, 10 * S, &mut out);
        h.delete(1, 32 * S, &mut out);
        h.observe_watched(&started_pod(2, 1, 30), None, 34 * S, &mut out);
        // 31 s: A still held it, B may have: both, none named.
        let a = h.answer(ip(1), 31 * S, 31 * S);
        assert_eq!((&a.pod, a.reason), (&None, Some(NoPodReason::IpHandover)));
        assert!(!a.verified && a.pod_ip_reused);
        assert_eq!(names(&a), ["p1", "p2"]);
        // 33 s: only B can have held it: B, unverified, A listed (it held
        // the address within B's window).
        let b = h.answer(ip(1), 33 * S, 33 * S);
        assert_eq!(b.pod.as_ref().unwrap().name, "p2");
        assert_eq!(b.reason, None);
        assert!(!b.verified && b.pod_ip_reused);
        assert_eq!(names(&b), ["p1", "p2"]);
        assert!(h.answer(ip(1), 35 * S, 35 * S).verified);
    }

    #[test]
    fn handover_after_create_a_delete_a_names_only_b_unverified() {
        let mut h = History::default();
        let mut out = Vec::new();
        // Create A, delete A (20 s), B starts at 25 s, podIP seen at 30 s.
        h.observe_watched(&pod(1, 1), None, 10 * S, &mut out);
        h.delete(1, 20 * S, &mut out);
        h.observe_watched(&started_pod(2, 1, 25), None, 30 * S, &mut out);
        let b = h.answer(ip(1), 27 * S, 27 * S);
        assert_eq!(b.pod.unwrap().name, "p2");
        assert!(!b.verified && !b.pod_ip_reused, "A ended before B's start");
        assert_eq!(
            h.answer(ip(1), 22 * S, 22 * S).reason,
            Some(NoPodReason::NoPodAtTime)
        );
        assert!(h.answer(ip(1), 15 * S, 15 * S).verified);
        // B (started 25 s, seen with address 1 at 30 s) has its sandbox
        // recreated and shows address 3 at 80 s, held by p9 since 10 s: B's
        // window there starts at 30 s (it held its old sandbox then), not
        // at its start.
        h.observe_watched(&started_pod(9, 3, 10), None, 10 * S, &mut out);
        h.observe_watched(&started_pod(2, 3, 25), None, 80 * S, &mut out);
        let p9 = h.answer(ip(3), 27 * S, 27 * S);
        assert!(p9.verified && p9.pod.unwrap().name == "p9");
        assert_eq!(
            h.answer(ip(3), 50 * S, 50 * S).reason,
            Some(NoPodReason::IpHandover)
        );
        assert!(h.answer(ip(3), 85 * S, 85 * S).verified);
        // A listed pod (re-list) starts at its start: no window.
        h.observe(&started_pod(3, 2, 40), None, 50 * S, &mut out);
        let c = h.answer(ip(2), 45 * S, 45 * S);
        assert!(c.verified && c.pod.is_some());
    }

    #[test]
    fn the_bound_evicts_the_oldest_closed_intervals_and_their_times_become_gaps() {
        let mut h = History {
            max_closed: 3,
            ..History::default()
        };
        let mut out = Vec::new();
        // Address 1: pods 1, 2, 3, 4 one after another (10 s each, 5 s
        // without a pod between them); address 2: pod 9, live throughout.
        h.observe(&pod(9, 2), None, 5 * S, &mut out);
        for (k, uid) in (1..=4u128).enumerate() {
            let from = 10 + 15 * k as u64;
            tenure(&mut h, uid, 1, from, from + 10, &mut out);
        }
        // The fourth close passed the bound (3): the oldest one went (down
        // to 90% of 3 = 3: one).
        assert_eq!((h.closed_intervals(), h.stats.evicted), (3, 1));
        assert_eq!(h.evicted_through_ns(), 20 * S);
        assert_eq!(
            out.iter()
                .filter(|c| matches!(c, Change::Evicted { .. }))
                .collect::<Vec<_>>(),
            [&Change::Evicted { through_ns: 20 * S }]
        );
        // Pod 1's time: no pod, because of the eviction: a gap, unverified,
        // never "no pod at time" and never another pod.
        let a = h.answer(ip(1), 15 * S, 15 * S);
        assert_eq!((a.pod, a.reason), (None, Some(NoPodReason::HistoryGap)));
        assert!(!a.verified);
        // Before any pod, but before the evicted end too: a gap as well.
        assert_eq!(
            h.answer(ip(1), 2 * S, 2 * S).reason,
            Some(NoPodReason::HistoryGap)
        );
        // The kept ones are still named; the pause between 2 and 3 (after
        // the evicted end) is "no pod".
        assert_eq!(name(&h, 1, 30).as_deref(), Some("p2"));
        assert_eq!(name(&h, 1, 45).as_deref(), Some("p3"));
        assert_eq!(name(&h, 1, 60).as_deref(), Some("p4"));
        assert_eq!(
            h.answer(ip(1), 37 * S, 37 * S).reason,
            Some(NoPodReason::NoPodAtTime)
        );
        // A live pod is never evicted, also for times before the evicted end.
        assert_eq!(name(&h, 2, 6).as_deref(), Some("p9"));
        assert!(h.answer(ip(2), 6 * S, 6 * S).verified);

        // A bound of 10 evicts down to 9 (a tenth of the bound at once).
        h.max_closed = 10;
        for uid in 10..=17u128 {
            let from = 100 + 15 * (uid as u64 - 10);
            tenure(&mut h, uid, 1, from, from + 10, &mut out);
        }
        assert_eq!(h.closed_intervals(), 9, "8 more kept: 11 > 10, cut to 9");
        assert_eq!(h.stats.evicted, 3);
        assert_eq!(h.evicted_through_ns(), 50 * S);
        assert_eq!(name(&h, 1, 45).as_deref(), None);
        assert_eq!(
            h.answer(ip(1), 45 * S, 45 * S).reason,
            Some(NoPodReason::HistoryGap)
        );
        assert_eq!(name(&h, 1, 60).as_deref(), Some("p4"));
        assert_eq!(name(&h, 1, 105).as_deref(), Some("p10"));
        assert_eq!(h.intervals(), 10, "9 closed + the live pod");
    }

    #[test]
    fn retention_and_eviction_count_closed_intervals_right() {
        let mut h = History {
            max_closed: 100,
            ..History::default()
        };
        let mut out = Vec::new();
        for uid in 1..=5u128 {
            tenure(
                &mut h,
                uid,
                uid as u8,
                10 * uid as u64,
                10 * uid as u64 + 5,
                &mut out,
            );
        }
        h.observe(&pod(6, 6), None, 70 * S, &mut out);
        assert_eq!(h.closed_intervals(), 5);
        h.prune(31 * S);
        assert_eq!(h.closed_intervals(), 3, "ended at 15, 25 s: pruned");
        // A replayed eviction line drops what the live eviction dropped.
        h.replay(Change::Evicted { through_ns: 45 * S });
        assert_eq!(h.closed_intervals(), 1);
        assert_eq!(h.live_intervals(), 1);
        assert_eq!(name(&h, 5, 52).as_deref(), Some("p5"));
        assert_eq!(
            h.answer(ip(4), 42 * S, 42 * S).reason,
            Some(NoPodReason::HistoryGap)
        );
    }
}
