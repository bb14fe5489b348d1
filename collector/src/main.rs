//! `ctw-collector`: runs the collector (gRPC ingest + HTTP API on embedded
//! storage), or manages certificates (`ctw-collector certs ...`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use ctw_collector::auth::Token;
use ctw_collector::config::Config;
use ctw_collector::config::KubernetesEnabled;
use ctw_collector::http::{self, AppState};
use ctw_collector::metrics::Metrics;
use ctw_collector::peers::{self, Peers, PeersOptions};
use ctw_collector::pods::{self, PodHistory};
use ctw_collector::registry::Registry;
use ctw_collector::store::{self, RecordStore};
use ctw_collector::{certs, ingest};

const USAGE: &str = "usage: ctw-collector --config FILE            run the collector
       ctw-collector --check --config FILE    validate the config and exit
       ctw-collector certs init-ca --dir DIR  create a CA
       ctw-collector certs issue --dir DIR --name NAME --kind server|client [--dns a,b] [--ip x,y]
       ctw-collector --version";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("certs") {
        return match certs::cli(&args[1..]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::from(2)
            }
        };
    }
    let mut config: Option<PathBuf> = None;
    let mut check_only = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--config" | "-c" | "-config" => match it.next() {
                Some(v) => config = Some(PathBuf::from(v)),
                None => {
                    eprintln!("error: {a} needs a file name\n{USAGE}");
                    return ExitCode::from(2);
                }
            },
            "--check" => check_only = true,
            "--version" | "-V" => {
                println!("ctw-collector {}", env!("CARGO_PKG_VERSION"));
                return ExitCode::SUCCESS;
            }
            "--help" | "-h" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            s => match s.strip_prefix("--config=") {
                Some(v) => config = Some(PathBuf::from(v)),
                None => {
                    eprintln!("error: unknown argument {s:?}\n{USAGE}");
                    return ExitCode::from(2);
                }
            },
        }
    }
    let Some(path) = config else {
        eprintln!("error: missing --config FILE\n{USAGE}");
        return ExitCode::from(2);
    };
    ExitCode::from(ctw_common::config::load_check_run::<Config, _>(
        &path, check_only, run,
    ))
}

