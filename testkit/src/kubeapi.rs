//! A local Kubernetes API server for tests: the list/watch protocol as
//! kube-rs's `watcher` and `metadata_watcher` use it, over plain HTTP on
//! 127.0.0.1, with the objects in the real JSON schema.
//!
//! What it speaks (checked against the API concepts page, "Efficient
//! detection of changes"):
//! - `GET /api/v1/pods`, `/apis/apps/v1/replicasets`, `/apis/batch/v1/jobs`
//!   (cluster-wide; any other path is 404 with a `Status` body): a list
//!   (`{kind: PodList, metadata: {resourceVersion}, items}`), or with
//!   `Accept: application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1`
//!   a `PartialObjectMetadataList` holding only `metadata`.
//! - `?watch=true&resourceVersion=RV[&allowWatchBookmarks=true]`: a chunked
//!   stream of `{"type":"ADDED|MODIFIED|DELETED|BOOKMARK|ERROR","object":..}`
//!   lines: every change after RV, then live ones. When RV is older than the
//!   server's compaction point ([`KubeApi::expire`]) the stream carries one
//!   `ERROR` with a 410 `Status` (reason `Expired`) and ends, as the real
//!   server does.
//! - [`KubeApi::drop_watches`] ends every open watch (the client resumes
//!   from its last RV); [`KubeApi::bookmark`] sends a BOOKMARK to watches
//!   that asked for them.
//!
//! Not implemented: namespaced paths, selectors, pagination (`limit` is
//! ignored, no `continue`), writes over HTTP (tests change objects through
//! [`KubeApi::apply`] / [`KubeApi::delete`]), authentication (any token).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use tokio::sync::broadcast;

/// The resources served: (path, list kind, kind, apiVersion).
const RESOURCES: &[(&str, &str, &str, &str)] = &[
    ("/api/v1/pods", "PodList", "Pod", "v1"),
    (
        "/apis/apps/v1/replicasets",
        "ReplicaSetList",
        "ReplicaSet",
        "apps/v1",
    ),
    ("/apis/batch/v1/jobs", "JobList", "Job", "batch/v1"),
];

#[derive(Debug, Clone)]
struct Change {
    rv: u64,
    kind: &'static str,
    typ: &'static str,
    object: Value,
}

#[derive(Debug, Default)]
struct Inner {
    rv: u64,
    /// Changes older than this are forgotten: a watch from before gets 410.
    compacted: u64,
    /// kind → "ns/name" → object.
    objects: BTreeMap<&'static str, BTreeMap<String, Value>>,
    log: Vec<Change>,
    /// Requests served, as "list <path>" / "watch <path> <query>".
    requests: Vec<String>,
}

#[derive(Debug, Clone)]
enum Msg {
    Change(Change),
    Bookmark,
    Drop,
}

#[derive(Debug)]
struct Shared {
    inner: Mutex<Inner>,
    tx: broadcast::Sender<Msg>,
}

/// The running server; stopped when dropped.
#[derive(Debug)]
pub struct KubeApi {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl KubeApi {
    /// Start on 127.0.0.1 (a free port) on its own thread and runtime.
    pub fn start() -> KubeApi {
        Self::start_in(None)
    }

    /// Start on 127.0.0.1 inside network namespace `ns` (`ip netns` name),
    /// for a collector running there. Needs root.
    pub fn start_in_netns(ns: &str) -> KubeApi {
        Self::start_in(Some(ns.to_string()))
    }

