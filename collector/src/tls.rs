//! mTLS on the gRPC port: the rustls server config (client certificates
//! signed by the configured CA are required, ALPN `h2`), its reload when the
//! files change, and the accept loop that hands verified TLS streams to tonic.
//!
//! - Reload: the CA, certificate and key files are polled (mtime, size,
//!   inode) every `reload_interval`; on a change the three are loaded again
//!   and the new config replaces the old for new handshakes. A failed load
//!   (half-written file, key not matching the certificate, bad PEM) keeps the
//!   old config and logs an error; the next change is tried again.
//! - Accept loop: each accepted TCP connection gets its own task for the
//!   handshake, bounded by a timeout, so a slow or silent client holds up
//!   nobody. Failures are counted per reason
//!   (`ctw_collector_tls_handshake_failures_total{reason}`) and logged at most
//!   once per [`LOG_EVERY`], with the number suppressed.
//! - The node name of a client is its certificate's first DNS SAN, else its
//!   CN ([`crate::certs::node_name`]); the ingest service reads the verified
//!   certificate from tonic's `TlsConnectInfo`.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;

use crate::config::TlsFiles;
use crate::metrics::Metrics;

/// Errors of a repeating kind are logged at most this often.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: io::Error },
    #[error("{path}: {message}")]
    Pem { path: String, message: String },
    #[error("tls config: {0}")]
    Config(String),
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })
}

fn pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.display().to_string(),
            message: "no PEM certificate".into(),
        });
    }
    Ok(certs)
}

fn pem_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| TlsError::Pem {
        path: path.display().to_string(),
        message: match e {
            pem::Error::NoItemsFound => "no PEM private key".into(),
            e => e.to_string(),
        },
    })
}

/// The server config: our certificate and key, client certificates required
/// and verified against the CA, ALPN `h2`. Uses the ring provider explicitly
/// (not the process default).
pub fn load_server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for ca in pem_certs(&files.ca_file)? {
        roots.add(ca).map_err(|e| TlsError::Pem {
            path: files.ca_file.display().to_string(),
            message: format!("bad CA certificate: {e}"),
        })?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| TlsError::Config(format!("client verifier: {e}")))?;
    let chain = pem_certs(&files.cert_file)?;
    let key = pem_key(&files.key_file)?;
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| {
            TlsError::Config(format!(
                "{} / {}: {e}",
                files.cert_file.display(),
                files.key_file.display()
            ))
        })?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// The current server config, replaced whole on reload. New handshakes use
/// the newest; established connections keep theirs.
#[derive(Debug)]
pub struct ReloadableConfig {
    current: RwLock<Arc<ServerConfig>>,
    reloads: AtomicU64,
}

impl ReloadableConfig {
    pub fn new(cfg: Arc<ServerConfig>) -> ReloadableConfig {
        ReloadableConfig {
            current: RwLock::new(cfg),
            reloads: AtomicU64::new(0),
        }
    }

    pub fn get(&self) -> Arc<ServerConfig> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn set(&self, cfg: Arc<ServerConfig>) {
        match self.current.write() {
            Ok(mut g) => *g = cfg,
            Err(poisoned) => *poisoned.into_inner() = cfg,
        }
        self.reloads.fetch_add(1, Ordering::Relaxed);
    }

    /// Successful reloads so far.
    pub fn reloads(&self) -> u64 {
        self.reloads.load(Ordering::Relaxed)
    }
}

/// What identifies a version of a file: mtime, size, inode (a rename
/// changes the inode even within one mtime tick).
type Stamp = Option<(SystemTime, u64, u64)>;

fn stamp(path: &Path) -> Stamp {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

fn stamps(files: &TlsFiles) -> [Stamp; 3] {
    [
        stamp(&files.ca_file),
        stamp(&files.cert_file),
        stamp(&files.key_file),
    ]
}

/// Poll the files every `interval` and reload on a change until `shutdown`
/// turns true (or its sender is dropped).
pub fn spawn_reloader(
    files: TlsFiles,
    holder: Arc<ReloadableConfig>,
    interval: Duration,
    metrics: Metrics,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut seen = stamps(&files);
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                r = shutdown.changed() => {
                    if r.is_err() || *shutdown.borrow() {
                        return;
                    }
                    continue;
                }
            }
            let now = stamps(&files);
            if now == seen {
                continue;
            }
            seen = now;
            let f = files.clone();
            match tokio::task::spawn_blocking(move || load_server_config(&f)).await {
                Ok(Ok(cfg)) => {
                    holder.set(cfg);
                    metrics.tls_reloads.with_label_values(&["ok"]).inc();
                    tracing::info!(
                        cert = %files.cert_file.display(),
                        "reloaded the gRPC TLS certificate, key and CA"
                    );
                }
                Ok(Err(e)) => {
                    metrics.tls_reloads.with_label_values(&["error"]).inc();
                    tracing::error!(
                        error = %e,
                        "cannot reload the gRPC TLS files; keeping the previous ones"
                    )
                }
                Err(e) => {
                    metrics.tls_reloads.with_label_values(&["error"]).inc();
                    tracing::error!(error = %e, "tls reload task failed")
                }
            }
        }
    })
}

