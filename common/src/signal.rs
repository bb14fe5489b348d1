//! Process shutdown on SIGINT or SIGTERM, shared by both binaries
//! (feature `signal`: the only part of `common` that needs tokio, so the
//! fuzz targets and `ctw` build without it).

/// Resolves on the first SIGINT (Ctrl-C) or SIGTERM (systemd stop, kubelet),
/// and logs which. A SIGTERM handler that cannot be installed leaves SIGINT
/// as the only way out; it does not fail.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = async {
        match signal(SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    let name = tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = term => "SIGTERM",
    };
    tracing::info!(signal = name, "shutdown signal received");
}
