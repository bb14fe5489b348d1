//! More nodes and hosts around one server namespace: the shape of a cluster.
//!
//! [`Topology::add_node`] adds a node namespace (with its own pods behind a
//! bridge and masquerade) linked to the server namespace; node 0 is the
//! topology's original node. [`Topology::add_host`] adds a plain host (for
//! example the collector) linked to the server namespace, which then forwards
//! between its links. Pods stay unreachable from everything but their node:
//! only NAT makes their replies come back.
//!
//! Extra node `i` (1-based) uses k' = k + i (mod 256): pods 198.18.k'.0/24,
//! its link to srv 198.19.k'.0/24 (node .1, srv .2). Host `h` uses
//! 198.19.(k + 128 + h).0/24 (host .1, srv .2). IPv4 only.

use std::fs;
use std::net::{Ipv4Addr, Ipv6Addr};

use super::{ip, masquerade, must_in, Topology, NETNS_LOCK};

#[derive(Debug, Clone)]
pub(crate) struct ExtraNode {
    ns: String,
    pods: Vec<String>,
    k: u8,
}

impl Topology {
    fn new_ns(&mut self, name: String) -> String {
        {
            let _guard = NETNS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
            super::must(&["ip", "netns", "add", &name]);
        }
        self.created.push(name.clone());
        ip(&name, "link set lo up");
        name
    }

    /// Number of nodes (1 + added ones).
    pub fn node_count(&self) -> usize {
        1 + self.extra_nodes.len()
    }