/// Open the pod history under `storage.path/pods` and start the watch task.
async fn start_pod_watch(
    cfg: &Config,
    metrics: Metrics,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<(tokio::task::JoinHandle<()>, Arc<PodHistory>)> {
    let retention_ns = u64::from(cfg.storage.retention_days()) * 86_400 * 1_000_000_000;
    let dir = match (&cfg.kubernetes.history_dir, cfg.storage.local_dir()) {
        (Some(d), _) => d.clone(),
        (None, Some(local)) => local.join("pods"),
        (None, None) => anyhow::bail!(
            "kubernetes.history_dir: the pod history needs a local directory; \
             storage.backend clickhouse has none: set kubernetes.history_dir"
        ),
    };
    let history = Arc::new(
        PodHistory::open_bounded(&dir, retention_ns, cfg.kubernetes.max_closed_intervals)
            .with_context(|| format!("pod history ({})", dir.display()))?,
    );
    let client = pods::watch::client(&cfg.kubernetes)
        .await
        .context("kubernetes")?;
    tracing::info!("watching pods cluster-wide");
    let task = tokio::spawn(pods::watch::run(client, history.clone(), metrics, stop));
    Ok((task, history))
}

/// The replicas' lease table and forwarding client (`replicas` set).
fn start_peers(
    cfg: &Config,
    registry: Arc<Registry>,
    store: Arc<dyn RecordStore>,
    metrics: Metrics,
) -> anyhow::Result<Option<Arc<Peers>>> {
    let (Some(r), ctw_collector::config::Storage::ClickHouse(ch)) = (&cfg.replicas, &cfg.storage)
    else {
        return Ok(None);
    };
    let me =
        peers::identity(r, &cfg.grpc.listen_addr, &cfg.grpc.tls).map_err(anyhow::Error::msg)?;
    tracing::info!(
        collector_id = me.collector_id,
        advertise_addr = me.advertise_addr,
        peer_server_name = me.peer_server_name,
        "collector replicas: leases in ClickHouse"
    );
    let opts = PeersOptions {
        me,
        lease_ttl: std::time::Duration::from_millis(r.lease_ttl_ms),
        renew_interval: std::time::Duration::from_millis(r.renew_interval_ms),
        tls: cfg.grpc.tls.clone(),
        clickhouse: ch.clone(),
        forward_timeout: std::time::Duration::from_millis(cfg.lookup.timeout_ms * 2 + 1000),
    };
    Ok(Some(Arc::new(
        Peers::new(opts, registry, store, metrics).map_err(anyhow::Error::msg)?,
    )))
}

fn run(cfg: Config) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let token = Token::load(&cfg.http.token_file).context("http.token_file")?;
    let metrics = Metrics::new();
    metrics
        .workloads
        .set_max(cfg.kubernetes.workload_series_max);
    let store: Arc<dyn RecordStore> = store::open(cfg.storage.backend()).context("storage")?;
    let registry = Arc::new(Registry::new(metrics.clone()));
    let peers = start_peers(&cfg, registry.clone(), store.clone(), metrics.clone())?;
    let ready = Arc::new(AtomicBool::new(false));
    let http_addr: std::net::SocketAddr = cfg
        .http
        .listen_addr
        .parse()
        .with_context(|| format!("http.listen_addr {:?}", cfg.http.listen_addr))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = rt.block_on(async {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|v| *v).await;
        };
        // The pod watch (issue 13): one per collector, started first so both
        // APIs name pods from their first answer.
        let pod_watch = if pods::watch::enabled(&cfg.kubernetes) {
            match start_pod_watch(&cfg, metrics.clone(), stopped(stop_rx.clone())).await {
                Ok(t) => Some(t),
                Err(e) if cfg.kubernetes.enabled == KubernetesEnabled::True => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "kubernetes.enabled is auto: running without pod names");
                    None
                }
            }
        } else {
            None
        };
        let peers_task = peers
            .clone()
            .map(|p| tokio::spawn(p.run(stop_rx.clone())));
        let grpc = tokio::spawn({
            let peers = peers.clone();
            let grpc_cfg = cfg.grpc.clone();
            let lookup = cfg.lookup.clone();
            let max_limit = cfg.http.max_limit;
            let store = store.clone() as Arc<dyn RecordStore>;
            let registry = registry.clone();
            let metrics = metrics.clone();
            let pods = pod_watch.as_ref().map(|(_, h)| h.clone());
            let stop = stopped(stop_rx.clone());
            async move {
                let opts = ingest::ServeOptions {
                    lookup,
                    max_limit,
                    pods,
                    peers,
                    ..ingest::ServeOptions::default()
                };
                ingest::serve(&grpc_cfg, opts, store, registry, metrics, stop).await
            }
        });
        let state = Arc::new(AppState {
            store: store.clone() as Arc<dyn RecordStore>,
            registry: registry.clone(),
            metrics: metrics.clone(),
            token,
            max_limit: cfg.http.max_limit,
            lookup: cfg.lookup.clone(),
            ready: ready.clone(),
            pods: pod_watch.as_ref().map(|(_, h)| h.clone()),
            peers: peers.clone(),
        });
        let listener = tokio::net::TcpListener::bind(http_addr)
            .await
            .with_context(|| format!("http.listen_addr: cannot listen on {http_addr}"))?;
        tracing::info!(addr = %http_addr, "HTTP API listening");
        // Ready while the store is (a remote store may be unreachable at
        // start-up, and connects in the background).
        tokio::spawn({
            let (ready, store, mut stop) = (ready.clone(), store.clone(), stop_rx.clone());
            async move {
                let mut was = None;
                loop {
                    let now = store.ready();
                    if !*stop.borrow() {
                        ready.store(now, Ordering::Relaxed);
                    }
                    if was != Some(now) && !now {
                        tracing::warn!("storage not ready: /readyz answers 503");
                    }
                    was = Some(now);
                    tokio::select! {
                        _ = stop.wait_for(|v| *v) => return,
                        _ = tokio::time::sleep(std::time::Duration::from_millis(200)) => {}
                    }
                }
            }
        });
        let http_stop = stopped(stop_rx.clone());
        let http = tokio::spawn(async move {
            axum::serve(listener, http::router(state))
                .with_graceful_shutdown(http_stop)
                .await
        });
        let mut grpc = grpc;
        // Run until a signal, or until the gRPC side stops by itself (an error).
        let early = tokio::select! {
            _ = ctw_common::signal::shutdown_signal() => None,
            r = &mut grpc => Some(r),
        };
        ready.store(false, Ordering::Relaxed);
        let _ = stop_tx.send(true);
        let grpc_res = match early {
            Some(r) => r,
            None => grpc.await,
        }
        .context("gRPC task")?;
        let _ = http.await;
        if let Some((t, _history)) = pod_watch {
            let _ = t.await;
        }
        if let Some(t) = peers_task {
            let _ = t.await;
        }
        grpc_res
    });
    store.close();
    tracing::info!("collector stopped");
    result
}
