//! Opening the stream to the collector: mTLS channel, HTTP/2 tuning, Hello;
//! reconnect backoff; the node addresses announced in Hello.

use std::hash::{BuildHasher, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::time::Duration;

use ctw_proto::pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use super::UplinkTls;

/// HTTP/2 windows. 100k records/s is about 10 MB/s; over a 50 ms round trip
/// that needs 0.5 MB in flight, so 8 MiB per stream and 16 MiB per
/// connection never throttle the stream (the collector's own settings bound
/// what the agent may send; it uses the same sizes).
pub const STREAM_WINDOW_BYTES: u32 = 8 << 20;
pub const CONNECTION_WINDOW_BYTES: u32 = 16 << 20;
/// HTTP/2 pings find a dead peer behind a silent network.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);
/// Largest message the agent sends or accepts.
const MAX_MESSAGE_BYTES: usize = 64 << 20;
/// Messages queued for the stream before the uplink waits for HTTP/2.
const OUTBOUND_QUEUE: usize = 32;

/// Where and how to connect; built once from the config.
#[derive(Debug, Clone)]
pub struct Target {
    pub address: String,
    /// TLS name the collector's certificate must carry.
    pub domain: String,
    pub tls: UplinkTls,
    pub timeout: Duration,
}

/// An open stream: Hello was sent, the HelloAck is still to come.
#[derive(Debug)]
pub struct Session {
    pub inbound: tonic::Streaming<pb::CollectorMessage>,
    pub outbound: mpsc::Sender<pb::AgentMessage>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot read {path}: {error}")]
    TlsFile { path: String, error: String },
    #[error("{0}")]
    Transport(String),
    #[error("collector refused the stream: {0}")]
    Status(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// `error` and its sources, joined: tonic's top-level messages say little.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut s = error.to_string();
    let mut cur = error.source();
    while let Some(e) = cur {
        let m = e.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = e.source();
    }
    s
}

/// Checks `https://host:port` and returns the host (without IPv6 brackets).
pub fn parse_address(address: &str) -> Result<String, String> {
    let uri: tonic::codegen::http::Uri = address
        .parse()
        .map_err(|e| format!("{address:?} is not a URL: {e}"))?;
    if uri.scheme_str() != Some("https") {
        return Err(format!("{address:?} must start with https://"));
    }
    let host = uri
        .host()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| format!("{address:?} has no host"))?;
    if uri.port_u16().is_none() {
        return Err(format!("{address:?} has no port"));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(format!(
            "{address:?} must be https://host:port, without a path"
        ));
    }
    Ok(host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string())
}

fn read_pem(path: &Path, what: &str) -> Result<Vec<u8>, ConnectError> {
    let err = |error: String| ConnectError::TlsFile {
        path: path.display().to_string(),
        error,
    };
    let b = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    if !b.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(err(format!("no PEM {what} in the file")));
    }
    Ok(b)
}

/// The TLS settings, from the files as they are now (so renewed
/// certificates are used on the next connection).
fn tls_config(t: &Target) -> Result<ClientTlsConfig, ConnectError> {
    let ca = read_pem(&t.tls.ca_file, "certificate")?;
    let cert = read_pem(&t.tls.cert_file, "certificate")?;
    let key = read_pem(&t.tls.key_file, "private key")?;
    Ok(ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .identity(Identity::from_pem(cert, key))
        .domain_name(t.domain.clone())
        .timeout(t.timeout))
}

/// Connects, opens the stream and sends `hello` on it.
pub async fn connect(t: Target, hello: pb::Hello) -> Result<Session, ConnectError> {
    let timeout = t.timeout;
    match tokio::time::timeout(timeout, connect_inner(t, hello)).await {
        Ok(r) => r,
        Err(_) => Err(ConnectError::Timeout(timeout)),
    }
}

