//! Independent proof of the NetworkPolicies: np-guard's netpol-analyzer (`netpolicy`), which
//! shares no code with ours, computes the connections the rendered policies allow between
//! stand-in pods, and that set must equal the set the stack's spec implies.
//!
//! The expected set is computed here from the spec's raw YAML alone (its own defaults, its own
//! reading of `calls`, `serviceToService`, `backends`, `egress` and `allowedSourceRanges`); the
//! builders are only used to render what is being checked.
//!
//! The world the analyzer sees, besides the rendered NetworkPolicies:
//! - one Pod per Deployment of the stack, with the Deployment's exact pod-template labels;
//! - one Pod per backend, labelled with the backend's `podSelector.matchLabels`;
//! - `kube-system/coredns` labelled `k8s-app=kube-dns`;
//! - `unrelated` in the stack's namespace, `elsewhere/stranger`, and two impostors labelled
//!   `k8s-app=kube-dns` outside kube-system (DNS must go to kube-system's pods only);
//! - a Namespace object for each namespace, with its `kubernetes.io/metadata.name` label.
//!
//! The analyzer comes from `scripts/build-parts tools`; under `CI=true` its absence fails the
//! test (see `support::tools_bin_dir`), it is never skipped silently.

mod support;

use support::netpol::*;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use opsconductor_operator::build::BuildOptions;
use opsconductor_operator::render::bundle_for;
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------------------
// The spec, read independently of the operator's model.
// ---------------------------------------------------------------------------------------------

struct SpecService {
    name: String,
    port: u16,
    /// Routed, or the verdict service of edge authentication (`spec.gateway.edgeAuth`, when
    /// a service has `edgeAuth`): the gateway connects to it.
    gateway_reaches: bool,
    calls: Vec<String>,
    egress: Vec<(String, Vec<u16>)>,
}

struct SpecBackend {
    name: String,
    labels: BTreeMap<String, String>,
    ports: Vec<u16>,
    allow_from: Vec<String>,
}

/// What the expected connections depend on, straight from the YAML with the API's defaults.
struct Spec {
    namespace: String,
    stack: String,
    source_ranges: Vec<String>,
    all_mode: bool,
    services: Vec<SpecService>,
    backends: Vec<SpecBackend>,
}

fn ports_of(v: &Value) -> Vec<u16> {
    v.as_array()
        .map(|a| a.iter().map(|p| p.as_u64().unwrap() as u16).collect())
        .unwrap_or_default()
}

