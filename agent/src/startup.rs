//! Start-up checks with one clear line each, the HTTP bind, and the
//! shutdown signal.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::bail;

/// CAP_NET_ADMIN is bit 12 of the effective capability set.
const CAP_NET_ADMIN: u32 = 12;

fn read_sysctl(name: &str) -> Option<String> {
    std::fs::read_to_string(format!("/proc/sys/net/netfilter/{name}"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// Parse `CapEff` from `/proc/self/status` text.
pub fn effective_caps(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

/// Fatal when the process lacks CAP_NET_ADMIN (needed for SO_RCVBUFFORCE,
/// conntrack events and dumps).
pub fn check_capabilities() -> anyhow::Result<()> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    match effective_caps(&status) {
        Some(caps) if caps & (1 << CAP_NET_ADMIN) != 0 => Ok(()),
        Some(_) => bail!(
            "missing CAP_NET_ADMIN: run as root, or grant it (systemd: AmbientCapabilities=CAP_NET_ADMIN; Kubernetes: securityContext.capabilities.add: [NET_ADMIN])"
        ),
        None => {
            tracing::warn!("cannot read CapEff from /proc/self/status; assuming CAP_NET_ADMIN");
            Ok(())
        }
    }
}

/// Fatal when conntrack is not available in this network namespace.
pub fn check_conntrack() -> anyhow::Result<()> {
    if read_sysctl("nf_conntrack_max").is_none() {
        bail!(
            "conntrack not available: /proc/sys/net/netfilter/nf_conntrack_max is missing (load it with: modprobe nf_conntrack nf_conntrack_netlink)"
        );
    }
    Ok(())
}

/// Warnings about sysctls that hide events or information.
pub fn warn_sysctls(capture_destroy: bool) {
    match read_sysctl("nf_conntrack_events").as_deref() {
        Some("0") => tracing::warn!(
            "net.netfilter.nf_conntrack_events=0: the kernel sends no conntrack events and only start-up/resync dumps will be seen; set: sysctl -w net.netfilter.nf_conntrack_events=1"
        ),
        Some("2") => tracing::info!(
            "net.netfilter.nf_conntrack_events=2 (auto): entries created before the agent started send no DESTROY event; set net.netfilter.nf_conntrack_events=1 to have them"
        ),
        _ => {}
    }
    if read_sysctl("nf_conntrack_timestamp").as_deref() == Some("0") {
        tracing::info!(
            "net.netfilter.nf_conntrack_timestamp=0: record times are when the agent read the event; set sysctl -w net.netfilter.nf_conntrack_timestamp=1 for kernel times and connection start/stop"
        );
    }
    if capture_destroy && read_sysctl("nf_conntrack_acct").as_deref() == Some("0") {
        tracing::info!(
            "net.netfilter.nf_conntrack_acct=0: closed connections carry no byte/packet counters; set sysctl -w net.netfilter.nf_conntrack_acct=1 to have them"
        );
    }
}

/// Bind the HTTP listener. `[::]` (from `:port`) falls back to `0.0.0.0`
/// on hosts without IPv6.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => Ok(l),
        Err(e) if addr.ip().is_unspecified() && addr.is_ipv6() => {
            let v4 = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), addr.port());
            tracing::info!(error = %e, "cannot bind [::], using 0.0.0.0");
            tokio::net::TcpListener::bind(v4)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {v4}: {e}"))
        }
        Err(e) => bail!("cannot listen on {addr}: {e}"),
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
    tracing::info!("shutdown signal received");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cap_eff() {
        let s = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(effective_caps(s), Some(0x1ff_ffff_ffff));
        assert!(effective_caps(s).is_some_and(|c| c & (1 << CAP_NET_ADMIN) != 0));
        assert_eq!(effective_caps("CapEff:\t0000000000000000\n"), Some(0));
        assert_eq!(effective_caps(""), None);
    }
}
