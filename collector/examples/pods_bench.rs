//! Pod history benchmark (issue 13): memory per live pod and CPU per pod
//! watch event, at 100,000 live pods and 1,000 events/s.
//!
//! Each event is what the watch task does per pod event, minus the HTTP
//! stream: parse the Pod JSON (real schema, about 900 bytes) into
//! `k8s_openapi::api::core::v1::Pod`, extract the `PodState`, apply it to
//! the `PodHistory` with its journal on disk (heartbeat + fsync every 1 s, as in the collector).
//! Churn keeps the pod count constant: each pair of events deletes the
//! oldest pod and creates a new one that takes the freed IP (IP reuse).
//! Heap bytes are counted by a global allocator wrapper (exact live heap);
//! CPU is getrusage(RUSAGE_SELF) user+sys over the churn phase.
//!
//! `cargo run -p ctw-collector --example pods_bench -- [PODS] [EVENTS_PER_S] [SECONDS] [DIR]`
//! (defaults 100000 1000 60 /tmp/ctw-pods-bench); driven by `bench/pods.sh`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ctw_collector::pods::watch::pod_state;
use ctw_collector::pods::{Input, PodHistory, Workload};
use k8s_openapi::api::core::v1::Pod;

struct Counting;
static HEAP: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator, only counting bytes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        HEAP.fetch_add(l.size(), Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        HEAP.fetch_sub(l.size(), Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        HEAP.fetch_add(n, Ordering::Relaxed);
        HEAP.fetch_sub(l.size(), Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const S: u64 = 1_000_000_000;
const NAMESPACES: [&str; 5] = ["payments", "search", "checkout", "batch", "kube-system"];

/// Pod i's IP in 198.18.0.0/15 (TESTBED's range): 131,072 addresses.
fn ip_of(slot: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(
        u32::from(Ipv4Addr::new(198, 18, 0, 0)) + slot,
    ))
}

/// A Pod as the API server sends it (trimmed of nothing the history reads).
fn pod_json(i: u64, slot: u32, phase: &str) -> String {
    let ns = NAMESPACES[(i % 5) as usize];
    let dep = format!("svc-{}", i % 2000);
    format!(
        r#"{{"apiVersion":"v1","kind":"Pod","metadata":{{"name":"{dep}-7d9f8c6b5-{i:05x}","namespace":"{ns}","uid":"00000000-0000-4000-8000-{i:012x}","resourceVersion":"{i}","creationTimestamp":"2026-01-01T00:00:00Z","labels":{{"app":"{dep}","pod-template-hash":"7d9f8c6b5"}},"ownerReferences":[{{"apiVersion":"apps/v1","kind":"ReplicaSet","name":"{dep}-7d9f8c6b5","uid":"00000000-0000-4000-8000-00000000beef","controller":true,"blockOwnerDeletion":true}}]}},"spec":{{"nodeName":"node-{}","containers":[{{"name":"app","image":"registry.example/app:1.2.3","ports":[{{"containerPort":8080,"protocol":"TCP"}}]}}],"serviceAccountName":"default"}},"status":{{"phase":"{phase}","hostIP":"198.19.0.{}","podIP":"{ip}","podIPs":[{{"ip":"{ip}"}}],"startTime":"2026-01-01T00:00:00Z","conditions":[{{"type":"Ready","status":"True","lastTransitionTime":"2026-01-01T00:00:05Z"}}]}}}}"#,
        i % 100,
        i % 100,
        ip = ip_of(slot)
    )
}

fn state(json: &str) -> ctw_collector::pods::PodState {
    let pod: Pod = serde_json::from_str(json).expect("pod json");
    pod_state(&pod).expect("pod state")
}

fn cpu_s() -> f64 {
    // SAFETY: getrusage fills the struct we own.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0)
}

fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let pods: u64 = a.first().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let rate: u64 = a.get(1).and_then(|v| v.parse().ok()).unwrap_or(1_000);
    let seconds: u64 = a.get(2).and_then(|v| v.parse().ok()).unwrap_or(60);
    let dir = std::path::PathBuf::from(a.get(3).cloned().unwrap_or("/tmp/ctw-pods-bench".into()));
    assert!(pods <= 131_072, "at most 131072 pods (one /15)");
    let _ = std::fs::remove_dir_all(&dir);

    let heap0 = HEAP.load(Ordering::Relaxed);
    let rss0 = rss_kib();
    let h = PodHistory::open(&dir, 14 * 86_400 * S).expect("open");
    // The ReplicaSets' metadata (owner watch) arrives first: 2,000
    // Deployments, one ReplicaSet each in its namespace.
    for d in 0..2000u64 {
        let ns = NAMESPACES[(d % 5) as usize];
        h.apply(
            Input::Owner {
                kind: "ReplicaSet".into(),
                namespace: ns.into(),
                name: format!("svc-{d}-7d9f8c6b5"),
                owner: Some(Workload {
                    kind: "Deployment".into(),
                    name: format!("svc-{d}"),
                }),
            },
            S,
        );
    }
    // Initial list.
    let t0 = Instant::now();
    let c0 = cpu_s();
    h.apply(Input::ListBegin, S);
    for i in 0..pods {
        h.apply(Input::Listed(state(&pod_json(i, i as u32, "Running"))), S);
    }
    h.apply(Input::ListDone, S);
    h.tick(2 * S);
    let list_cpu = cpu_s() - c0;
    let list_wall = t0.elapsed();
    let heap_live = HEAP.load(Ordering::Relaxed) - heap0;
    let rss_live = rss_kib();

    // Churn: `rate` events/s, paced in 10 ms steps, in pairs: even pairs
    // delete the oldest pod then create one on its IP; odd pairs create the
    // new pod on the oldest pod's IP first (fencing it) and deliver the
    // oldest pod's delete after (late).
    let mut next_uid = pods;
    let mut oldest = 0u64;
    let mut slot_of: std::collections::HashMap<u64, u32> =
        (0..pods).map(|i| (i, i as u32)).collect();
    let heap_churn0 = HEAP.load(Ordering::Relaxed) - heap0;
    let start = Instant::now();
    let c1 = cpu_s();
    let mut done = 0u64;
    let mut last_tick = Instant::now();
    let total = rate * seconds / 2 * 2;
    let mut fake_ns = 10 * S;
    let mut apply_time = Duration::ZERO;
    while done < total {
        let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
        while done + 2 <= due.min(total) {
            let slot = slot_of.remove(&oldest).expect("slot");
            let old = state(&pod_json(oldest, slot, "Running"));
            let new = state(&pod_json(next_uid, slot, "Running"));
            let t = Instant::now();
            if (done / 2) % 2 == 0 {
                fake_ns += S / rate;
                h.apply(Input::Deleted(old), fake_ns);
                fake_ns += S / rate;
                h.apply(Input::Applied(new), fake_ns);
            } else {
                fake_ns += S / rate;
                h.apply(Input::Applied(new), fake_ns);
                fake_ns += S / rate;
                h.apply(Input::Deleted(old), fake_ns);
            }
            apply_time += t.elapsed();
            slot_of.insert(next_uid, slot);
            next_uid += 1;
            oldest += 1;
            done += 2;
        }
        if last_tick.elapsed() >= Duration::from_secs(1) {
            let t = Instant::now();
            h.tick(fake_ns);
            apply_time += t.elapsed();
            last_tick = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(10)); // pacing the load generator, not a wait for a condition
    }
    h.tick(fake_ns);
    let churn_cpu = cpu_s() - c1;
    let churn_wall = start.elapsed().as_secs_f64();
    let st = h.stats();
    let heap_end = HEAP.load(Ordering::Relaxed) - heap0;
    let closed = st.intervals - st.live;
    // heap_end includes the bench's own slot map (measured in heap_churn0).
    println!(
        "pods={pods} events/s={rate} seconds={seconds} dir={}",
        dir.display()
    );
    println!(
        "initial list: {pods} pods in {:.1} s wall, {:.2} s CPU ({:.1} us/pod)",
        list_wall.as_secs_f64(),
        list_cpu,
        list_cpu * 1e6 / pods as f64
    );
    println!(
        "heap after list: {} bytes = {:.0} bytes per live pod; RSS {} KiB -> {} KiB",
        heap_live,
        heap_live as f64 / pods as f64,
        rss0,
        rss_live
    );
    println!(
        "churn: {done} events in {churn_wall:.1} s ({:.0}/s), CPU {churn_cpu:.2} s = {:.1}% of one core, {:.1} us/event",
        done as f64 / churn_wall,
        churn_cpu * 100.0 / churn_wall,
        churn_cpu * 1e6 / done as f64
    );
    println!(
        "of which PodHistory::apply + heartbeats (journal fsync): {:.1} us/event wall",
        apply_time.as_secs_f64() * 1e6 / done.max(1) as f64
    );
    println!(
        "after churn: live intervals {}, closed intervals {closed}, fenced {}, gaps {}; heap {} bytes (+{:.0} bytes per closed interval); RSS {} KiB",
        st.live,
        st.history.fenced,
        st.gaps,
        heap_end,
        (heap_end as f64 - heap_churn0 as f64) / closed.max(1) as f64,
        rss_kib()
    );
    let journal = std::fs::metadata(dir.join("history.jsonl")).map_or(0, |m| m.len());
    println!("journal: {journal} bytes");
    let _ = std::fs::remove_dir_all(&dir);
}