    /// Adds node `i` (returned) with `pods` pods; returns its index.
    pub fn add_node(&mut self, pods: usize) -> usize {
        let i = self.node_count();
        let k = self.k.wrapping_add(i as u8);
        let node = self.new_ns(format!("ctw{}n{i}", self.suffix));
        let srv = self.srv.clone();
        let mut pod_names = Vec::new();
        ip(
            &node,
            "link add br0 type bridge stp_state 0 forward_delay 0",
        );
        ip(&node, &format!("addr add 198.18.{k}.1/24 dev br0"));
        ip(&node, "link set br0 up");
        for j in 0..pods {
            let pod = self.new_ns(format!("ctw{}n{i}p{j}", self.suffix));
            ip(
                &node,
                &format!("link add p{j} type veth peer name eth0 netns {pod}"),
            );
            ip(&node, &format!("link set p{j} master br0"));
            ip(&node, &format!("link set p{j} up"));
            ip(&pod, &format!("addr add 198.18.{k}.{}/24 dev eth0", 10 + j));
            ip(&pod, "link set eth0 up");
            ip(&pod, &format!("route add default via 198.18.{k}.1"));
            pod_names.push(pod);
        }
        ip(
            &node,
            &format!("link add s0 type veth peer name e{i} netns {srv}"),
        );
        ip(&node, &format!("addr add 198.19.{k}.1/24 dev s0"));
        ip(&srv, &format!("addr add 198.19.{k}.2/24 dev e{i}"));
        ip(&node, "link set s0 up");
        ip(&srv, &format!("link set e{i} up"));
        must_in(&node, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        masquerade(&node, "s0", &self.tmp.join(format!("node{i}.nft")));
        self.extra_nodes.push(ExtraNode {
            ns: node,
            pods: pod_names,
            k,
        });
        self.route_hosts_from_nodes();
        i
    }

    /// Adds a host namespace linked to srv; returns (namespace, its address).
    pub fn add_host(&mut self, name: &str) -> (String, Ipv4Addr) {
        let h = self.hosts.len() as u8;
        let k = self.k.wrapping_add(128).wrapping_add(h);
        let ns = self.new_ns(format!("ctw{}{name}", self.suffix));
        let srv = self.srv.clone();
        ip(
            &ns,
            &format!("link add eth0 type veth peer name h{h} netns {srv}"),
        );
        ip(&ns, &format!("addr add 198.19.{k}.1/24 dev eth0"));
        ip(&srv, &format!("addr add 198.19.{k}.2/24 dev h{h}"));
        // IPv6 too ([`Self::host_ip6`]), without duplicate address detection.
        let (v6, srv_v6) = (Self::host_net6(k, 1), Self::host_net6(k, 2));
        ip(&ns, &format!("-6 addr add {v6}/64 dev eth0 nodad"));
        ip(&srv, &format!("-6 addr add {srv_v6}/64 dev h{h} nodad"));
        ip(&ns, "link set eth0 up");
        ip(&srv, &format!("link set h{h} up"));
        // The host reaches the node links through srv; srv forwards.
        ip(&ns, &format!("route add default via 198.19.{k}.2"));
        ip(&ns, &format!("-6 route add default via {srv_v6}"));
        must_in(&srv, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        must_in(&srv, &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
        let addr = Ipv4Addr::new(198, 19, k, 1);
        self.hosts.push((ns.clone(), addr));
        self.route_hosts_from_nodes();
        (ns, addr)
    }

    /// `fd00:198:19:k::n`: IPv6 address `n` on the link of the host whose
    /// link number is `k`.
    fn host_net6(k: u8, n: u16) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x198, 0x19, u16::from(k), 0, 0, 0, n)
    }

    /// The IPv6 address of the host `add_host` made in namespace `ns`.
    /// Only node 0 has IPv6 (and a route to it); extra nodes are IPv4 only.
    pub fn host_ip6(&self, ns: &str) -> Option<Ipv6Addr> {
        let o = self.hosts.iter().find(|(n, _)| n == ns)?.1.octets();
        Some(Self::host_net6(o[2], 1))
    }

    /// Every node gets a route to every host through srv.
    fn route_hosts_from_nodes(&self) {
        for i in 0..self.node_count() {
            let via = self.srv_ip_for_node(i);
            for (_, addr) in &self.hosts {
                let o = addr.octets();
                let net = format!("{}.{}.{}.0/24", o[0], o[1], o[2]);
                let ns = self.node_ns_of(i).to_string();
                // `replace` makes this idempotent across calls.
                ip(&ns, &format!("route replace {net} via {via}"));
                if i == 0 {
                    let net6 = Self::host_net6(o[2], 0);
                    ip(
                        &ns,
                        &format!("-6 route replace {net6}/64 via {}", self.srv_ip6()),
                    );
                }
            }
        }
    }

    fn extra(&self, i: usize) -> &ExtraNode {
        &self.extra_nodes[i - 1]
    }

    /// Namespace of node `i` (0 = the original node).
    pub fn node_ns_of(&self, i: usize) -> &str {
        if i == 0 {
            &self.node
        } else {
            &self.extra(i).ns
        }
    }

    /// Namespace of pod `j` of node `i`.
    pub fn pod_ns_of(&self, i: usize, j: usize) -> &str {
        if i == 0 {
            &self.pods[j]
        } else {
            &self.extra(i).pods[j]
        }
    }

    pub fn pod_count_of(&self, i: usize) -> usize {
        if i == 0 {
            self.pods.len()
        } else {
            self.extra(i).pods.len()
        }
    }

    pub fn pod_ip4_of(&self, i: usize, j: usize) -> Ipv4Addr {
        if i == 0 {
            self.pod_ip4(j)
        } else {
            Ipv4Addr::new(198, 18, self.extra(i).k, 10 + j as u8)
        }
    }

    /// Node `i`'s address on its link to srv: its SNAT address.
    pub fn node_ip4_of(&self, i: usize) -> Ipv4Addr {
        if i == 0 {
            self.node_ip4()
        } else {
            Ipv4Addr::new(198, 19, self.extra(i).k, 1)
        }
    }

    /// srv's address on node `i`'s link.
    pub fn srv_ip_for_node(&self, i: usize) -> Ipv4Addr {
        if i == 0 {
            self.srv_ip4()
        } else {
            Ipv4Addr::new(198, 19, self.extra(i).k, 2)
        }
    }

    /// Runs `conntrack <args>` in node `i`'s namespace.
    pub fn conntrack_on(&self, i: usize, args: &[&str]) -> String {
        let mut argv = vec!["conntrack"];
        argv.extend_from_slice(args);
        must_in(self.node_ns_of(i), &argv)
    }
}

/// The end-to-end cluster: two nodes with pods behind masquerade, an ingress
/// (the server namespace) running nginx on port 80, the collector in its own
/// namespace, and one agent per node (`node-0`, `node-1`) streaming to it.
/// [`Cluster::start_with_pod_objects`] makes a [`PodCluster`]: the same,
/// with the testbed pods as Pod objects the collector watches.
#[derive(Debug)]
pub struct Cluster {
    pub topo: Topology,
    pub collector: crate::collector::Collector,
    pub nginx: crate::NginxHandle,
    pub agents: Vec<crate::agent::Agent>,
}

/// A [`Cluster`] with kubernetes on (it derefs to the cluster): a local
/// API server in the collector's namespace serving a Pod object for every
/// testbed pod, watched by the collector.
#[derive(Debug)]
pub struct PodCluster {
    pub cluster: Cluster,
    pub kube: crate::kubeapi::KubeApi,
    /// The Pod objects served for the testbed pods.
    pub pod_objects: Vec<PodObject>,
}

impl std::ops::Deref for PodCluster {
    type Target = Cluster;
    fn deref(&self) -> &Cluster {
        &self.cluster
    }
}

impl PodCluster {
    /// The Pod object of the testbed pod whose address is `ip`.
    pub fn pod_object(&self, ip: Ipv4Addr) -> Option<&PodObject> {
        self.pod_objects.iter().find(|p| p.ip == ip)
    }
}

/// A testbed pod as a Pod object: node `node`'s pod `index`, with the
/// address it really has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodObject {
    pub node: usize,
    pub index: usize,
    pub ip: Ipv4Addr,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// The workload it belongs to (kind, name), as the collector resolves
    /// it: node 0's pods are Deployment `shop/web` (through ReplicaSet
    /// `web-7d9f`), node 1's are StatefulSet `data/db`.
    pub workload_kind: String,
    pub workload_name: String,
}