fn strings_of(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

impl Spec {
    fn read(doc: &Value, default_namespace: &str) -> Spec {
        let spec = &doc["spec"];
        let any_edge_auth = spec["services"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s.get("edgeAuth").is_some_and(|a| !a.is_null()));
        let verdicts = spec["gateway"]["edgeAuth"]["service"]
            .as_str()
            .filter(|_| any_edge_auth);
        Spec {
            namespace: doc["metadata"]["namespace"]
                .as_str()
                .unwrap_or(default_namespace)
                .to_string(),
            stack: doc["metadata"]["name"].as_str().unwrap().to_string(),
            source_ranges: strings_of(&spec["gateway"]["allowedSourceRanges"]),
            all_mode: spec["policy"]["serviceToService"].as_str() == Some("All"),
            services: spec["services"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| SpecService {
                    name: s["name"].as_str().unwrap().to_string(),
                    port: s["port"].as_u64().unwrap_or(8000) as u16,
                    gateway_reaches: s.get("route").is_some_and(|r| !r.is_null())
                        || verdicts == s["name"].as_str(),
                    calls: strings_of(&s["calls"]),
                    egress: s["egress"]
                        .as_array()
                        .map(|es| {
                            es.iter()
                                .map(|e| {
                                    (
                                        e["cidr"].as_str().unwrap().to_string(),
                                        ports_of(&e["ports"]),
                                    )
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                })
                .collect(),
            backends: spec["backends"]
                .as_array()
                .map(|bs| {
                    bs.iter()
                        .map(|b| SpecBackend {
                            name: b["name"].as_str().unwrap().to_string(),
                            labels: serde_json::from_value(b["podSelector"]["matchLabels"].clone())
                                .expect("test stacks select backends by matchLabels"),
                            ports: ports_of(&b["ports"]),
                            allow_from: strings_of(&b["allowFrom"]),
                        })
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    fn gateway_pod(&self) -> Peer {
        pod(&self.namespace, &format!("{}-gateway", self.stack))
    }

    fn service_pod(&self, name: &str) -> Peer {
        pod(&self.namespace, name)
    }

    fn backend_pod(&self, name: &str) -> Peer {
        pod(&self.namespace, &format!("backend-{name}"))
    }

    fn stack_pods(&self) -> Vec<Peer> {
        let mut v = vec![self.gateway_pod()];
        v.extend(self.services.iter().map(|s| self.service_pod(&s.name)));
        v
    }

    /// Pods no policy restricts in the egress direction: everything but the stack's own.
    fn unrestricted_pods(&self) -> Vec<Peer> {
        let mut v = vec![
            pod(&self.namespace, "unrelated"),
            pod(&self.namespace, "fake-dns"),
            pod("kube-system", "coredns"),
            pod(OTHER_NS, "stranger"),
            pod(OTHER_NS, "fake-dns"),
        ];
        v.extend(self.backends.iter().map(|b| self.backend_pod(&b.name)));
        v
    }

    /// May `caller` call `callee`?
    fn may_call(&self, caller: &SpecService, callee: &SpecService) -> bool {
        self.all_mode || caller.calls.contains(&callee.name)
    }

    /// The connections "The policy" of API.md allows that start or end at a stack pod, or end
    /// at a backend.
    ///
    /// IPv6 ranges are left out: the analyzer sees IPv4 only (see [`withhold_ipv6`]).
    fn expected(&self) -> Facts {
        let mut f = Vec::new();
        let mut add = |src: Peer, dst: Peer, conn: Conn| f.push(Fact { src, dst, conn });
        let gw = self.gateway_pod();
        // Clients -> gateway 8080/8443: from anywhere (every pod whose egress is open, and
        // every address), or only from the source ranges.
        let sources: Vec<Peer> = if self.source_ranges.is_empty() {
            let mut v = self.unrestricted_pods();
            v.push(everyone_v4());
            v
        } else {
            self.source_ranges
                .iter()
                .filter(|c| !c.contains(':'))
                .map(|c| cidr_peer(c))
                .collect()
        };
        for s in sources {
            add(s.clone(), gw.clone(), tcp(8080));
            add(s, gw.clone(), tcp(8443));
        }
        // Gateway -> routed services and the verdict service of edge authentication.
        for s in self.services.iter().filter(|s| s.gateway_reaches) {
            add(gw.clone(), self.service_pod(&s.name), tcp(s.port));
        }
        // Service -> service.
        for caller in &self.services {
            for callee in &self.services {
                // A pod to itself is not a connection the analyzer lists.
                if caller.name != callee.name && self.may_call(caller, callee) {
                    add(
                        self.service_pod(&caller.name),
                        self.service_pod(&callee.name),
                        tcp(callee.port),
                    );
                }
            }
        }
        // allowFrom services -> backends.
        for b in &self.backends {
            for from in &b.allow_from {
                for p in &b.ports {
                    add(self.service_pod(from), self.backend_pod(&b.name), tcp(*p));
                }
            }
        }
        // Every stack pod -> cluster DNS, nothing else in kube-system, no impostor.
        for p in self.stack_pods() {
            add(p.clone(), pod("kube-system", "coredns"), tcp(53));
            add(p, pod("kube-system", "coredns"), udp(53));
        }
        // A service -> its own egress CIDRs.
        for s in &self.services {
            for (cidr, ports) in s.egress.iter().filter(|(c, _)| !c.contains(':')) {
                for p in ports {
                    add(self.service_pod(&s.name), cidr_peer(cidr), tcp(*p));
                }
            }
        }
        canonical(f)
    }

    /// The expected set for the analyzer's view of one side of the policies.
    ///
    /// With only the egress halves, the facts that start at a stack pod are those of
    /// [`Spec::expected`]. With only the ingress halves, the facts that end at a stack pod or a
    /// backend are those too, plus the stack's own pods reaching the gateway (their egress no
    /// longer stops them) when the gateway is open to everyone.
    fn expected_on(&self, side: Side) -> Facts {
        let all = self.expected();
        match side {
            Side::Both => all,
            Side::EgressOnly => self.relevant(&all, side),
            Side::IngressOnly => {
                let mut f = self.relevant(&all, side);
                if self.source_ranges.is_empty() {
                    for p in self.stack_pods().into_iter().skip(1) {
                        for port in [8080, 8443] {
                            f.insert(Fact {
                                src: p.clone(),
                                dst: self.gateway_pod(),
                                conn: tcp(port),
                            });
                        }
                    }
                }
                f
            }
        }
    }

    /// Keeps the facts this test is about: from or to a stack pod, or to a backend. (Traffic
    /// between pods no policy of the stack selects is not the stack's to decide.) With one
    /// side only, the facts that side decides: from a stack pod (egress), or to a stack pod or
    /// a backend (ingress).
    fn relevant(&self, facts: &Facts, side: Side) -> Facts {
        let stack: BTreeSet<Peer> = self.stack_pods().into_iter().collect();
        let backends: BTreeSet<Peer> = self
            .backends
            .iter()
            .map(|b| self.backend_pod(&b.name))
            .collect();
        facts
            .iter()
            .filter(|f| match side {
                Side::Both => {
                    stack.contains(&f.src) || stack.contains(&f.dst) || backends.contains(&f.dst)
                }
                Side::EgressOnly => stack.contains(&f.src),
                Side::IngressOnly => stack.contains(&f.dst) || backends.contains(&f.dst),
            })
            .cloned()
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Rendering a stack and its stand-in world.
// ---------------------------------------------------------------------------------------------

const OTHER_NS: &str = "elsewhere";
const DEFAULT_NS: &str = "demo";

fn stand_in_pod(ns: &str, name: &str, labels: &Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"containers": [{"name": "main", "image": "registry.invalid/stand-in:1"}]},
    })
}

fn namespace_object(ns: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": ns, "labels": {"kubernetes.io/metadata.name": ns}},
    })
}

/// Renders `doc` (an OpsConductorStack) and writes its NetworkPolicies with the stand-in world
/// as YAML into `dir`. `edit` may change a policy, or return false to leave it out.
fn write_world_edited(doc: &Value, dir: &Path, edit: &dyn Fn(&mut Value) -> bool) -> Spec {
    let spec = Spec::read(doc, DEFAULT_NS);
    let text = serde_yaml::to_string(doc).unwrap();
    let bundle = bundle_for(
        "test-stack.yaml",
        &text,
        DEFAULT_NS,
        &BuildOptions::default(),
    )
    .unwrap_or_else(|e| panic!("the test stack does not validate: {e}"));
    let mut objects: Vec<Value> = Vec::new();
    let mut withheld = Vec::new();
    for np in &bundle.network_policies {
        let mut v = serde_json::to_value(np).unwrap();
        v["apiVersion"] = json!("networking.k8s.io/v1");
        v["kind"] = json!("NetworkPolicy");
        withheld.extend(withhold_ipv6(&mut v));
        if edit(&mut v) {
            objects.push(v);
        }
    }
    check_withheld_ipv6(&spec, withheld);
    for d in &bundle.deployments {
        let name = d.metadata.name.as_deref().unwrap();
        let labels = serde_json::to_value(
            &d.spec
                .as_ref()
                .unwrap()
                .template
                .metadata
                .as_ref()
                .unwrap()
                .labels,
        )
        .unwrap();
        objects.push(stand_in_pod(&spec.namespace, name, &labels));
    }
    for b in &spec.backends {
        objects.push(stand_in_pod(
            &spec.namespace,
            &format!("backend-{}", b.name),
            &serde_json::to_value(&b.labels).unwrap(),
        ));
    }
    let dns = json!({"k8s-app": "kube-dns"});
    objects.push(stand_in_pod("kube-system", "coredns", &dns));
    objects.push(stand_in_pod(&spec.namespace, "fake-dns", &dns));
    objects.push(stand_in_pod(OTHER_NS, "fake-dns", &dns));
    objects.push(stand_in_pod(
        &spec.namespace,
        "unrelated",
        &json!({"app": "unrelated"}),
    ));
    objects.push(stand_in_pod(
        OTHER_NS,
        "stranger",
        &json!({"app": "stranger"}),
    ));
    for ns in [spec.namespace.as_str(), "kube-system", OTHER_NS] {
        objects.push(namespace_object(ns));
    }
    let yaml: String = objects
        .iter()
        .map(|o| format!("---\n{}", serde_yaml::to_string(o).unwrap()))
        .collect();
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("world.yaml"), yaml).unwrap();
    spec
}

/// netpol-analyzer v1.4.4 models IPv4 only: it reads `2001:db8::/48` as the IPv4 address
/// 32.1.13.184 (the CIDR's first four bytes). So IPv6 `ipBlock` peers are withheld from it and
/// checked here instead, structurally. A rule left without peers is dropped rather than left
/// with an empty peer list (which would mean "from everywhere"): for the IPv4 world the
/// analyzer sees, a rule that only named IPv6 ranges allows nothing.
///
/// Returns `(policy name, "ingress" | "egress", cidr, ports)` for each withheld peer.
fn withhold_ipv6(np: &mut Value) -> Vec<(String, &'static str, String, Vec<u16>)> {
    let name = np["metadata"]["name"].as_str().unwrap().to_string();
    let mut out = Vec::new();
    for (direction, peers_key) in [("ingress", "from"), ("egress", "to")] {
        let Some(rules) = np["spec"][direction].as_array_mut() else {
            continue;
        };
        rules.retain_mut(|rule| {
            let ports: Vec<u16> = rule["ports"]
                .as_array()
                .map(|ps| {
                    ps.iter()
                        .map(|p| p["port"].as_u64().unwrap() as u16)
                        .collect()
                })
                .unwrap_or_default();
            let Some(peers) = rule[peers_key].as_array_mut() else {
                return true;
            };
            let before = peers.len();
            peers.retain(|peer| match peer["ipBlock"]["cidr"].as_str() {
                Some(cidr) if cidr.contains(':') => {
                    out.push((name.clone(), direction, cidr.to_string(), ports.clone()));
                    false
                }
                _ => true,
            });
            !(before > 0 && peers.is_empty())
        });
    }
    out
}

/// The withheld IPv6 peers are exactly the spec's IPv6 source ranges (gateway ingress on
/// 8080/8443) and each service's IPv6 egress CIDRs on their ports.
fn check_withheld_ipv6(spec: &Spec, withheld: Vec<(String, &'static str, String, Vec<u16>)>) {
    let mut expected = Vec::new();
    for r in spec.source_ranges.iter().filter(|c| c.contains(':')) {
        expected.push((
            format!("{}-gateway", spec.stack),
            "ingress",
            r.clone(),
            vec![8080, 8443],
        ));
    }
    for s in &spec.services {
        for (cidr, ports) in s.egress.iter().filter(|(c, _)| c.contains(':')) {
            expected.push((
                format!("{}-svc-{}", spec.stack, s.name),
                "egress",
                cidr.clone(),
                ports.clone(),
            ));
        }
    }
    let mut withheld = withheld;
    withheld.sort();
    expected.sort();
    assert_eq!(
        withheld, expected,
        "IPv6 ipBlocks in the policies differ from the spec's IPv6 ranges"
    );
}

fn write_world(doc: &Value, dir: &Path) -> Spec {
    write_world_edited(doc, dir, &|_| true)
}

/// Which halves of the policies the analyzer sees. Every edge is written on both sides (the
/// caller's egress and the callee's ingress); analysing each half alone shows that each side
/// holds by itself, so a one-sided mistake cannot hide behind the other side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Both,
    IngressOnly,
    EgressOnly,
}

/// Keeps one direction of a policy: drops the other direction's rules and policy type, and
/// the policy when no type is left.
fn keep_side(np: &mut Value, side: Side) -> bool {
    let (drop_rules, drop_type) = match side {
        Side::Both => return true,
        Side::IngressOnly => ("egress", "Egress"),
        Side::EgressOnly => ("ingress", "Ingress"),
    };
    let spec = np["spec"].as_object_mut().unwrap();
    spec.remove(drop_rules);
    let types = spec["policyTypes"].as_array_mut().unwrap();
    types.retain(|t| t != drop_type);
    !types.is_empty()
}

fn show(facts: &Facts) -> String {
    facts.iter().map(|f| format!("  {f}\n")).collect()
}

/// Runs the analyzer over `doc`'s world, once with whole policies and once with each half,
/// and compares each with the spec's expected set. Returns the whole-policy facts.
fn prove(bin: &Path, label: &str, doc: &Value) -> Facts {
    let mut whole = Facts::new();
    for side in [Side::Both, Side::IngressOnly, Side::EgressOnly] {
        let tmp = tempfile::tempdir().unwrap();
        let spec = write_world_edited(doc, tmp.path(), &|np| keep_side(np, side));
        let actual = spec.relevant(&list(bin, tmp.path()), side);
        let expected = spec.expected_on(side);
        if actual != expected {
            let extra: Facts = actual.difference(&expected).cloned().collect();
            let missing: Facts = expected.difference(&actual).cloned().collect();
            let world = std::fs::read_to_string(tmp.path().join("world.yaml")).unwrap();
            let kept = std::env::temp_dir().join(format!("opsc-netpol-{label}-{side:?}.yaml"));
            std::fs::write(&kept, world).ok();
            panic!(
                "{label} ({side:?}): the analyzer's allowed connections differ from the spec's.\n\
                 allowed but not in the spec:\n{}missing:\n{}(the analyzed objects are in {})",
                show(&extra),
                show(&missing),
                kept.display()
            );
        }
        assert!(
            !expected.is_empty(),
            "{label}: a stack always allows at least DNS"
        );
        if side == Side::Both {
            whole = actual;
        }
    }
    whole
}

fn read_yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// Generated stacks.
// ---------------------------------------------------------------------------------------------

fn stack(name: &str, services: Value) -> Value {
    json!({
        "apiVersion": "opsconductor.io/v1alpha1",
        "kind": "OpsConductorStack",
        "metadata": {"name": name, "namespace": "apps"},
        "spec": {
            "gateway": {"hosts": ["apps.example.com"]},
            "tls": {"secretName": "apps-cert"},
            "services": services,
        }
    })
}

fn svc(name: &str) -> Value {
    json!({"name": name, "image": format!("registry.invalid/{name}:1")})
}

fn with(mut v: Value, key: &str, value: Value) -> Value {
    v[key] = value;
    v
}

/// A small deterministic generator (no clock, no OS randomness): a failing seed reproduces.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

const CIDRS: &[&str] = &[
    "10.20.0.0/16",
    "10.0.0.0/8",
    "192.168.1.0/24",
    "203.0.113.7/32",
    "172.16.0.0/12",
];

fn random_stack(seed: u64) -> Value {
    let mut r = Lcg(seed);
    let n = 1 + r.below(6) as usize;
    let ports = [8000u16, 8080, 9000, 3000, 5000, 8000];
    let names: Vec<String> = (0..n).map(|i| format!("s{i}")).collect();
    let services: Vec<Value> = (0..n)
        .map(|i| {
            let mut s = svc(&names[i]);
            let port = ports[r.below(ports.len() as u64) as usize];
            if port != 8000 || r.chance(50) {
                s["port"] = json!(port);
            }
            if r.chance(50) {
                s["route"] = json!(format!("/r{i}/"));
            }
            let calls: Vec<&String> = names.iter().filter(|_| r.chance(30)).collect();
            if !calls.is_empty() {
                s["calls"] = json!(calls);
            }
            if r.chance(35) {
                let k = 1 + r.below(2);
                let egress: Vec<Value> = (0..k)
                    .map(|_| {
                        let cidr = CIDRS[r.below(CIDRS.len() as u64) as usize];
                        let p: Vec<u16> = [22u16, 443, 5985, 80, 81]
                            .into_iter()
                            .filter(|_| r.chance(50))
                            .collect();
                        json!({"cidr": cidr, "ports": if p.is_empty() { vec![443] } else { p }})
                    })
                    .collect();
                s["egress"] = json!(egress);
            }
            s
        })
        .collect();
    let mut doc = stack(&format!("gen{seed}"), json!(services));
    let backends: Vec<Value> = (0..r.below(3))
        .map(|b| {
            let from: Vec<&String> = names.iter().filter(|_| r.chance(40)).collect();
            json!({"name": format!("db{b}"), "podSelector": {"matchLabels": {"app": format!("db{b}")}},
                   "ports": [5432 + b as u16], "allowFrom": from})
        })
        .collect();
    if !backends.is_empty() {
        doc["spec"]["backends"] = json!(backends);
    }
    if r.chance(30) {
        doc["spec"]["policy"] = json!({"serviceToService": "All"});
    }
    if r.chance(30) {
        doc["spec"]["gateway"]["allowedSourceRanges"] =
            json!(["198.51.100.0/24", "203.0.113.0/25"]);
    }
    doc
}

// ---------------------------------------------------------------------------------------------
// Tests.
// ---------------------------------------------------------------------------------------------

#[test]
fn examples_allow_exactly_what_their_spec_declares() {
    let Some(bin) = analyzer() else { return };
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        prove(
            &bin,
            path.file_stem().unwrap().to_str().unwrap(),
            &read_yaml(&path),
        );
        seen += 1;
    }
    assert!(seen >= 3, "expected the three examples, found {seen}");
}

#[test]
fn the_opsconductor_example_in_plain_words() {
    // A hand-written spot check of the expected set, so that a bug shared by the test's
    // reading of the spec and the builders would still show.
    let Some(bin) = analyzer() else { return };
    let doc =
        read_yaml(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/opsconductor.yaml"));
    let facts = prove(&bin, "opsconductor-spot", &doc);
    let has = |src: Peer, dst: Peer, conn: Conn| facts.contains(&Fact { src, dst, conn });
    let ns = "opsconductor";
    assert!(has(everyone_v4(), pod(ns, "prod-gateway"), tcp(8443)));
    assert!(has(pod(ns, "prod-gateway"), pod(ns, "frontend"), tcp(8080)));
    assert!(has(pod(ns, "jobs"), pod(ns, "executions"), tcp(8000)));
    assert!(!has(pod(ns, "executions"), pod(ns, "jobs"), tcp(8000)));
    assert!(has(
        pod(ns, "executions"),
        pod(ns, "backend-minio"),
        tcp(9000)
    ));
    assert!(!has(pod(ns, "jobs"), pod(ns, "backend-minio"), tcp(9000)));
    assert!(has(
        pod(ns, "executions"),
        cidr_peer("10.20.0.0/16"),
        tcp(22)
    ));
    assert!(has(
        pod(ns, "users"),
        pod("kube-system", "coredns"),
        udp(53)
    ));
    assert!(!has(pod(ns, "users"), pod(OTHER_NS, "fake-dns"), udp(53)));
    for f in &facts {
        let into_stack = matches!(&f.dst, Peer::Pod(p) if p.starts_with("opsconductor/") && !p.contains("backend-") && !p.ends_with("prod-gateway"));
        assert!(
            !(into_stack && (f.src == pod(ns, "unrelated") || f.src == pod(OTHER_NS, "stranger"))),
            "an unrelated pod reaches a service: {f}"
        );
    }
}

#[test]
fn generated_shapes_allow_exactly_what_their_spec_declares() {
    let Some(bin) = analyzer() else { return };
    let cases: Vec<(&str, Value)> = vec![
        ("no-routes", stack("noroutes", json!([svc("a"), svc("b")]))),
        (
            "everything-routed",
            stack(
                "routed",
                json!([
                    with(svc("a"), "route", json!("/")),
                    with(with(svc("b"), "route", json!("/b/")), "port", json!(9000)),
                    with(with(svc("c"), "route", json!("/c/")), "port", json!(3000)),
                ]),
            ),
        ),
        (
            "chain-of-calls",
            stack(
                "chain",
                json!([
                    with(with(svc("a"), "route", json!("/")), "calls", json!(["b"])),
                    with(with(svc("b"), "calls", json!(["c"])), "port", json!(8081)),
                    with(with(svc("c"), "calls", json!(["d"])), "port", json!(8082)),
                    with(svc("d"), "port", json!(8083)),
                ]),
            ),
        ),
        (
            "self-and-cycle",
            stack(
                "cycle",
                json!([
                    with(svc("a"), "calls", json!(["a", "b"])),
                    with(svc("b"), "calls", json!(["a"])),
                ]),
            ),
        ),
        ("backends", {
            let mut d = stack(
                "withdb",
                json!([
                    with(svc("api"), "route", json!("/")),
                    svc("worker"),
                    svc("report")
                ]),
            );
            d["spec"]["backends"] = json!([
                {"name": "pg", "podSelector": {"matchLabels": {"app": "pg"}}, "ports": [5432], "allowFrom": ["api", "worker"]},
                {"name": "cache", "podSelector": {"matchLabels": {"app": "cache", "tier": "data"}}, "ports": [6379, 16379], "allowFrom": ["worker"]},
                {"name": "cold", "podSelector": {"matchLabels": {"app": "cold"}}, "ports": [9000], "allowFrom": []},
            ]);
            d
        }),
        ("all-mode", {
            let mut d = stack(
                "mesh",
                json!([
                    with(svc("a"), "route", json!("/")),
                    with(svc("b"), "port", json!(9000)),
                    with(svc("c"), "port", json!(9100)),
                ]),
            );
            d["spec"]["policy"] = json!({"serviceToService": "All"});
            d
        }),
        (
            "egress-cidrs",
            stack(
                "egress",
                json!([
                    with(
                        svc("ssh"),
                        "egress",
                        json!([
                            {"cidr": "10.20.0.0/16", "ports": [22, 5985, 5986]},
                            {"cidr": "203.0.113.7/32", "ports": [443]},
                        ])
                    ),
                    with(
                        svc("wide"),
                        "egress",
                        json!([{"cidr": "10.0.0.0/8", "ports": [22, 80, 81]}])
                    ),
                ]),
            ),
        ),
        ("edge-auth-without-a-route", {
            // The verdict service has no route: the gateway reaches it all the same, and
            // nothing else changes.
            let mut d = stack(
                "edgeauth",
                json!([
                    with(with(svc("web"), "route", json!("/")), "edgeAuth", json!({})),
                    with(svc("verdicts"), "port", json!(9000)),
                    svc("other"),
                ]),
            );
            d["spec"]["gateway"]["edgeAuth"] = json!({"service": "verdicts", "path": "/verify"});
            d
        }),
        ("source-ranges", {
            let mut d = stack("ranges", json!([with(svc("a"), "route", json!("/"))]));
            d["spec"]["gateway"]["allowedSourceRanges"] =
                json!(["192.0.2.0/24", "198.51.100.0/24", "198.51.101.0/24"]);
            d
        }),
    ];
    for (label, doc) in &cases {
        prove(&bin, label, doc);
    }
    for seed in 1..=30 {
        prove(&bin, &format!("seed-{seed}"), &random_stack(seed));
    }
}

#[test]
fn the_proof_can_fail_when_a_policy_is_missing() {
    // Without any one of these policies the same comparison must fail: otherwise the proof
    // above would prove nothing. (Not `<stack>-default-deny`: every per-component policy also
    // lists both policy types, so that policy is a second lock, and dropping it alone leaves
    // the allowed set unchanged.)
    let Some(bin) = analyzer() else { return };
    let doc =
        read_yaml(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/opsconductor.yaml"));
    for dropped in [
        "prod-allow-dns",
        "prod-gateway",
        "prod-svc-users",
        "prod-svc-executions",
        "prod-backend-redis",
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let spec = write_world_edited(&doc, tmp.path(), &|np| {
            np["metadata"]["name"].as_str() != Some(dropped)
        });
        let actual = spec.relevant(&list(&bin, tmp.path()), Side::Both);
        assert_ne!(
            actual,
            spec.expected(),
            "dropping {dropped} went unnoticed by the comparison"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Semantic diff of two specs.
// ---------------------------------------------------------------------------------------------

/// Per (source, destination): the connections before and after.
type Changes = BTreeMap<(Peer, Peer), (BTreeSet<Conn>, BTreeSet<Conn>)>;

/// Splits one CSV line, honouring double quotes (connection lists contain commas).
fn csv_fields(line: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                chars.next();
                out.last_mut().unwrap().push('"');
            }
            '"' => quoted = !quoted,
            ',' if !quoted => out.push(String::new()),
            c => out.last_mut().unwrap().push(c),
        }
    }
    out
}

fn single_ports(conns: Vec<Conn>) -> BTreeSet<Conn> {
    canonical(conns.into_iter().map(|conn| Fact {
        src: Peer::Pod(String::new()),
        dst: Peer::Pod(String::new()),
        conn,
    }))
    .into_iter()
    .map(|f| f.conn)
    .collect()
}

/// What `netpolicy diff` reports between two worlds.
fn analyzer_diff(bin: &Path, dir1: &Path, dir2: &Path) -> Changes {
    let text = run_analyzer(
        bin,
        &[
            "diff",
            "--dir1",
            dir1.to_str().unwrap(),
            "--dir2",
            dir2.to_str().unwrap(),
            "-o",
            "csv",
        ],
    );
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header = lines.next().unwrap_or_default();
    assert!(
        header.starts_with("diff-type,source,destination,dir1,dir2"),
        "unexpected diff header: {header:?}"
    );
    let mut out = Changes::new();
    for line in lines {
        let f = csv_fields(line);
        assert!(f.len() >= 5, "unreadable diff line {line:?}");
        assert!(
            ["added", "removed", "changed"].contains(&f[0].as_str()),
            "unexpected diff type in {line:?} (a workload added or removed?)"
        );
        out.insert(
            (parse_peer(&f[1]), parse_peer(&f[2])),
            (
                single_ports(parse_conns(&f[3])),
                single_ports(parse_conns(&f[4])),
            ),
        );
    }
    out
}

/// The changes the two specs imply, from their expected sets alone.
fn expected_diff(before: &Spec, after: &Spec) -> Changes {
    let group = |facts: Facts| {
        let mut m: BTreeMap<(Peer, Peer), BTreeSet<Conn>> = BTreeMap::new();
        for f in facts {
            m.entry((f.src, f.dst)).or_default().insert(f.conn);
        }
        m
    };
    let (b, a) = (group(before.expected()), group(after.expected()));
    let pairs: BTreeSet<&(Peer, Peer)> = b.keys().chain(a.keys()).collect();
    pairs
        .into_iter()
        .filter_map(|k| {
            let x = b.get(k).cloned().unwrap_or_default();
            let y = a.get(k).cloned().unwrap_or_default();
            (x != y).then(|| (k.clone(), (x, y)))
        })
        .collect()
}

fn show_changes(c: &Changes) -> String {
    c.iter()
        .map(|((s, d), (x, y))| {
            let j = |v: &BTreeSet<Conn>| {
                v.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            };
            format!("  {s} => {d}: [{}] -> [{}]\n", j(x), j(y))
        })
        .collect()
}

/// Runs `netpolicy diff` between the worlds of `before` and `after`, checks it against the
/// specs, and returns it.
fn prove_diff(bin: &Path, label: &str, before: &Value, after: &Value) -> Changes {
    let tmp = tempfile::tempdir().unwrap();
    let (d1, d2) = (tmp.path().join("before"), tmp.path().join("after"));
    let s1 = write_world(before, &d1);
    let s2 = write_world(after, &d2);
    let actual = analyzer_diff(bin, &d1, &d2);
    let expected = expected_diff(&s1, &s2);
    assert_eq!(
        actual,
        expected,
        "{label}: the analyzer's diff differs from the spec change.\nanalyzer:\n{}spec:\n{}",
        show_changes(&actual),
        show_changes(&expected)
    );
    actual
}

fn set(conns: &[Conn]) -> BTreeSet<Conn> {
    conns.iter().cloned().collect()
}

#[test]
fn adding_a_call_and_removing_a_route_change_exactly_those_connections() {
    let Some(bin) = analyzer() else { return };
    let before =
        read_yaml(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/opsconductor.yaml"));
    let ns = "opsconductor";
    let index = |doc: &Value, name: &str| {
        doc["spec"]["services"]
            .as_array()
            .unwrap()
            .iter()
            .position(|s| s["name"] == name)
            .unwrap()
    };

    // users gains `calls: [targets]`: exactly users -> targets on 8000 appears.
    let mut after = before.clone();
    let users = index(&after, "users");
    after["spec"]["services"][users]["calls"] = json!(["targets"]);
    let changes = prove_diff(&bin, "add-call", &before, &after);
    assert_eq!(
        changes,
        Changes::from([(
            (pod(ns, "users"), pod(ns, "targets")),
            (set(&[]), set(&[tcp(8000)]))
        )]),
        "adding one calls edge must add exactly that connection"
    );

    // frontend loses its route: exactly gateway -> frontend on 8080 disappears.
    let mut after = before.clone();
    let frontend = index(&after, "frontend");
    after["spec"]["services"][frontend]
        .as_object_mut()
        .unwrap()
        .remove("route");
    let changes = prove_diff(&bin, "remove-route", &before, &after);
    assert_eq!(
        changes,
        Changes::from([(
            (pod(ns, "prod-gateway"), pod(ns, "frontend")),
            (set(&[tcp(8080)]), set(&[]))
        )]),
        "removing one route must remove exactly the gateway's connection to that service"
    );

    // Both at once, plus a service losing a backend: the three changes and nothing else.
    let mut after = before.clone();
    after["spec"]["services"][users]["calls"] = json!(["targets"]);
    after["spec"]["services"][frontend]
        .as_object_mut()
        .unwrap()
        .remove("route");
    after["spec"]["backends"][1]["allowFrom"] = json!(["executions"]);
    let changes = prove_diff(&bin, "three-changes", &before, &after);
    assert_eq!(changes.len(), 3, "{}", show_changes(&changes));
    assert_eq!(
        changes.get(&(pod(ns, "jobs"), pod(ns, "backend-redis"))),
        Some(&(set(&[tcp(6379)]), set(&[])))
    );
}

#[test]
fn switching_to_all_mode_adds_every_missing_service_pair() {
    let Some(bin) = analyzer() else { return };
    let before = stack(
        "mesh",
        json!([
            with(with(svc("a"), "route", json!("/")), "calls", json!(["b"])),
            with(svc("b"), "port", json!(9000)),
            with(svc("c"), "port", json!(9100)),
        ]),
    );
    let mut after = before.clone();
    after["spec"]["policy"] = json!({"serviceToService": "All"});
    let changes = prove_diff(&bin, "all-mode", &before, &after);
    // 3 services: 6 ordered pairs, of which a -> b was already allowed.
    assert_eq!(changes.len(), 5, "{}", show_changes(&changes));
    assert!(changes.values().all(|(x, y)| x.is_empty() && y.len() == 1));
}
