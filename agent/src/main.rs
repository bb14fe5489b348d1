//! `ctw-agent`: the conntrack-watch node agent binary. Parses the command
//! line, runs the start-up checks, and wires capture, log writer, collector uplink and HTTP.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use ctw_agent::capture::{Capture, CaptureConfig, RecordSink, Tee};
use ctw_agent::config::Config;
use ctw_agent::filter::Filter;
use ctw_agent::http::{self, AppState, LookupFn};
use ctw_agent::logfile::{self, LogStats, LogWriter};
use ctw_agent::metrics::Metrics;
use ctw_agent::uplink::Uplink;
use ctw_agent::{lookup, startup};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

const USAGE: &str = "usage: ctw-agent --config FILE   (also -c FILE, or the seed's -config FILE)
       ctw-agent --check --config FILE   (validate the config and exit)
       ctw-agent --version";

enum Cli {
    Run { config: PathBuf, check_only: bool },
    Version,
    Help,
}

fn parse_args(args: &[String]) -> Result<Cli, String> {
    let mut config = None;
    let mut check_only = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--config" | "-c" | "-config" => {
                let v = it.next().ok_or_else(|| format!("{a} needs a file name"))?;
                config = Some(PathBuf::from(v));
            }
            "--check" => check_only = true,
            "--version" | "-V" => return Ok(Cli::Version),
            "--help" | "-h" => return Ok(Cli::Help),
            s => {
                if let Some(v) = s
                    .strip_prefix("--config=")
                    .or_else(|| s.strip_prefix("-config="))
                {
                    config = Some(PathBuf::from(v));
                } else {
                    return Err(format!("unknown argument {s:?}"));
                }
            }
        }
    }
    let config = config.ok_or("missing --config FILE")?;
    Ok(Cli::Run { config, check_only })
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (path, check_only) = match parse_args(&args) {
        Ok(Cli::Run { config, check_only }) => (config, check_only),
        Ok(Cli::Version) => {
            println!("ctw-agent {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Ok(Cli::Help) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("error: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    ExitCode::from(ctw_common::config::load_check_run::<Config, _>(
        &path, check_only, run,
    ))
}

fn run(cfg: Config) -> anyhow::Result<()> {
    let node: Arc<str> = cfg.resolve_node_name().into();
    let log_stats = Arc::new(LogStats::default());
    let log = LogWriter::spawn(&cfg.log, node.clone(), log_stats.clone())
        .with_context(|| format!("cannot open the log {}", cfg.log.path.display()))?;
    let filter_directive = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_string());
    tracing_subscriber::registry()
        .with(tracing_subscriber::EnvFilter::new(filter_directive))
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .with(logfile::tracing_layer(log.clone()))
        .init();

    startup::check_capabilities()?;
    startup::check_conntrack()?;
    startup::enable_events(cfg.netlink.enable_events);
    startup::warn_sysctls(cfg.capture_destroy);

    let ports = cfg.ports_u16();
    let filter = Filter::new(&ports, &cfg.protocols)
        .with_match(&cfg.match_on)
        .with_pod_cidrs(&cfg.pod_cidrs);
    let metrics = Metrics::new(filter.ports());
    let lookup_fn: Arc<LookupFn> = Arc::new(lookup::lookup);
    let (uplink, uplink_sink) = match &cfg.collector {
        Some(c) => {
            let (u, s) = Uplink::start(c.clone(), &node, metrics.clone(), lookup_fn.clone())
                .context("cannot start the collector uplink")?;
            tracing::info!(address = %c.address, boot_id = u.boot_id(), "collector uplink started");
            (Some(u), Some(s))
        }
        None => (None, None),
    };
    let capture_cfg = CaptureConfig {
        filter: filter.clone(),
        capture_destroy: cfg.capture_destroy,
        rcvbuf_bytes: cfg.netlink.rcvbuf_bytes,
        batch_messages: cfg.netlink.batch_messages,
        kernel_filter: cfg.netlink.kernel_filter,
        recheck_interval: std::time::Duration::from_millis(cfg.netlink.recheck_interval_ms),
    };
    let stop = Arc::new(AtomicBool::new(false));
    let running = Arc::new(AtomicBool::new(true));
    // The capture takes one sink: the log, and the uplink too when configured.
    let capture_thread = match uplink_sink {
        Some(up) => spawn_capture(
            Capture::start(capture_cfg, Tee(log.clone(), up), metrics.clone())?,
            &stop,
            &running,
        )?,
        None => spawn_capture(
            Capture::start(capture_cfg, log.clone(), metrics.clone())?,
            &stop,
            &running,
        )?,
    };
    tracing::info!(
        node = %node,
        ports = ?filter.ports(),
        protocols = ?filter.protocols().iter().map(|p| p.as_str()).collect::<Vec<_>>(),
        rcvbuf_bytes = metrics.rcvbuf_bytes.get(),
        kernel_filter = cfg.netlink.kernel_filter,
        version = env!("CARGO_PKG_VERSION"),
        "program started"
    );

    let state = Arc::new(AppState {
        node: node.to_string(),
        metrics,
        log_stats,
        prometheus_enabled: cfg.prometheus.enabled,
        web_ui_enabled: cfg.web_ui.enabled,
        capture_running: running,
        lookup: lookup_fn,
    });
    let addr = cfg.http_listen_addr();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(4)
        .build()
        .context("cannot start the async runtime")?;
    let served = rt.block_on(async move {
        let listener = startup::bind(addr).await?;
        tracing::info!(addr = %listener.local_addr()?, "http listening");
        axum::serve(listener, http::router(state))
            .with_graceful_shutdown(ctw_common::signal::shutdown_signal())
            .await
            .context("http server failed")
    });
    stop.store(true, Ordering::Relaxed);
    let _ = capture_thread.join();
    // After the capture: everything it sent is batched and spooled.
    if let Some(u) = uplink {
        u.shutdown();
    }
    tracing::info!("program stopped");
    log.shutdown();
    served
}

/// Runs the capture on its own thread until `stop` is set; `running` is
/// cleared however the thread ends.
fn spawn_capture<S: RecordSink + 'static>(
    capture: Capture<S>,
    stop: &Arc<AtomicBool>,
    running: &Arc<AtomicBool>,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let stop = stop.clone();
    let running = running.clone();
    std::thread::Builder::new()
        .name("capture".into())
        .spawn(move || {
            /// Marks capture stopped however the thread ends.
            struct Running(Arc<AtomicBool>);
            impl Drop for Running {
                fn drop(&mut self) {
                    self.0.store(false, Ordering::Relaxed);
                }
            }
            let _guard = Running(running);
            capture.run(&stop);
        })
        .context("cannot start the capture thread")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn seed_and_long_flags() {
        for args in [
            s(&["-config", "a.yaml"]),
            s(&["--config", "a.yaml"]),
            s(&["-c", "a.yaml"]),
            s(&["--config=a.yaml"]),
        ] {
            match parse_args(&args) {
                Ok(Cli::Run { config, check_only }) => {
                    assert_eq!(config, PathBuf::from("a.yaml"));
                    assert!(!check_only);
                }
                _ => panic!("{args:?} not parsed"),
            }
        }
        assert!(parse_args(&s(&["--bogus"])).is_err());
        assert!(parse_args(&s(&[])).is_err());
        assert!(parse_args(&s(&["--config"])).is_err());
    }
}