    fn start_in(ns: Option<String>) -> KubeApi {
        let (tx, _) = broadcast::channel(65_536);
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                rv: 100,
                ..Inner::default()
            }),
            tx,
        });
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let app = axum::Router::new()
            .fallback(serve)
            .with_state(shared.clone());
        let thread = std::thread::spawn(move || {
            if let Some(ns) = ns {
                // This thread only: the listening socket is created in `ns`.
                let f = std::fs::File::open(format!("/var/run/netns/{ns}"))
                    .unwrap_or_else(|e| panic!("open netns {ns}: {e}"));
                // SAFETY: setns on a valid namespace fd, for this thread.
                let rc =
                    unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns {ns}: {}", std::io::Error::last_os_error());
            }
            let std_listener =
                std::net::TcpListener::bind("127.0.0.1:0").expect("bind the kube API test server");
            std_listener.set_nonblocking(true).expect("nonblocking");
            addr_tx
                .send(std_listener.local_addr().expect("local addr"))
                .expect("send addr");
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener =
                    tokio::net::TcpListener::from_std(std_listener).expect("tokio listener");
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = stop_rx.await;
                    })
                    .await;
            });
        });
        let addr = addr_rx.recv().expect("the kube API test server started");
        KubeApi {
            addr,
            shared,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Write a kubeconfig naming this server (token auth with a dummy token).
    pub fn write_kubeconfig(&self, path: &Path) {
        let y = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: test\ncurrent-context: test\nusers:\n- name: test\n  user:\n    token: test-token\n",
            self.url()
        );
        std::fs::write(path, y).expect("write kubeconfig");
    }

    /// Create or replace an object (by kind, namespace, name): sets
    /// `metadata.resourceVersion` and sends ADDED or MODIFIED.
    pub fn apply(&self, mut object: Value) {
        let kind = kind_of(&object);
        let key = key_of(&object);
        let mut g = self.lock();
        g.rv += 1;
        let rv = g.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let objs = g.objects.entry(kind).or_default();
        let typ = if objs.insert(key, object.clone()).is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        let c = Change {
            rv,
            kind,
            typ,
            object,
        };
        g.log.push(c.clone());
        drop(g);
        let _ = self.shared.tx.send(Msg::Change(c));
    }

    /// Delete an object: sends DELETED with its last state. Returns whether
    /// it existed.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> bool {
        let kind = RESOURCES
            .iter()
            .find(|r| r.2 == kind)
            .map(|r| r.2)
            .expect("a served kind");
        let mut g = self.lock();
        let Some(mut object) = g
            .objects
            .entry(kind)
            .or_default()
            .remove(&format!("{namespace}/{name}"))
        else {
            return false;
        };
        g.rv += 1;
        let rv = g.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let c = Change {
            rv,
            kind,
            typ: "DELETED",
            object,
        };
        g.log.push(c.clone());
        drop(g);
        let _ = self.shared.tx.send(Msg::Change(c));
        true
    }

    /// Remove an object without any watch event, as if its DELETED event
    /// fell in a window the server compacted away (use with
    /// [`KubeApi::expire`]: only a re-list can notice).
    pub fn delete_unseen(&self, kind: &str, namespace: &str, name: &str) -> bool {
        let mut g = self.lock();
        g.rv += 1;
        g.objects
            .get_mut(kind)
            .is_some_and(|m| m.remove(&format!("{namespace}/{name}")).is_some())
    }

    /// End every open watch stream (the connection drops after the last
    /// line). The client resumes from its last resourceVersion.
    pub fn drop_watches(&self) {
        let _ = self.shared.tx.send(Msg::Drop);
    }

    /// Forget the change log: a watch resumed from any earlier
    /// resourceVersion gets `410 Gone` and must re-list.
    pub fn expire(&self) {
        let mut g = self.lock();
        g.compacted = g.rv;
        g.log.clear();
    }

    /// Send a BOOKMARK (current resourceVersion) to watches that allow them.
    pub fn bookmark(&self) {
        let _ = self.shared.tx.send(Msg::Bookmark);
    }

    /// The server's current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.lock().rv
    }

    /// Requests served so far, e.g. `list /api/v1/pods`,
    /// `watch /api/v1/pods watch=true&resourceVersion=104&...`.
    pub fn requests(&self) -> Vec<String> {
        self.lock().requests.clone()
    }

    /// How many served requests start with `prefix`.
    pub fn count(&self, prefix: &str) -> usize {
        self.lock()
            .requests
            .iter()
            .filter(|r| r.starts_with(prefix))
            .count()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.shared.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        let _ = self.shared.tx.send(Msg::Drop);
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn kind_of(object: &Value) -> &'static str {
    let k = object["kind"].as_str().unwrap_or_default();
    RESOURCES
        .iter()
        .find(|r| r.2 == k)
        .map(|r| r.2)
        .unwrap_or_else(|| panic!("KubeApi serves Pod, ReplicaSet and Job, not {k:?}"))
}

fn key_of(object: &Value) -> String {
    format!(
        "{}/{}",
        object["metadata"]["namespace"].as_str().unwrap_or_default(),
        object["metadata"]["name"].as_str().unwrap_or_default()
    )
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn metadata_only(accept: &str) -> bool {
    accept.contains("as=PartialObjectMetadata")
}

/// The object as sent: whole, or as a `PartialObjectMetadata`.
fn shape(object: &Value, meta_only: bool) -> Value {
    if meta_only {
        json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
               "metadata": object["metadata"].clone()})
    } else {
        object.clone()
    }
}