impl Cluster {
    /// `log_format`: nginx's access-log format (default: the testkit's
    /// `$remote_addr $remote_port $msec $server_port`). `uplink_extra` goes
    /// into the agents' `collector:` section (indented two spaces),
    /// `agent_extra` at their top level.
    pub fn start(
        pods: usize,
        log_format: Option<&str>,
        uplink_extra: &str,
        agent_extra: &str,
    ) -> Cluster {
        Self::start_inner(pods, log_format, uplink_extra, agent_extra, false).0
    }

    /// [`Cluster::start`] with kubernetes on: a local API server
    /// ([`crate::kubeapi::KubeApi`]) in the collector's namespace serves a
    /// Pod object for every testbed pod with its real address (and the
    /// ReplicaSet of node 0's pods), the collector watches it through
    /// `kubernetes.kubeconfig`, and the start waits until the collector
    /// holds every pod. The objects are in [`PodCluster::pod_objects`].
    pub fn start_with_pod_objects(
        pods: usize,
        log_format: Option<&str>,
        uplink_extra: &str,
        agent_extra: &str,
    ) -> PodCluster {
        let (cluster, kube) = Self::start_inner(pods, log_format, uplink_extra, agent_extra, true);
        let (kube, pod_objects) = kube.expect("kubernetes on");
        PodCluster {
            cluster,
            kube,
            pod_objects,
        }
    }

    fn pod_objects_of(topo: &Topology) -> Vec<PodObject> {
        let mut out = Vec::new();
        for node in 0..topo.node_count() {
            for index in 0..topo.pod_count_of(node) {
                let (namespace, name, kind, workload) = if node == 0 {
                    ("shop", format!("web-7d9f-{index}x"), "Deployment", "web")
                } else {
                    ("data", format!("db-{index}"), "StatefulSet", "db")
                };
                out.push(PodObject {
                    node,
                    index,
                    ip: topo.pod_ip4_of(node, index),
                    namespace: namespace.into(),
                    name,
                    uid: format!("00000000-0000-4000-8000-{:08x}{index:04x}", node + 1),
                    workload_kind: kind.into(),
                    workload_name: workload.into(),
                });
            }
        }
        out
    }

