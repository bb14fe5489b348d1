//! `ctw-loadgen`: generator of new IPv4 UDP flows for the conntrack-watch
//! benchmark.
//!
//! Every packet it sends is a distinct 5-tuple, so every packet that reaches a
//! conntrack-enabled namespace creates exactly one new conntrack entry (one
//! NEW event). Packets are built by hand (IPv4 + UDP header, UDP checksum 0)
//! and sent with `sendmmsg` on an `IPPROTO_RAW` socket (which implies
//! `IP_HDRINCL`), in batches.
//!
//! Flow `i` (0-based) is laid out deterministically, so the benchmark knows
//! exactly which flows were sent:
//!
//! * `slot = i % S` with `S = src_port_max - src_port_min + 1`;
//!   source port = `src_port_min + slot`
//! * `block = i / S`; destination = `dst[block % D]`,
//!   source = `src[(block / D) % N]`
//!   (the destination changes first, so that after masquerading, which keeps
//!   the source port when it can, the NATed tuples stay distinct as well)
//! * destination port: flow `i` is "watched" when
//!   `floor((i+1)*f) > floor(i*f)` (f = watched fraction, exact to 1e-6);
//!   watched flows cycle through the watched ports, the others through
//!   `other_ports_base .. other_ports_base + other_ports_count`.
//!
//! At the end a one-line JSON summary goes to stdout (including the
//! generator's own user/system CPU time: the kernel work of forwarding, NAT,
//! conntrack and event delivery runs mostly in the sender's context). `--flow-log FILE`
//! additionally writes every flow sent as `src,sport,dst,dport` lines.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

const USAGE: &str = "\
usage: ctw-loadgen --src IP[,IP...] --dst IP[,IP...] --flows N
                   [--watched-ports 80,443] [--watched-fraction 1.0]
                   [--other-ports-base 20000] [--other-ports-count 1000]
                   [--rate FLOWS_PER_S (0 = max)] [--batch 256]
                   [--src-port-min 1024] [--src-port-max 65535]
                   [--payload-bytes 16] [--flow-log FILE]";

const IP_HDR: usize = 20;
const UDP_HDR: usize = 8;
const MAX_PAYLOAD: usize = 1024;
const PPM: u64 = 1_000_000;

#[derive(Debug)]
struct Args {
    src: Vec<Ipv4Addr>,
    dst: Vec<Ipv4Addr>,
    flows: u64,
    watched_ports: Vec<u16>,
    watched_ppm: u64,
    other_base: u16,
    other_count: u16,
    rate: u64,
    batch: usize,
    sport_min: u16,
    sport_max: u16,
    payload: usize,
    flow_log: Option<String>,
}

fn parse_list<T: std::str::FromStr>(s: &str, what: &str) -> Result<Vec<T>> {
    let out: Vec<T> = s
        .split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            p.trim()
                .parse::<T>()
                .map_err(|_| anyhow::anyhow!("bad {what}: {p:?}"))
        })
        .collect::<Result<_>>()?;
    if out.is_empty() {
        bail!("empty {what} list");
    }
    Ok(out)
}