async fn serve(
    State(shared): State<Arc<Shared>>,
    uri: Uri,
    headers: HeaderMap,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    let path = uri.path();
    let Some(&(_, list_kind, kind, api_version)) = RESOURCES.iter().find(|r| r.0 == path) else {
        return (
            StatusCode::NOT_FOUND,
            axum::Json(status(
                404,
                "NotFound",
                "the server could not find the requested resource",
            )),
        )
            .into_response();
    };
    let accept = headers
        .get("accept")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let meta_only = metadata_only(accept);
    if q.get("watch").map(String::as_str) != Some("true") {
        let mut g = shared.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.requests.push(format!("list {path}"));
        let items: Vec<Value> = g
            .objects
            .get(kind)
            .map(|m| m.values().map(|o| shape(o, meta_only)).collect())
            .unwrap_or_default();
        let (lk, av) = if meta_only {
            ("PartialObjectMetadataList", "meta.k8s.io/v1")
        } else {
            (list_kind, api_version)
        };
        let body = json!({"kind": lk, "apiVersion": av,
                          "metadata": {"resourceVersion": g.rv.to_string()}, "items": items});
        return axum::Json(body).into_response();
    }
    // Watch.
    let bookmarks = q.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let from: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<String, std::io::Error>>(1024);
    let mut sub = shared.tx.subscribe();
    let backlog: Result<Vec<Change>, ()> = {
        let mut g = shared.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.requests
            .push(format!("watch {path} {}", uri.query().unwrap_or_default()));
        if from < g.compacted {
            Err(())
        } else {
            Ok(g.log
                .iter()
                .filter(|c| c.kind == kind && c.rv > from)
                .cloned()
                .collect())
        }
    };
    let line =
        |typ: &str, object: Value| Ok(format!("{}\n", json!({"type": typ, "object": object})));
    match backlog {
        Err(()) => {
            let _ = tx.try_send(line(
                "ERROR",
                status(410, "Expired", &format!("too old resource version: {from}")),
            ));
            drop(tx);
        }
        Ok(backlog) => {
            let mut last = from;
            for c in backlog {
                last = c.rv;
                let _ = tx.try_send(line(c.typ, shape(&c.object, meta_only)));
            }
            let shared2 = shared.clone();
            tokio::spawn(async move {
                loop {
                    let msg = match sub.recv().await {
                        Ok(m) => m,
                        Err(broadcast::error::RecvError::Lagged(_)) => break,
                        Err(broadcast::error::RecvError::Closed) => break,
                    };
                    let out = match msg {
                        Msg::Drop => break,
                        Msg::Bookmark if bookmarks => {
                            let rv = shared2.inner.lock().unwrap_or_else(|e| e.into_inner()).rv;
                            line(
                                "BOOKMARK",
                                json!({"kind": kind, "apiVersion": api_version,
                                       "metadata": {"resourceVersion": rv.to_string()}}),
                            )
                        }
                        Msg::Bookmark => continue,
                        Msg::Change(c) if c.kind == kind && c.rv > last => {
                            last = c.rv;
                            line(c.typ, shape(&c.object, meta_only))
                        }
                        Msg::Change(_) => continue,
                    };
                    if tx.send(out).await.is_err() {
                        break;
                    }
                }
            });
        }
    }
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// A Pod in the real schema (`v1.Pod`): `ips` go to `status.podIP(s)`;
/// `owner` is the controller owner reference (kind, name); `phase` e.g.
/// `Running`, `Succeeded`. `creationTimestamp` and `status.startTime` are
/// now, in whole seconds (RFC 3339, as the API server writes them).
#[allow(clippy::too_many_arguments)]
pub fn pod_json(
    namespace: &str,
    name: &str,
    uid: &str,
    ips: &[&str],
    node: &str,
    owner: Option<(&str, &str)>,
    host_network: bool,
    phase: &str,
) -> Value {
    let owners: Vec<Value> = owner
        .map(|(k, n)| {
            let av = match k {
                "ReplicaSet" | "StatefulSet" | "DaemonSet" => "apps/v1",
                "Job" => "batch/v1",
                _ => "v1",
            };
            vec![json!({"apiVersion": av, "kind": k, "name": n,
                         "uid": "00000000-0000-4000-8000-00000000beef",
                         "controller": true, "blockOwnerDeletion": true})]
        })
        .unwrap_or_default();
    let pod_ips: Vec<Value> = ips.iter().map(|ip| json!({"ip": ip})).collect();
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let mut status = json!({"phase": phase, "hostIP": "198.18.0.1", "startTime": now});
    if let Some(first) = ips.first() {
        status["podIP"] = json!(first);
        status["podIPs"] = json!(pod_ips);
    }
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "uid": uid,
                     "creationTimestamp": now,
                     "labels": {"app": name},
                     "ownerReferences": owners},
        "spec": {"nodeName": node, "hostNetwork": host_network,
                 "containers": [{"name": "app", "image": "nginx:1.27"}]},
        "status": status,
    })
}

/// A controller object (`apps/v1` ReplicaSet or `batch/v1` Job) with an
/// optional controller owner (Deployment / CronJob name).
pub fn owner_json(
    kind: &str,
    namespace: &str,
    name: &str,
    uid: &str,
    owner: Option<&str>,
) -> Value {
    let (av, owner_kind) = match kind {
        "ReplicaSet" => ("apps/v1", "Deployment"),
        "Job" => ("batch/v1", "CronJob"),
        k => panic!("owner_json: {k} is not served"),
    };
    let owners: Vec<Value> = owner
        .map(|n| {
            vec![json!({"apiVersion": av, "kind": owner_kind, "name": n,
                         "uid": "00000000-0000-4000-8000-0000000cafe0", "controller": true})]
        })
        .unwrap_or_default();
    json!({
        "apiVersion": av, "kind": kind,
        "metadata": {"name": name, "namespace": namespace, "uid": uid,
                     "creationTimestamp": "2026-01-01T00:00:00Z",
                     "ownerReferences": owners},
        "spec": {"template": {"spec": {"containers": [{"name": "app", "image": "nginx:1.27"}]}}},
    })
}