async fn connect_inner(t: Target, hello: pb::Hello) -> Result<Session, ConnectError> {
    let transport = |e: tonic::transport::Error| ConnectError::Transport(error_chain(&e));
    let endpoint = Endpoint::from_shared(t.address.clone())
        .map_err(transport)?
        .tls_config(tls_config(&t)?)
        .map_err(transport)?
        .connect_timeout(t.timeout)
        .tcp_nodelay(true)
        .tcp_keepalive(Some(TCP_KEEPALIVE))
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES);
    let channel = endpoint.connect().await.map_err(transport)?;
    let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE);
    tx.try_send(pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Hello(hello)),
    })
    .map_err(|_| ConnectError::Transport("outbound queue closed".into()))?;
    let mut client = pb::ingest_client::IngestClient::new(channel)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let resp = client
        .stream(ReceiverStream::new(rx))
        .await
        .map_err(|s| ConnectError::Status(format!("{:?}: {}", s.code(), s.message())))?;
    Ok(Session {
        inbound: resp.into_inner(),
        outbound: tx,
    })
}

/// A random number without a random crate: the std hasher's per-instance keys.
pub fn random_u64() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    );
    h.finish()
}

/// Exponential backoff with jitter: each delay is drawn from [d/2, d], d
/// doubling from `min` to `max`.
#[derive(Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    cur: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max: max.max(min),
            cur: min,
        }
    }

    pub fn next_delay(&mut self) -> Duration {
        let d = self.cur;
        self.cur = (self.cur * 2).min(self.max);
        let half = d / 2;
        let jitter_ns = half.as_nanos() as u64;
        let extra = if jitter_ns == 0 {
            0
        } else {
            random_u64() % (jitter_ns + 1)
        };
        half + Duration::from_nanos(extra)
    }

    pub fn reset(&mut self) {
        self.cur = self.min;
    }
}

/// Whether an address is worth announcing as the node's own: not loopback,
/// link-local, unspecified, multicast or broadcast.
pub fn is_global(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => {
            !(a.is_loopback()
                || a.is_link_local()
                || a.is_unspecified()
                || a.is_multicast()
                || a.is_broadcast())
        }
        IpAddr::V6(a) => {
            !(a.is_loopback()
                || a.is_unspecified()
                || a.is_multicast()
                || (a.segments()[0] & 0xffc0) == 0xfe80)
        }
    }
}

/// Every global address of the host's interfaces, sorted, without repeats.
pub fn host_addresses() -> std::io::Result<Vec<IpAddr>> {
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `ifap` with a list we free below.
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = ifap;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, alive
        // until freeifaddrs.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points to a sockaddr whose family tells its
            // real type; we read the larger types only for their family.
            let ip = unsafe {
                match i32::from((*ifa.ifa_addr).sa_family) {
                    libc::AF_INET => {
                        let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                        Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                            sin.sin_addr.s_addr,
                        ))))
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                        Some(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)))
                    }
                    _ => None,
                }
            };
            if let Some(ip) = ip.filter(is_global) {
                out.push(ip);
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: the list came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(ifap) };
    out.sort();
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_checked() {
        assert_eq!(
            parse_address("https://collector:7443").as_deref(),
            Ok("collector")
        );
        assert_eq!(
            parse_address("https://[fd00::1]:7443/").as_deref(),
            Ok("fd00::1")
        );
        for bad in [
            "http://collector:7443",
            "collector:7443",
            "https://collector",
            "https://collector:7443/x",
            "https://:7443",
        ] {
            assert!(parse_address(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let mut b = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
        let mut cap = Duration::from_millis(200);
        for _ in 0..20 {
            let d = b.next_delay();
            assert!(d >= cap / 2 && d <= cap, "{d:?} for {cap:?}");
            cap = (cap * 2).min(Duration::from_secs(30));
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(200));
    }

    #[test]
    fn only_global_addresses_are_announced() {
        for (a, want) in [
            ("10.0.0.5", true),
            ("192.168.1.100", true),
            ("127.0.0.1", false),
            ("169.254.1.1", false),
            ("0.0.0.0", false),
            ("224.0.0.1", false),
            ("fd00::5", true),
            ("2001:db8::1", true),
            ("::1", false),
            ("fe80::1", false),
            ("ff02::1", false),
        ] {
            let ip: IpAddr = a.parse().unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
            assert_eq!(is_global(&ip), want, "{a}");
        }
        let all = host_addresses().unwrap_or_default();
        assert!(all.iter().all(is_global));
    }
}
