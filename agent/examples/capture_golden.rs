//! Captures raw ctnetlink event datagrams from the running kernel and writes
//! them as a golden file for the decoder and BPF tests.
//!
//! Usage: `capture_golden OUT.hex COUNT [TIMEOUT_SECS [KEEP]]`
//!
//! KEEP selects which datagrams count (default `all`): `nat_clash` keeps
//! only datagrams holding an entry with `IPS_NAT_CLASH` (status bit 12), so
//! a run of thousands of flows yields just the rare clash DESTROY events.
//!
//! Joins `NFNLGRP_CONNTRACK_NEW` (1) and `NFNLGRP_CONNTRACK_DESTROY` (3) on a
//! `NETLINK_NETFILTER` socket in the current network namespace (run it with
//! `ip netns exec`), prints `ready` on stdout once subscribed, then writes the
//! first COUNT datagrams to OUT.hex and exits; it fails when TIMEOUT_SECS
//! (default 20) pass first. The file format is read by the tests in
//! `agent/src/netlink/decode.rs`: `#` lines are comments, each datagram
//! starts with a `# datagram N len=L recv_ns=T` line followed by hex lines.
//! `agent/src/netlink/testdata/capture.sh` drives it.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

const NFNLGRP_CONNTRACK_NEW: u32 = 1;
const NFNLGRP_CONNTRACK_DESTROY: u32 = 3;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        bail!("usage: capture_golden OUT.hex COUNT [TIMEOUT_SECS]");
    }
    let out_path = &args[1];
    let count: usize = args[2].parse().context("COUNT must be a number")?;
    let timeout = Duration::from_secs(match args.get(3) {
        Some(s) => s.parse().context("TIMEOUT_SECS must be a number")?,
        None => 20,
    });
    let nat_clash_only = match args.get(4).map(String::as_str) {
        None | Some("all") => false,
        Some("nat_clash") => true,
        Some(k) => bail!("KEEP must be all or nat_clash, got {k:?}"),
    };

    let mut sock = Socket::new(NETLINK_NETFILTER).context("open NETLINK_NETFILTER")?;
    sock.bind(&SocketAddr::new(0, 0)).context("bind")?;
    sock.add_membership(NFNLGRP_CONNTRACK_NEW)
        .context("join NFNLGRP_CONNTRACK_NEW")?;
    sock.add_membership(NFNLGRP_CONNTRACK_DESTROY)
        .context("join NFNLGRP_CONNTRACK_DESTROY")?;
    ctw_agent::netlink::socket::set_recv_timeout(sock.as_raw_fd(), Duration::from_millis(200))
        .context("setsockopt SO_RCVTIMEO")?;

    println!("ready");
    std::io::stdout().flush()?;

    let deadline = Instant::now() + timeout;
    let mut datagrams: Vec<(u64, Vec<u8>)> = Vec::with_capacity(count);
    let mut buf = vec![0u8; 65536];
    while datagrams.len() < count {
        if Instant::now() > deadline {
            bail!(
                "timed out after {}s with {} of {count} datagrams",
                timeout.as_secs(),
                datagrams.len()
            );
        }
        match sock.recv(&mut &mut buf[..], 0) {
            Ok(n) if nat_clash_only && !has_nat_clash(&buf[..n]) => {}
            Ok(n) => {
                let recv_ns = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0);
                datagrams.push((recv_ns, buf[..n].to_vec()));
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => return Err(e).context("recv"),
        }
    }

    let mut out = String::new();
    out.push_str(&format!(
        "# ctnetlink event datagrams captured by agent/examples/capture_golden.rs ({count})\n"
    ));
    for (i, (recv_ns, d)) in datagrams.iter().enumerate() {
        out.push_str(&format!(
            "# datagram {} len={} recv_ns={recv_ns}\n",
            i + 1,
            d.len()
        ));
        for line in d.chunks(16) {
            let hex: Vec<String> = line.iter().map(|b| format!("{b:02x}")).collect();
            out.push_str(&hex.join(" "));
            out.push('\n');
        }
    }
    std::fs::write(out_path, out).with_context(|| format!("write {out_path}"))?;
    eprintln!("wrote {} datagrams to {out_path}", datagrams.len());
    Ok(())
}

/// Does any message of the datagram decode into a NAT-clash shadow entry?
fn has_nat_clash(dgram: &[u8]) -> bool {
    use ctw_agent::netlink::decode::{self, Decoded};
    decode::messages(dgram).any(
        |m| matches!(m.and_then(|m| decode::decode(&m, 0)), Ok(Decoded::Conn(r)) if r.nat_clash()),
    )
}