fn parse_fraction_ppm(s: &str) -> Result<u64> {
    let f: f64 = s.parse().with_context(|| format!("bad fraction {s:?}"))?;
    if !(0.0..=1.0).contains(&f) {
        bail!("--watched-fraction must be within 0..=1, got {f}");
    }
    // Exact enough for fractions like 0.1 / 0.25; documented as 1e-6 resolution.
    Ok((f * PPM as f64).round() as u64)
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        src: Vec::new(),
        dst: Vec::new(),
        flows: 0,
        watched_ports: vec![80, 443],
        watched_ppm: PPM,
        other_base: 20000,
        other_count: 1000,
        rate: 0,
        batch: 256,
        sport_min: 1024,
        sport_max: 65535,
        payload: 16,
        flow_log: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let val = it
            .next()
            .with_context(|| format!("{flag} needs a value\n{USAGE}"))?;
        match flag.as_str() {
            "--src" => a.src = parse_list(&val, "source address")?,
            "--dst" => a.dst = parse_list(&val, "destination address")?,
            "--flows" => a.flows = val.parse().context("--flows")?,
            "--watched-ports" => a.watched_ports = parse_list(&val, "port")?,
            "--watched-fraction" => a.watched_ppm = parse_fraction_ppm(&val)?,
            "--other-ports-base" => a.other_base = val.parse().context("--other-ports-base")?,
            "--other-ports-count" => a.other_count = val.parse().context("--other-ports-count")?,
            "--rate" => a.rate = val.parse().context("--rate")?,
            "--batch" => a.batch = val.parse().context("--batch")?,
            "--src-port-min" => a.sport_min = val.parse().context("--src-port-min")?,
            "--src-port-max" => a.sport_max = val.parse().context("--src-port-max")?,
            "--payload-bytes" => a.payload = val.parse().context("--payload-bytes")?,
            "--flow-log" => a.flow_log = Some(val),
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    if a.src.is_empty() || a.dst.is_empty() {
        bail!("--src and --dst are required\n{USAGE}");
    }
    if a.batch == 0 || a.batch > 1024 {
        bail!("--batch must be within 1..=1024");
    }
    if a.sport_min == 0 || a.sport_min > a.sport_max {
        bail!("bad source port range {}..={}", a.sport_min, a.sport_max);
    }
    if a.payload > MAX_PAYLOAD {
        bail!("--payload-bytes must be <= {MAX_PAYLOAD}");
    }
    if a.watched_ppm < PPM && a.other_count == 0 {
        bail!("--other-ports-count must be > 0 when some flows are unwatched");
    }
    let other_end = u32::from(a.other_base) + u32::from(a.other_count);
    if a.watched_ppm < PPM && other_end > 65536 {
        bail!("other ports range exceeds 65535");
    }
    for p in &a.watched_ports {
        if *p == 0 {
            bail!("watched port 0 is not valid");
        }
        if a.watched_ppm < PPM
            && u32::from(*p) >= u32::from(a.other_base)
            && u32::from(*p) < other_end
        {
            bail!("watched port {p} lies inside the other-ports range");
        }
    }
    let capacity = slots(&a) * (a.src.len() * a.dst.len()) as u64;
    if a.flows > capacity {
        bail!(
            "{} flows exceed the distinct 5-tuples available ({capacity} = {} source ports x {} sources x {} destinations); add --src or --dst addresses",
            a.flows,
            slots(&a),
            a.src.len(),
            a.dst.len()
        );
    }
    Ok(a)
}

fn slots(a: &Args) -> u64 {
    u64::from(a.sport_max - a.sport_min) + 1
}

/// Deterministic flow layout; see the module docs.
#[derive(Debug)]
struct FlowPlan<'a> {
    a: &'a Args,
    slots: u64,
    watched_seen: u64,
    other_seen: u64,
}

#[derive(Debug, Clone, Copy)]
struct Flow {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    watched: bool,
}

impl<'a> FlowPlan<'a> {
    fn new(a: &'a Args) -> Self {
        Self {
            a,
            slots: slots(a),
            watched_seen: 0,
            other_seen: 0,
        }
    }

    /// Flow `i`; must be called with i = 0, 1, 2, ... in order (port cycling).
    fn flow(&mut self, i: u64) -> Flow {
        let a = self.a;
        let slot = i % self.slots;
        let block = i / self.slots;
        let nd = a.dst.len() as u64;
        let ns = a.src.len() as u64;
        let dst = a.dst[(block % nd) as usize];
        let src = a.src[((block / nd) % ns) as usize];
        let sport = a.sport_min + slot as u16;
        let watched = (i + 1) * a.watched_ppm / PPM > i * a.watched_ppm / PPM;
        let dport = if watched {
            let p = a.watched_ports[(self.watched_seen % a.watched_ports.len() as u64) as usize];
            self.watched_seen += 1;
            p
        } else {
            let p = a.other_base + (self.other_seen % u64::from(a.other_count)) as u16;
            self.other_seen += 1;
            p
        };
        Flow {
            src,
            dst,
            sport,
            dport,
            watched,
        }
    }
}

