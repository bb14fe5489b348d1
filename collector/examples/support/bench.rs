//! What the store benchmarks share (`store_bench`, `clickhouse_bench`,
//! included with `#[path]`): the record generator (a node mix of pods,
//! services, SNAT ports and lifetimes, from a fixed seed, so both stores
//! index the same records), reservoir sampling of query probes, CPU time
//! from `/proc` and percentiles.

use std::net::{IpAddr, Ipv4Addr};

use ctw_common::{status, ConnRecord, Counters, EventKind, Protocol, TcpState, Tuple};

pub const NODES: usize = 20;
pub const PODS: usize = 5000;
pub const SERVICES: usize = 20;
pub const SPAN_NS: u64 = 7 * 24 * 3_600_000_000_000;

pub struct Gen {
    pub rng: fastrand::Rng,
    t0: u64,
    dt: u64,
    pub i: u64,
    services: Vec<(Ipv4Addr, u16, Protocol)>,
}

impl Gen {
    pub fn new(n: u64, t0: u64) -> Gen {
        let mut rng = fastrand::Rng::with_seed(42);
        let ports = [443u16, 80, 5432, 6379, 8080, 9200, 3306, 27017];
        let services = (0..SERVICES)
            .map(|k| {
                let udp = rng.u64(..5) == 0;
                let ip = Ipv4Addr::new(203, 0, 113, 1 + k as u8);
                if udp {
                    (ip, [53u16, 123][k % 2], Protocol::Udp)
                } else {
                    (ip, ports[k % ports.len()], Protocol::Tcp)
                }
            })
            .collect();
        Gen {
            rng,
            t0,
            dt: (SPAN_NS / n.max(1)).max(1),
            i: 0,
            services,
        }
    }

    pub fn node_name(n: usize) -> String {
        format!("node-{n:02}")
    }

    pub fn record(&mut self, node: usize) -> ConnRecord {
        let r = &mut self.rng;
        let event_ns = self.t0 + self.i * self.dt + r.u64(..self.dt.max(1));
        self.i += 1;
        let pod = node + NODES * r.u64(..(PODS / NODES) as u64) as usize;
        let pod_ip = Ipv4Addr::new(198, 18, (pod / 256) as u8, (pod % 256) as u8);
        let node_ip = Ipv4Addr::new(10, 0, 0, 10 + node as u8);
        // 80% TCP: pick among services of the drawn protocol.
        let want_udp = r.u64(..5) == 0;
        let cands: Vec<_> = self
            .services
            .iter()
            .filter(|s| (s.2 == Protocol::Udp) == want_udp)
            .collect();
        let (svc_ip, svc_port, protocol) = *cands[r.u64(..cands.len() as u64) as usize];
        let src_port = 32768 + r.u64(..28232) as u16;
        let snat_port = 1024 + r.u64(..65536 - 1024) as u16;
        let destroy = r.u64(..5) == 0;
        let tcp = protocol == Protocol::Tcp;
        let (kind, start_ns, stop_ns, status, tcp_state, counters) = if destroy {
            let life = 1_000_000 + r.u64(..600_000_000_000);
            let c = |r: &mut fastrand::Rng| {
                let packets = 2 + r.u64(..200);
                Some(Counters {
                    packets,
                    bytes: packets * (60 + r.u64(..1400)),
                })
            };
            (
                EventKind::Destroy,
                Some(event_ns - life),
                Some(event_ns),
                status::CONFIRMED | status::SRC_NAT | status::SEEN_REPLY | status::ASSURED,
                tcp.then_some(TcpState::TimeWait),
                (c(r), c(r)),
            )
        } else {
            (
                EventKind::New,
                Some(event_ns),
                None,
                status::CONFIRMED | status::SRC_NAT,
                tcp.then_some(TcpState::SynSent),
                (None, None),
            )
        };
        let flags = [0x23u8, 0x27, 0x03];
        ConnRecord {
            kind,
            event_ns,
            protocol,
            orig: Tuple {
                src: IpAddr::V4(pod_ip),
                dst: IpAddr::V4(svc_ip),
                src_port,
                dst_port: svc_port,
            },
            reply: Tuple {
                src: IpAddr::V4(svc_ip),
                dst: IpAddr::V4(node_ip),
                src_port: svc_port,
                dst_port: snat_port,
            },
            id: r.u64(..) as u32,
            zone: 0,
            mark: 0,
            status,
            tcp_state,
            tcp_flags_orig: if tcp { flags[r.u64(..3) as usize] } else { 0 },
            tcp_flags_reply: if tcp && destroy {
                flags[r.u64(..3) as usize]
            } else {
                0
            },
            start_ns,
            stop_ns,
            counters_orig: counters.0,
            counters_reply: counters.1,
        }
    }
}