pub use ctw_common::ratelimit::RateLimiter;

/// The `reason` label of a failed handshake.
pub fn handshake_failure_reason(e: &io::Error) -> &'static str {
    use rustls::{CertificateError, Error};
    match e.get_ref().and_then(|i| i.downcast_ref::<Error>()) {
        Some(Error::NoCertificatesPresented) => "no_certificate",
        Some(Error::InvalidCertificate(
            CertificateError::UnknownIssuer
            | CertificateError::BadSignature
            | CertificateError::UnknownRevocationStatus,
        )) => "unknown_ca",
        Some(Error::InvalidCertificate(_)) => "bad_certificate",
        Some(_) => "protocol",
        None if e.kind() == io::ErrorKind::InvalidData => "protocol",
        None => "io",
    }
}

/// Accepted, verified TLS connections for `Server::serve_with_incoming`.
pub type Incoming = ReceiverStream<Result<TlsStream<TcpStream>, io::Error>>;

/// Accept TCP connections on `listener` and run each handshake on its own
/// task (at most `handshake_timeout`). Ends when `shutdown` turns true or
/// tonic stops taking connections.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ReloadableConfig>,
    metrics: Metrics,
    handshake_timeout: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> Incoming {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let log_limit = Arc::new(RateLimiter::new(LOG_EVERY));
        let accept_log = RateLimiter::new(LOG_EVERY);
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                r = shutdown.changed() => {
                    if r.is_err() || *shutdown.borrow() {
                        return;
                    }
                    continue;
                }
                _ = tx.closed() => return,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: wait a little instead of spinning.
                    if let Some(suppressed) = accept_log.allow() {
                        tracing::error!(error = %e, suppressed, "gRPC accept failed");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY");
            }
            let acceptor = TlsAcceptor::from(config.get());
            let tx = tx.clone();
            let metrics = metrics.clone();
            let log_limit = log_limit.clone();
            tokio::spawn(async move {
                let result =
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => Ok(tls),
                        Ok(Err(e)) => Err((handshake_failure_reason(&e), e.to_string())),
                        Err(_) => Err(("timeout", "handshake timed out".to_string())),
                    };
                match result {
                    Ok(tls) => {
                        metrics.tls_handshakes.inc();
                        // Fails only when the server is shutting down.
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Err((reason, error)) => {
                        metrics
                            .tls_handshake_failures
                            .with_label_values(&[reason])
                            .inc();
                        if let Some(suppressed) = log_limit.allow() {
                            tracing::warn!(%peer, reason, error, suppressed, "gRPC TLS handshake failed");
                        }
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn handshake_errors_map_to_fixed_reasons() {
        let wrap = |e: rustls::Error| io::Error::new(io::ErrorKind::InvalidData, e);
        assert_eq!(
            handshake_failure_reason(&wrap(rustls::Error::NoCertificatesPresented)),
            "no_certificate"
        );
        assert_eq!(
            handshake_failure_reason(&wrap(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer
            ))),
            "unknown_ca"
        );
        assert_eq!(
            handshake_failure_reason(&wrap(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Expired
            ))),
            "bad_certificate"
        );
        assert_eq!(
            handshake_failure_reason(&io::Error::from(io::ErrorKind::UnexpectedEof)),
            "io"
        );
        for r in [
            handshake_failure_reason(&wrap(rustls::Error::DecryptError)),
            "timeout",
        ] {
            assert!(crate::metrics::HANDSHAKE_REASONS.contains(&r));
        }
    }

    #[test]
    fn bad_files_are_named_in_errors() {
        let dir = std::env::temp_dir().join(format!("ctw-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("empty.pem"), "").unwrap();
        let files = TlsFiles {
            ca_file: dir.join("empty.pem"),
            cert_file: dir.join("missing.pem"),
            key_file: dir.join("missing-key.pem"),
        };
        let e = load_server_config(&files).unwrap_err().to_string();
        assert!(
            e.contains("empty.pem") && e.contains("no PEM certificate"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
