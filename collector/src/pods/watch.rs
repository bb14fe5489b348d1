//! The Kubernetes side: one cluster-wide Pod watch (kube-rs `watcher`, list
//! then watch from the list's resourceVersion with bookmarks, re-list on
//! 410 Gone) and metadata-only watches of ReplicaSets and Jobs for owner
//! resolution, fed into [`PodHistory`] in arrival order.
//!
//! Needs `get`/`list`/`watch` on `pods`, `replicasets.apps`, `jobs.batch`
//! cluster-wide (deploy/kubernetes/rbac.yaml).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{stream, Stream, StreamExt};
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::{metadata_watcher, watcher, WatchStreamExt};
use kube::{Api, Client};

use super::{
    history::parse_uid, Input, PodHistory, PodState, PodsError, Workload, SYNC_INTERVAL_MS,
};
use crate::config::{KubernetesConfig, KubernetesEnabled};
use crate::metrics::Metrics;

/// Whether the pod watch runs: `true`/`false` as configured; `auto` when a
/// kubeconfig is set or the process runs in a pod (`KUBERNETES_SERVICE_HOST`
/// set by the kubelet).
pub fn enabled(cfg: &KubernetesConfig) -> bool {
    match cfg.enabled {
        KubernetesEnabled::True => true,
        KubernetesEnabled::False => false,
        KubernetesEnabled::Auto => {
            cfg.kubeconfig.is_some() || std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
        }
    }
}

/// A client from `kubernetes.kubeconfig` (its current context), else the
/// in-cluster service account.
pub async fn client(cfg: &KubernetesConfig) -> Result<Client, PodsError> {
    let config = match &cfg.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| {
                PodsError::Kube(format!("kubernetes.kubeconfig {}: {e}", path.display()))
            })?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| {
                    PodsError::Kube(format!("kubernetes.kubeconfig {}: {e}", path.display()))
                })?
        }
        None => kube::Config::incluster()
            .map_err(|e| PodsError::Kube(format!("in-cluster config: {e}")))?,
    };
    Client::try_from(config).map_err(|e| PodsError::Kube(format!("client: {e}")))
}

pub use ctw_common::now_ns;

/// The controller owner reference of an object.
fn controller(meta: &ObjectMeta) -> Option<Workload> {
    meta.owner_references
        .as_ref()?
        .iter()
        .find(|o| o.controller == Some(true))
        .map(|o| Workload {
            kind: o.kind.clone(),
            name: o.name.clone(),
        })
}

/// What the history needs of a Pod; `None` when its UID is not a UUID
/// (never the case for an API server's pods; counted by the caller).
pub fn pod_state(pod: &Pod) -> Option<PodState> {
    let meta = &pod.metadata;
    let uid = parse_uid(meta.uid.as_deref()?)?;
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let mut ips: Vec<IpAddr> = status
        .and_then(|s| s.pod_ips.as_ref())
        .map(|v| v.iter().filter_map(|p| p.ip.parse().ok()).collect())
        .unwrap_or_default();
    if ips.is_empty() {
        if let Some(ip) = status
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|s| s.parse().ok())
        {
            ips.push(ip);
        }
    }
    let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or_default();
    // The pod's start, else its creation (a pod not yet started by the
    // kubelet): the earliest the pod can have held an IP.
    let start_ns = status
        .and_then(|s| s.start_time.as_ref())
        .or(meta.creation_timestamp.as_ref())
        .and_then(|t| {
            t.0.timestamp_nanos_opt()
                .and_then(|n| u64::try_from(n).ok())
        });
    Some(PodState {
        uid,
        namespace: meta.namespace.clone().unwrap_or_default(),
        name: meta.name.clone().unwrap_or_default(),
        owner: controller(meta),
        node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        ips,
        terminal: matches!(phase, "Succeeded" | "Failed"),
        start_ns,
    })
}