/// Reservoir sampling of 1000 records: `seen` counts records so far,
/// this one included.
pub fn sample(
    samples: &mut Vec<(String, ConnRecord)>,
    rng: &mut fastrand::Rng,
    seen: u64,
    node: String,
    r: ConnRecord,
) {
    if samples.len() < 1000 {
        samples.push((node, r));
    } else {
        let j = rng.u64(..seen) as usize;
        if j < 1000 {
            samples[j] = (node, r);
        }
    }
}

/// The ingest phase's input: `n` records of `gen` in batches of `batch`,
/// the nodes in turn (each node's `seq` from 1, boot `boot_id`), each
/// handed to `sink` (stops at its first error); progress on stderr every
/// 10 s. Returns 1000 records sampled from them (seed 7) for the query
/// phase.
pub fn feed<E>(
    gen: &mut Gen,
    n: u64,
    batch: usize,
    boot_id: &str,
    mut sink: impl FnMut(ctw_collector::store::StoredBatch) -> Result<(), E>,
) -> Result<Vec<(String, ConnRecord)>, E> {
    let mut samples = Vec::new();
    let mut sample_rng = fastrand::Rng::with_seed(7);
    let mut seqs = [0u64; NODES];
    let start = std::time::Instant::now();
    let mut last_report = start;
    let (mut done, mut b) = (0u64, 0usize);
    while done < n {
        let node = b % NODES;
        b += 1;
        let k = batch.min((n - done) as usize);
        let records: Vec<ConnRecord> = (0..k).map(|_| gen.record(node)).collect();
        for r in &records {
            done += 1;
            sample(
                &mut samples,
                &mut sample_rng,
                done,
                Gen::node_name(node),
                *r,
            );
        }
        seqs[node] += 1;
        sink(ctw_collector::store::StoredBatch {
            node: Gen::node_name(node),
            boot_id: boot_id.to_string(),
            seq: seqs[node],
            records,
        })?;
        if last_report.elapsed() > std::time::Duration::from_secs(10) {
            last_report = std::time::Instant::now();
            eprintln!(
                "  {done} records, {:.0} records/s",
                done as f64 / start.elapsed().as_secs_f64()
            );
        }
    }
    Ok(samples)
}

pub fn cpu_seconds() -> f64 {
    cpu_seconds_of("self")
}

/// utime + stime of process `pid` (`self`: this one), in seconds.
pub fn cpu_seconds_of(pid: &str) -> f64 {
    // In clock ticks (USER_HZ = 100 on Linux).
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = s.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// The exact SNAT ip:port ± 5 min search for a sampled record, as both
/// store benchmarks make it.
pub fn snat_query(r: &ConnRecord) -> ctw_collector::store::SearchQuery {
    let (ip, port) = r.snat();
    ctw_collector::store::SearchQuery {
        snat_ip: Some(ip),
        snat_port: Some(port),
        from_ns: Some(r.event_ns - 300_000_000_000),
        to_ns: Some(r.event_ns + 300_000_000_000),
        at_ns: Some(r.event_ns),
        limit: 10,
        ..Default::default()
    }
}

/// Pod-address ± 5 min searches (the source address alone) of the first
/// 200 samples, as both store benchmarks make them: (p50, p99) in ms.
pub fn pod_query_latency(
    store: &dyn ctw_collector::store::RecordStore,
    samples: &[(String, ConnRecord)],
) -> Result<(f64, f64), ctw_collector::store::StoreError> {
    let mut lat = Vec::new();
    for (_, r) in samples.iter().take(200) {
        let q = ctw_collector::store::SearchQuery {
            src_ip: Some(r.orig.src),
            from_ns: Some(r.event_ns - 300_000_000_000),
            to_ns: Some(r.event_ns + 300_000_000_000),
            limit: 10,
            ..Default::default()
        };
        let t = std::time::Instant::now();
        store.search(&q)?;
        lat.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok((pct(&mut lat, 0.5), pct(&mut lat, 0.99)))
}

pub fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}
