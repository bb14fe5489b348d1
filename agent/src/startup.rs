//! Start-up checks with one clear line each, the HTTP bind, and the
//! shutdown signal.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::bail;

/// CAP_NET_ADMIN is bit 12 of the effective capability set.
const CAP_NET_ADMIN: u32 = 12;

/// Directory of the conntrack sysctls of the agent's network namespace.
const NETFILTER_SYSCTLS: &str = "/proc/sys/net/netfilter";

fn read_sysctl(name: &str) -> Option<String> {
    std::fs::read_to_string(format!("{NETFILTER_SYSCTLS}/{name}"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// What [`enable_events`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventsSysctl {
    /// Already 1.
    AlreadyOn,
    /// Was `old`, now 1.
    Set { old: String },
    /// Not 1 and left so: disabled by config, unreadable, or the write failed.
    Left {
        value: Option<String>,
        reason: String,
    },
}

/// Set `nf_conntrack_events` to 1 in `dir` (a `/proc/sys/net/netfilter`)
/// when `enable` and it is not 1. Writing needs CAP_NET_ADMIN in the user
/// namespace owning the network namespace, and a writable /proc/sys (not a
/// read-only container mount).
pub fn set_events_sysctl(dir: &std::path::Path, enable: bool) -> EventsSysctl {
    let path = dir.join("nf_conntrack_events");
    let value = std::fs::read_to_string(&path)
        .ok()
        .map(|s| s.trim().to_string());
    match value.as_deref() {
        Some("1") => EventsSysctl::AlreadyOn,
        None => EventsSysctl::Left {
            value,
            reason: format!("cannot read {}", path.display()),
        },
        Some(_) if !enable => EventsSysctl::Left {
            value,
            reason: "netlink.enable_events is false".into(),
        },
        Some(old) => match std::fs::write(&path, "1\n") {
            Ok(()) => EventsSysctl::Set {
                old: old.to_string(),
            },
            Err(e) => EventsSysctl::Left {
                value: value.clone(),
                reason: format!("cannot write {}: {e}", path.display()),
            },
        },
    }
}

/// At start-up: make the kernel send events for every new entry
/// (`nf_conntrack_events=1`) when `enable` and allowed, and say so. With 2
/// (auto), entries created while no listener exists send no events at all,
/// so an agent restart leaves connections whose end is never reported; the
/// entries created before this call are re-checked by the capture instead.
/// When left unchanged, [`warn_sysctls`] warns as before.
pub fn enable_events(enable: bool) -> EventsSysctl {
    let r = set_events_sysctl(std::path::Path::new(NETFILTER_SYSCTLS), enable);
    match &r {
        EventsSysctl::Set { old } => tracing::info!(
            old = %old,
            new = "1",
            "set net.netfilter.nf_conntrack_events=1 (was {old}): every new conntrack entry now sends NEW and DESTROY events, also while no agent listens (after an agent restart, connections opened while it was down used to stay open forever in its records); entries created before are re-checked; disable with netlink.enable_events: false"
        ),
        EventsSysctl::Left {
            value: Some(v),
            reason,
        } if v != "1" && enable => tracing::warn!(
            value = %v,
            reason = %reason,
            "could not set net.netfilter.nf_conntrack_events=1 (needs CAP_NET_ADMIN in the namespace owning it and a writable /proc/sys)"
        ),
        _ => {}
    }
    r
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_sysctl_is_set_only_when_enabled_and_not_1() {
        let dir = std::env::temp_dir().join(format!("ctw-sysctl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let f = dir.join("nf_conntrack_events");
        std::fs::write(&f, "2\n").expect("write");
        assert!(matches!(
            set_events_sysctl(&dir, false),
            EventsSysctl::Left { value: Some(v), .. } if v == "2"
        ));
        assert_eq!(std::fs::read_to_string(&f).unwrap_or_default(), "2\n");
        assert_eq!(
            set_events_sysctl(&dir, true),
            EventsSysctl::Set { old: "2".into() }
        );
        assert_eq!(std::fs::read_to_string(&f).unwrap_or_default().trim(), "1");
        assert_eq!(set_events_sysctl(&dir, true), EventsSysctl::AlreadyOn);
        let _ = std::fs::remove_dir_all(&dir);
        assert!(matches!(
            set_events_sysctl(&dir, true),
            EventsSysctl::Left { value: None, .. }
        ));
    }

    #[test]
    fn parses_cap_eff() {
        let s = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(effective_caps(s), Some(0x1ff_ffff_ffff));
        assert!(effective_caps(s).is_some_and(|c| c & (1 << CAP_NET_ADMIN) != 0));
        assert_eq!(effective_caps("CapEff:\t0000000000000000\n"), Some(0));
        assert_eq!(effective_caps(""), None);
    }
}