    fn start_inner(
        pods: usize,
        log_format: Option<&str>,
        uplink_extra: &str,
        agent_extra: &str,
        kubernetes: bool,
    ) -> (Cluster, Option<(crate::kubeapi::KubeApi, Vec<PodObject>)>) {
        let mut topo = Topology::new(pods);
        topo.add_node(pods);
        let (col_ns, col_addr) = topo.add_host("c");
        let nginx = match log_format {
            Some(f) => topo.start_nginx_with_format(&[80], f),
            None => topo.start_nginx(&[80]),
        };
        let (kube, extra) = if kubernetes {
            let api = crate::kubeapi::KubeApi::start_in_netns(&col_ns);
            let kubeconfig = topo.tmp_dir().join("kubeconfig");
            api.write_kubeconfig(&kubeconfig);
            api.apply(crate::kubeapi::owner_json(
                "ReplicaSet",
                "shop",
                "web-7d9f",
                "00000000-0000-4000-8000-0000000000aa",
                Some("web"),
            ));
            let objects = Self::pod_objects_of(&topo);
            for p in &objects {
                let ip = p.ip.to_string();
                let owner = if p.workload_kind == "Deployment" {
                    ("ReplicaSet", "web-7d9f")
                } else {
                    ("StatefulSet", p.workload_name.as_str())
                };
                api.apply(crate::kubeapi::pod_json(
                    &p.namespace,
                    &p.name,
                    &p.uid,
                    &[&ip],
                    &format!("node-{}", p.node),
                    Some(owner),
                    false,
                    "Running",
                ));
            }
            let extra = format!("kubernetes:\n  kubeconfig: {}\n", kubeconfig.display());
            (Some((api, objects)), extra)
        } else {
            (None, String::new())
        };
        let collector = crate::collector::Collector::start(&mut topo, &col_ns, col_addr, &extra);
        if let Some((_, objects)) = &kube {
            let want = format!("ctw_collector_pod_intervals_live {}", objects.len());
            crate::wait_for(
                std::time::Duration::from_secs(30),
                "the collector holds every Pod object",
                || {
                    let (_, m) = collector.get("/metrics");
                    m.lines().any(|l| l == want).then_some(())
                },
            );
        }
        let mut agents = Vec::new();
        for i in 0..2 {
            let name = format!("node-{i}");
            let spool = topo.tmp_dir().join(format!("spool-{i}"));
            let yaml = format!(
                "{}{agent_extra}",
                collector.agent_yaml(&name, &spool, uplink_extra)
            );
            agents.push(crate::agent::Agent::start_on(
                &mut topo,
                i,
                &name,
                &[80],
                &yaml,
            ));
        }
        collector.wait_connected(&["node-0", "node-1"]);
        (
            Cluster {
                topo,
                collector,
                nginx,
                agents,
            },
            kube,
        )
    }

    /// One HTTP request from pod `pod` of node `node` to nginx (optionally
    /// from a fixed local port, with extra curl arguments); returns the raw
    /// access-log line it produced.
    pub fn request(
        &self,
        node: usize,
        pod: usize,
        local_port: Option<u16>,
        extra_args: &[&str],
    ) -> String {
        let read = || fs::read_to_string(&self.nginx.access_log).unwrap_or_default();
        let before = read().lines().count();
        let url = format!("http://{}/", self.topo.srv_ip_for_node(node));
        crate::curl_ok(self.topo.pod_ns_of(node, pod), &url, local_port, extra_args);
        crate::wait_for(
            std::time::Duration::from_secs(30),
            "nginx to log the request",
            || read().lines().nth(before).map(str::to_string),
        )
    }

    /// `per_pod` requests ([`request`](Self::request), one after the
    /// other) from every pod of every node, node by node and pod by pod;
    /// each as (the access-log line nginx wrote, the pod's address, the
    /// node's agent name `node-N`).
    pub fn requests(&self, per_pod: usize) -> Vec<(String, Ipv4Addr, String)> {
        let mut sent = Vec::new();
        for node in 0..self.topo.node_count() {
            for pod in 0..self.topo.pod_count_of(node) {
                for _ in 0..per_pod {
                    let line = self.request(node, pod, None, &[]);
                    sent.push((
                        line,
                        self.topo.pod_ip4_of(node, pod),
                        format!("node-{node}"),
                    ));
                }
            }
        }
        sent
    }
}