#[allow(clippy::large_enum_variant)] // one item at a time, moved straight into the history
enum Item {
    Input(Input),
    /// A pod whose UID did not parse.
    BadPod,
    /// An owner watch failed (retried; names stay at the direct owner).
    OwnerBroken(&'static str),
}

fn owner_stream<K>(
    api: Api<K>,
    kind: &'static str,
    label: &'static str,
) -> impl Stream<Item = Item> + Send
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    metadata_watcher(api, watcher::Config::default())
        .default_backoff()
        .filter_map(move |r| async move {
            let ev = match r {
                Ok(ev) => ev,
                Err(e) => {
                    tracing::warn!(kind, error = %e, "owner watch failed; retrying");
                    return Some(Item::OwnerBroken(label));
                }
            };
            let owner = |m: &ObjectMeta| Input::Owner {
                kind: kind.to_string(),
                namespace: m.namespace.clone().unwrap_or_default(),
                name: m.name.clone().unwrap_or_default(),
                owner: controller(m),
            };
            match ev {
                watcher::Event::Apply(o) | watcher::Event::InitApply(o) => {
                    Some(Item::Input(owner(&o.metadata)))
                }
                watcher::Event::Delete(o) => Some(Item::Input(Input::OwnerGone {
                    kind: kind.to_string(),
                    namespace: o.metadata.namespace.clone().unwrap_or_default(),
                    name: o.metadata.name.clone().unwrap_or_default(),
                })),
                watcher::Event::Init | watcher::Event::InitDone => None,
            }
        })
}

fn pod_stream(api: Api<Pod>) -> impl Stream<Item = Item> + Send {
    watcher(api, watcher::Config::default())
        .default_backoff()
        .map(|r| match r {
            Err(e) => {
                tracing::warn!(error = %e, "pod watch failed; retrying (a gap is recorded)");
                Item::Input(Input::Broken)
            }
            Ok(watcher::Event::Init) => Item::Input(Input::ListBegin),
            Ok(watcher::Event::InitDone) => Item::Input(Input::ListDone),
            Ok(watcher::Event::InitApply(p)) => {
                pod_state(&p).map_or(Item::BadPod, |s| Item::Input(Input::Listed(s)))
            }
            Ok(watcher::Event::Apply(p)) => {
                pod_state(&p).map_or(Item::BadPod, |s| Item::Input(Input::Applied(s)))
            }
            Ok(watcher::Event::Delete(p)) => {
                pod_state(&p).map_or(Item::BadPod, |s| Item::Input(Input::Deleted(s)))
            }
        })
}

/// Run the watches into `history` until `stop` resolves; heartbeats every
/// [`SYNC_INTERVAL_MS`], a final compaction at the end. Never returns an
/// error: the watches retry with backoff, and failures become gaps.
pub async fn run(
    client: Client,
    history: Arc<PodHistory>,
    metrics: Metrics,
    stop: impl std::future::Future<Output = ()>,
) {
    let items = stream::select_all([
        owner_stream(
            Api::<ReplicaSet>::all(client.clone()),
            "ReplicaSet",
            "replicasets",
        )
        .boxed(),
        owner_stream(Api::<Job>::all(client.clone()), "Job", "jobs").boxed(),
        pod_stream(Api::<Pod>::all(client)).boxed(),
    ]);
    tokio::pin!(items);
    tokio::pin!(stop);
    let mut tick = tokio::time::interval(Duration::from_millis(SYNC_INTERVAL_MS));
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tick.tick() => {
                // fsync, and now and then a compaction rewriting the file:
                // off the async workers.
                let h = history.clone();
                let _ = tokio::task::spawn_blocking(move || h.tick(now_ns())).await;
                metrics.sync_pods(&history);
            }
            item = items.next() => match item {
                None => break,
                Some(Item::Input(input)) => {
                    metrics.pod_watch_events.inc();
                    if input == Input::Broken {
                        metrics.pod_watch_failures.with_label_values(&["pods"]).inc();
                    }
                    history.apply(input, now_ns());
                }
                Some(Item::BadPod) => metrics.pods_rejected.inc(),
                Some(Item::OwnerBroken(watch)) => {
                    metrics.pod_watch_failures.with_label_values(&[watch]).inc();
                }
            }
        }
    }
    if let Err(e) = history.compact(now_ns()) {
        tracing::warn!(error = %e, "pod history: final compaction failed");
    }
    metrics.sync_pods(&history);
}