fn write_packet(buf: &mut [u8], f: &Flow, payload: usize, seq: u64) {
    let total = (IP_HDR + UDP_HDR + payload) as u16;
    buf[..IP_HDR + UDP_HDR].fill(0);
    // IPv4 header; the kernel fills in the id (when 0) and the checksum for
    // IP_HDRINCL sockets, and always fixes up the total length.
    buf[0] = 0x45;
    buf[2..4].copy_from_slice(&total.to_be_bytes());
    buf[6] = 0x40; // DF
    buf[8] = 64; // TTL
    buf[9] = libc::IPPROTO_UDP as u8;
    buf[12..16].copy_from_slice(&f.src.octets());
    buf[16..20].copy_from_slice(&f.dst.octets());
    // UDP header, checksum 0 (= none, allowed for IPv4).
    let u = &mut buf[IP_HDR..];
    u[0..2].copy_from_slice(&f.sport.to_be_bytes());
    u[2..4].copy_from_slice(&f.dport.to_be_bytes());
    u[4..6].copy_from_slice(&((UDP_HDR + payload) as u16).to_be_bytes());
    let p = &mut buf[IP_HDR + UDP_HDR..IP_HDR + UDP_HDR + payload];
    for (k, b) in p.iter_mut().enumerate() {
        *b = (seq >> ((k % 8) * 8)) as u8;
    }
}

fn raw_socket() -> Result<libc::c_int> {
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error())
            .context("socket(AF_INET, SOCK_RAW, IPPROTO_RAW) (needs CAP_NET_RAW)");
    }
    let sndbuf: libc::c_int = 4 << 20;
    // SAFETY: valid fd and a pointer to a c_int of the given size. Failure is
    // harmless (the default buffer only means more ENOBUFS retries).
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDBUFFORCE,
            (&sndbuf as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    Ok(fd)
}

fn sockaddr(ip: Ipv4Addr) -> libc::sockaddr_in {
    // SAFETY: sockaddr_in is plain old data; all-zero is a valid value.
    let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sa.sin_family = libc::AF_INET as libc::sa_family_t;
    sa.sin_addr.s_addr = u32::from_ne_bytes(ip.octets());
    sa
}

#[derive(Debug, Default)]
struct Stats {
    sent: u64,
    watched: u64,
    other: u64,
    per_port: BTreeMap<u16, u64>,
    syscalls: u64,
    retries: u64,
}

/// Sends `n` prepared messages, retrying on partial sends and transient
/// errors, so that on return every message was accepted by the kernel.
fn send_all(fd: libc::c_int, msgs: &mut [libc::mmsghdr], stats: &mut Stats) -> Result<()> {
    let mut off = 0usize;
    while off < msgs.len() {
        let rest = &mut msgs[off..];
        // SAFETY: `rest` points into live mmsghdr entries whose iovecs and
        // names point into buffers that outlive this call.
        let r = unsafe { libc::sendmmsg(fd, rest.as_mut_ptr(), rest.len() as libc::c_uint, 0) };
        stats.syscalls += 1;
        if r < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) | Some(libc::EAGAIN) => stats.retries += 1,
                Some(libc::ENOBUFS) => {
                    stats.retries += 1;
                    std::thread::sleep(Duration::from_micros(50));
                }
                _ => return Err(e).context("sendmmsg"),
            }
            continue;
        }
        off += r as usize;
    }
    Ok(())
}

fn run(a: &Args) -> Result<(Stats, Duration)> {
    let fd = raw_socket()?;
    let frame = IP_HDR + UDP_HDR + a.payload;
    let nb = a.batch;
    let mut bufs = vec![0u8; frame * nb];
    let mut addrs: Vec<libc::sockaddr_in> = vec![sockaddr(Ipv4Addr::UNSPECIFIED); nb];
    // SAFETY: iovec / mmsghdr are plain old data; zeroed is valid and every
    // pointer field is set below before use.
    let mut iovs: Vec<libc::iovec> = vec![unsafe { std::mem::zeroed() }; nb];
    let mut msgs: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; nb];

    let mut flow_log = match &a.flow_log {
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("create {p}"))?,
        )),
        None => None,
    };

    let mut plan = FlowPlan::new(a);
    let mut stats = Stats::default();
    let batch_for_rate = if a.rate > 0 {
        (a.rate / 1000).clamp(1, nb as u64) as usize
    } else {
        nb
    };
    let start = Instant::now();
    let mut i = 0u64;
    while i < a.flows {
        let n = ((a.flows - i) as usize).min(batch_for_rate);
        for k in 0..n {
            let f = plan.flow(i + k as u64);
            let buf = &mut bufs[k * frame..(k + 1) * frame];
            write_packet(buf, &f, a.payload, i + k as u64);
            addrs[k] = sockaddr(f.dst);
            iovs[k].iov_base = buf.as_mut_ptr().cast();
            iovs[k].iov_len = frame;
            let h = &mut msgs[k].msg_hdr;
            h.msg_name = (&mut addrs[k] as *mut libc::sockaddr_in).cast();
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            h.msg_iov = &mut iovs[k];
            h.msg_iovlen = 1;
            h.msg_control = std::ptr::null_mut();
            h.msg_controllen = 0;
            h.msg_flags = 0;
            if f.watched {
                stats.watched += 1;
            } else {
                stats.other += 1;
            }
            *stats.per_port.entry(f.dport).or_insert(0) += 1;
            if let Some(w) = flow_log.as_mut() {
                writeln!(w, "{},{},{},{}", f.src, f.sport, f.dst, f.dport)?;
            }
        }
        send_all(fd, &mut msgs[..n], &mut stats)?;
        i += n as u64;
        stats.sent = i;
        if a.rate > 0 {
            let due = Duration::from_secs_f64(i as f64 / a.rate as f64);
            let el = start.elapsed();
            if due > el {
                std::thread::sleep(due - el);
            }
        }
    }
    let elapsed = start.elapsed();
    // SAFETY: fd is ours and not used afterwards.
    unsafe { libc::close(fd) };
    if let Some(mut w) = flow_log {
        w.flush()?;
    }
    Ok((stats, elapsed))
}

