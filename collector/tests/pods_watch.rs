//! The pod watch (kube-rs, unchanged) against the local API server of
//! `ctw_testkit::kubeapi`: initial list, watch events, owner resolution from
//! metadata-only watches, bookmarks, a dropped watch resumed from the last
//! resourceVersion, and a 410 Gone leading to a re-list that finds a delete
//! the watch never saw. The history's answers are asserted against what the
//! test made the server hold, at times the test took around each change.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use ctw_collector::config::{KubernetesConfig, KubernetesEnabled};
use ctw_collector::metrics::Metrics;
use ctw_collector::pods::watch::{self, now_ns};
use ctw_collector::pods::{NoPodReason, PodHistory};
use ctw_testkit::eventually;
use ctw_testkit::kubeapi::{owner_json, pod_json, KubeApi};

const WAIT: Duration = Duration::from_secs(20);

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn uid(n: u32) -> String {
    format!("00000000-0000-4000-8000-{n:012x}")
}

fn name_now(h: &PodHistory, addr: &str) -> Option<String> {
    h.at(ip(addr), now_ns()).pod.map(|p| p.name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_rs_list_watch_bookmark_drop_and_410_relist() {
    let api = KubeApi::start();
    api.apply(owner_json(
        "ReplicaSet",
        "payments",
        "checkout-7d9f",
        &uid(100),
        Some("checkout"),
    ));
    api.apply(owner_json(
        "Job",
        "batch",
        "report-29000",
        &uid(101),
        Some("report"),
    ));
    api.apply(pod_json(
        "payments",
        "checkout-7d9f-a",
        &uid(1),
        &["198.18.1.11"],
        "node-3",
        Some(("ReplicaSet", "checkout-7d9f")),
        false,
        "Running",
    ));
    api.apply(pod_json(
        "batch",
        "report-29000-x",
        &uid(2),
        &["198.18.1.12"],
        "node-2",
        Some(("Job", "report-29000")),
        false,
        "Running",
    ));
    api.apply(pod_json(
        "kube-system",
        "exporter-n3",
        &uid(3),
        &["198.18.0.3"],
        "node-3",
        Some(("DaemonSet", "exporter")),
        true,
        "Running",
    ));

    let dir = std::env::temp_dir().join(format!("ctw-pods-watch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let kubeconfig = dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    let cfg = KubernetesConfig {
        enabled: KubernetesEnabled::Auto,
        kubeconfig: Some(kubeconfig),
        history_dir: None,
        ..KubernetesConfig::default()
    };
    assert!(watch::enabled(&cfg));
    let client = watch::client(&cfg).await.expect("client");
    let history = Arc::new(PodHistory::open(&dir.join("pods"), u64::MAX).expect("history"));
    let metrics = Metrics::new();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(watch::run(
        client,
        history.clone(),
        metrics.clone(),
        async {
            let _ = stop_rx.await;
        },
    ));

    // Initial list: names with workloads resolved through the owners.
    eventually(WAIT, "the listed pods are named", || {
        name_now(&history, "198.18.1.11").is_some() && name_now(&history, "198.18.1.12").is_some()
    })
    .await;
    eventually(WAIT, "owners resolved to Deployment and CronJob", || {
        let w = |a: &str| history.at(ip(a), now_ns()).pod.and_then(|p| p.workload);
        w("198.18.1.11").is_some_and(|w| w.kind == "Deployment" && w.name == "checkout")
            && w("198.18.1.12").is_some_and(|w| w.kind == "CronJob" && w.name == "report")
    })
    .await;
    let a = history.at(ip("198.18.1.11"), now_ns()).pod.expect("pod a");
    assert_eq!(
        (a.namespace.as_str(), a.node.as_str(), a.uid.as_str()),
        ("payments", "node-3", uid(1).as_str())
    );
    let host = history.at(ip("198.18.0.3"), now_ns());
    assert_eq!(host.reason, Some(NoPodReason::HostNetwork));
    assert_eq!(host.holders[0].name, "exporter-n3");
    let reqs = api.requests();
    assert!(reqs.iter().any(|r| r == "list /api/v1/pods"), "{reqs:?}");
    assert!(
        reqs.iter().any(|r| r.starts_with("watch /api/v1/pods")
            && r.contains("watch=true")
            && r.contains("allowWatchBookmarks=true")
            && r.contains("resourceVersion=")),
        "{reqs:?}"
    );

    // Watch: delete A, then B gets A's IP.
    let t_a = now_ns();
    api.delete("Pod", "payments", "checkout-7d9f-a");
    eventually(WAIT, "A's delete seen", || {
        name_now(&history, "198.18.1.11").is_none()
    })
    .await;
    let t_gap = now_ns();
    // B's startTime (whole seconds) opens its handover window: after A's
    // time and the pause, as in a cluster where B starts later.
    eventually(WAIT, "the clock's next second", || {
        now_ns() / 1_000_000_000 > t_gap / 1_000_000_000
    })
    .await;
    api.apply(pod_json(
        "payments",
        "checkout-7d9f-b",
        &uid(4),
        &["198.18.1.11"],
        "node-1",
        Some(("ReplicaSet", "checkout-7d9f")),
        false,
        "Running",
    ));
    eventually(WAIT, "B holds A's IP", || {
        name_now(&history, "198.18.1.11").as_deref() == Some("checkout-7d9f-b")
    })
    .await;
    assert_eq!(
        history
            .at(ip("198.18.1.11"), t_a)
            .pod
            .map(|p| p.name)
            .as_deref(),
        Some("checkout-7d9f-a")
    );
    assert_eq!(
        history.at(ip("198.18.1.11"), t_gap).reason,
        Some(NoPodReason::NoPodAtTime)
    );
    let reused = history.answer(ip("198.18.1.11"), t_a, now_ns());
    assert!(
        reused.pod_ip_reused && reused.holders.len() == 2,
        "{reused:?}"
    );

    // Bookmark, then a dropped connection: kube-rs resumes the watch from
    // the bookmark's resourceVersion (newer than any pod event it saw: a
    // ReplicaSet changed since), without a re-list. The server writes the
    // bookmark line before ending the stream, so the client reads it.
    let lists = api.count("list /api/v1/pods");
    api.apply(owner_json(
        "ReplicaSet",
        "payments",
        "other-1",
        &uid(102),
        None,
    ));
    let bookmark_rv = api.resource_version();
    let watches = api.count("watch /api/v1/pods");
    api.bookmark();
    api.drop_watches();
    eventually(WAIT, "pod watch resumed", || {
        api.count("watch /api/v1/pods") > watches
    })
    .await;
    let resumed = api
        .requests()
        .into_iter()
        .rev()
        .find(|r| r.starts_with("watch /api/v1/pods"))
        .expect("a pod watch");
    assert!(
        resumed
            .split('&')
            .any(|kv| kv == format!("resourceVersion={bookmark_rv}")),
        "resumed from the bookmark {bookmark_rv}: {resumed}"
    );
    api.apply(pod_json(
        "payments",
        "after-drop",
        &uid(6),
        &["198.18.1.16"],
        "node-1",
        None,
        false,
        "Running",
    ));
    eventually(WAIT, "a pod added after the drop is seen", || {
        name_now(&history, "198.18.1.16").is_some()
    })
    .await;
    assert_eq!(
        api.count("list /api/v1/pods"),
        lists,
        "a dropped watch resumes without a re-list"
    );

    // 410: the report pod's DELETED falls in a compacted window; the
    // resumed watch gets 410 Gone, kube-rs re-lists, the history closes the
    // pod at the re-list and records the outage as a gap.
    let before = now_ns();
    assert!(api.delete_unseen("Pod", "batch", "report-29000-x"));
    api.expire();
    api.drop_watches();
    eventually(WAIT, "re-list after 410", || {
        api.count("list /api/v1/pods") > lists
    })
    .await;
    eventually(WAIT, "the unseen delete is reconciled", || {
        name_now(&history, "198.18.1.12").is_none()
    })
    .await;
    let gaps = history.gaps();
    let last = gaps.last().expect("a gap");
    assert!(
        last.from_ns >= before && last.to_ns <= now_ns(),
        "{gaps:?} before={before}"
    );
    let inside = history.at(ip("198.18.1.12"), last.from_ns);
    assert!(!inside.verified, "{inside:?}");
    assert!(history.at(ip("198.18.1.12"), before).verified);
    assert!(
        metrics
            .pod_watch_failures
            .with_label_values(&["pods"])
            .get()
            >= 1
    );
    // Other pods survive the re-list unchanged (same interval).
    let b = history.at(ip("198.18.1.11"), now_ns()).pod.expect("b");
    assert!(b.from_ns < last.from_ns);

    let _ = stop_tx.send(());
    task.await.expect("watch task");
    // The journal has it all: reopen and ask again.
    let reopened = PodHistory::open(&dir.join("pods"), u64::MAX).expect("reopen");
    assert_eq!(
        reopened
            .at(ip("198.18.1.11"), t_a)
            .pod
            .map(|p| p.name)
            .as_deref(),
        Some("checkout-7d9f-a")
    );
    assert!(!reopened.at(ip("198.18.1.12"), last.from_ns).verified);
    let _ = std::fs::remove_dir_all(&dir);
}