/// (user, system) CPU seconds of this process so far.
fn cpu_times() -> (f64, f64) {
    // SAFETY: rusage is plain old data and getrusage only writes into it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return (0.0, 0.0);
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (tv(ru.ru_utime), tv(ru.ru_stime))
}

fn json_ips(v: &[Ipv4Addr]) -> String {
    let parts: Vec<String> = v.iter().map(|ip| format!("\"{ip}\"")).collect();
    format!("[{}]", parts.join(","))
}

fn main() -> Result<()> {
    let a = parse_args()?;
    let (u0, s0) = cpu_times();
    let (st, el) = run(&a)?;
    let (u1, s1) = cpu_times();
    let secs = el.as_secs_f64();
    let rate = if secs > 0.0 {
        st.sent as f64 / secs
    } else {
        0.0
    };
    let per_port: Vec<String> = st
        .per_port
        .iter()
        .map(|(p, c)| format!("\"{p}\":{c}"))
        .collect();
    let watched_ports: Vec<String> = a.watched_ports.iter().map(|p| p.to_string()).collect();
    println!(
        "{{\"flows_sent\":{},\"watched_flows\":{},\"other_flows\":{},\"watched_ports\":[{}],\"watched_fraction\":{},\"per_port\":{{{}}},\"elapsed_s\":{:.6},\"rate_flows_per_s\":{:.1},\"src\":{},\"dst\":{},\"src_port_min\":{},\"src_port_max\":{},\"other_ports_base\":{},\"other_ports_count\":{},\"batch\":{},\"sendmmsg_calls\":{},\"send_retries\":{},\"cpu_user_s\":{:.3},\"cpu_sys_s\":{:.3}}}",
        st.sent,
        st.watched,
        st.other,
        watched_ports.join(","),
        a.watched_ppm as f64 / PPM as f64,
        per_port.join(","),
        secs,
        rate,
        json_ips(&a.src),
        json_ips(&a.dst),
        a.sport_min,
        a.sport_max,
        a.other_base,
        a.other_count,
        a.batch,
        st.syscalls,
        st.retries,
        u1 - u0,
        s1 - s0,
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(flows: u64, ppm: u64) -> Args {
        Args {
            src: vec![Ipv4Addr::new(198, 18, 1, 2), Ipv4Addr::new(198, 18, 1, 3)],
            dst: vec![Ipv4Addr::new(198, 19, 0, 1), Ipv4Addr::new(198, 19, 0, 2)],
            flows,
            watched_ports: vec![80, 443],
            watched_ppm: ppm,
            other_base: 20000,
            other_count: 1000,
            rate: 0,
            batch: 256,
            sport_min: 1024,
            sport_max: 65535,
            payload: 16,
            flow_log: None,
        }
    }

    #[test]
    fn flows_are_distinct_and_fraction_exact() {
        let a = args(200_000, 100_000);
        let mut plan = FlowPlan::new(&a);
        let mut seen = std::collections::HashSet::new();
        let mut watched = 0;
        for i in 0..a.flows {
            let f = plan.flow(i);
            assert!(seen.insert((f.src, f.sport, f.dst)));
            if f.watched {
                watched += 1;
                assert!(f.dport == 80 || f.dport == 443);
            } else {
                assert!((20000..21000).contains(&f.dport));
            }
        }
        assert_eq!(watched, 20_000);
    }
}
