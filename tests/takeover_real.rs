//! No silent takeover (issue 14, item 1), on the real control plane with the real operator:
//! objects that exist with a name the stack wants, but were not created by the stack, are
//! never written, patched or deleted. The stack reports them (`Ready=False/NameConflict` and a
//! `NameConflict` Warning Event naming each one), goes on with everything that is safe, and
//! takes an object over only when the object itself carries `opsconductor.io/adopt: <stack>`.
//! Deleting the stack leaves them alone too (they never got its owner reference).

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Event, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, Resource, ResourceExt};
use opsconductor_operator::crd::OpsConductorStack;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use support::operator::{OPERATOR_USER, apply_stack, operator, owned_objects};
use support::{AuditLog, TestNamespace, eventually};

const WAIT: Duration = Duration::from_secs(30);

fn stack(ns: &str, yaml: &str) -> OpsConductorStack {
    let mut s: OpsConductorStack = serde_yaml::from_str(yaml).unwrap();
    s.metadata.namespace = Some(ns.to_string());
    s
}

/// Creates `object` as someone else (the test's admin) and returns its resourceVersion.
async fn create<K>(ns: &TestNamespace, object: Value) -> String
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    let object: K = serde_json::from_value(object).unwrap();
    let created = ns
        .api::<K>()
        .create(&PostParams::default(), &object)
        .await
        .unwrap_or_else(|e| panic!("creating {} {}: {e}", K::kind(&()), object.name_any()));
    created.resource_version().unwrap()
}

/// What someone else's object holds, as JSON without what others than its writer change
/// (resourceVersion, managedFields, status: controllers update a Deployment's or a
/// PodDisruptionBudget's status on their own; the Deployment controller's revision annotation,
/// which it adds a moment after the Deployment is created). Any write by the operator shows
/// here.
async fn content<K>(ns: &TestNamespace, name: &str) -> Option<String>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    let object = ns.api::<K>().get_opt(name).await.unwrap()?;
    let mut v = serde_json::to_value(&object).unwrap();
    let meta = v["metadata"].as_object_mut().unwrap();
    meta.remove("resourceVersion");
    meta.remove("managedFields");
    if let Some(annotations) = meta.get_mut("annotations").and_then(|a| a.as_object_mut()) {
        annotations.remove("deployment.kubernetes.io/revision");
        if annotations.is_empty() {
            meta.remove("annotations");
        }
    }
    v.as_object_mut().unwrap().remove("status");
    Some(v.to_string())
}

/// Every foreign object as "Kind/name" with its [`content`] now.
async fn versions(ns: &TestNamespace, names: &[(&str, &str)]) -> BTreeMap<String, Option<String>> {
    let mut out = BTreeMap::new();
    for (kind, name) in names {
        let rv = match *kind {
            "Service" => content::<Service>(ns, name).await,
            "ServiceAccount" => content::<ServiceAccount>(ns, name).await,
            "Deployment" => content::<Deployment>(ns, name).await,
            "ConfigMap" => content::<ConfigMap>(ns, name).await,
            "NetworkPolicy" => content::<NetworkPolicy>(ns, name).await,
            "PodDisruptionBudget" => content::<PodDisruptionBudget>(ns, name).await,
            "Secret" => content::<Secret>(ns, name).await,
            other => panic!("unknown kind {other}"),
        };
        out.insert(format!("{kind}/{name}"), rv);
    }
    out
}

/// The stack's Ready condition once its reason is `reason` (and its status describes the
/// current generation).
async fn ready_with_reason(
    client: &Client,
    ns: &str,
    name: &str,
    reason: &str,
) -> (String, String) {
    let api: Api<OpsConductorStack> = Api::namespaced(client.clone(), ns);
    eventually(&format!("{name} to report Ready={reason}"), WAIT, || {
        let api = api.clone();
        async move {
            let s = api.get(name).await.ok()?;
            let status = s.status.as_ref()?;
            if status.observed_generation != s.metadata.generation {
                return None;
            }
            let ready = status.conditions.iter().find(|c| c.type_ == "Ready")?;
            (ready.reason == reason).then(|| (ready.status.clone(), ready.message.clone()))
        }
    })
    .await
}

async fn converged(client: &Client, ns: &str, name: &str) {
    let api: Api<OpsConductorStack> = Api::namespaced(client.clone(), ns);
    eventually(
        "the stack's status to catch up with its generation",
        WAIT,
        || {
            let api = api.clone();
            async move {
                let s = api.get(name).await.ok()?;
                let observed = s.status.as_ref()?.observed_generation;
                (observed.is_some() && observed == s.metadata.generation).then_some(())
            }
        },
    )
    .await;
}

async fn events(client: &Client, ns: &str, reason: &str) -> Vec<Event> {
    Api::<Event>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .collect()
}

/// The operator's write requests (failed ones included) to the objects `names` ("Kind/name").
fn operator_writes(
    audit: &AuditLog,
    mark: &support::AuditMark,
    ns: &str,
    names: &[&str],
) -> Vec<String> {
    let resource = |kind: &str| match kind {
        "Service" => "services",
        "ServiceAccount" => "serviceaccounts",
        "Deployment" => "deployments",
        "ConfigMap" => "configmaps",
        "PodDisruptionBudget" => "poddisruptionbudgets",
        "Secret" => "secrets",
        "NetworkPolicy" => "networkpolicies",
        other => panic!("unknown kind {other}"),
    };
    let wanted: Vec<(String, String)> = names
        .iter()
        .map(|n| {
            let (kind, name) = n.split_once('/').unwrap();
            (resource(kind).to_string(), name.to_string())
        })
        .collect();
    audit
        .writes_since(mark, |e| {
            e.user == OPERATOR_USER
                && e.namespace == ns
                && wanted.contains(&(e.resource.clone(), e.name.clone()))
        })
        .iter()
        .map(|e| format!("{} {}/{} ({})", e.verb, e.resource, e.name, e.code))
        .collect()
}

fn controlled_by(
    meta_refs: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference],
    uid: &str,
) -> bool {
    meta_refs
        .iter()
        .any(|r| r.uid == uid && r.controller == Some(true))
}

const SHOP: &str = r#"
apiVersion: opsconductor.io/v1alpha1
kind: OpsConductorStack
metadata: {name: shop}
spec:
  gateway: {hosts: [shop.example.test]}
  tls:
    acme: {directoryUrl: "https://acme.invalid/directory", acceptTermsOfService: true}
  services:
    - {name: web, image: example/web:1, route: /}
    - {name: db, image: example/db:1, port: 5432}
    - {name: builder, image: example/builder:1}
    - {name: worker, image: example/worker:1}
"#;

#[tokio::test]
async fn existing_objects_are_reported_never_taken_over_and_adopted_only_on_request() {
    let Some(op) = operator().await else { return };
    let Some(ns) = TestNamespace::new("takeover").await else {
        return;
    };
    let n = ns.name.as_str();
    // Someone else's objects, with names the stack `shop` will want.
    create::<Service>(
        &ns,
        json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "db", "namespace": n},
        "spec": {"selector": {"app": "real-db"}, "ports": [{"port": 5432}]}}),
    )
    .await;
    create::<ServiceAccount>(
        &ns,
        json!({"apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": "builder", "namespace": n, "annotations": {"team": "ci"}}}),
    )
    .await;
    create::<Deployment>(
        &ns,
        json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "worker", "namespace": n},
        "spec": {"selector": {"matchLabels": {"app": "real-worker"}},
            "template": {"metadata": {"labels": {"app": "real-worker"}},
                "spec": {"containers": [{"name": "w", "image": "example/real-worker:1"}]}}}}),
    )
    .await;
    create::<ConfigMap>(
        &ns,
        json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "shop-gateway-config", "namespace": n},
        "data": {"nginx.conf": "# someone else's configuration\n"}}),
    )
    .await;
    create::<PodDisruptionBudget>(
        &ns,
        json!({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": {"name": "shop-gateway", "namespace": n},
        "spec": {"selector": {"matchLabels": {"app": "other"}}, "minAvailable": 1}}),
    )
    .await;
    create::<Secret>(&ns, json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "shop-tls", "namespace": n},
        "type": "kubernetes.io/tls", "stringData": {"tls.crt": "someone else's", "tls.key": "someone else's"}}))
    .await;
    create::<Secret>(
        &ns,
        json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "shop-acme-account", "namespace": n},
        "type": "Opaque", "stringData": {"credentials.json": "{}"}}),
    )
    .await;
    // Carries the stack's labels but no owner reference: labels can be copied, so this is
    // not the stack's either, and pruning must leave it alone.
    create::<ConfigMap>(&ns, json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "shop-stale", "namespace": n, "labels": {
            "app.kubernetes.io/managed-by": "opsconductor-operator", "opsconductor.io/stack": "shop"}},
        "data": {"k": "v"}}))
    .await;
    let foreign = [
        ("Service", "db"),
        ("ServiceAccount", "builder"),
        ("Deployment", "worker"),
        ("ConfigMap", "shop-gateway-config"),
        ("PodDisruptionBudget", "shop-gateway"),
        ("Secret", "shop-tls"),
        ("Secret", "shop-acme-account"),
        ("ConfigMap", "shop-stale"),
        ("ServiceAccount", "default"),
    ];
    let before = versions(&ns, &foreign).await;
    assert!(before.values().all(Option::is_some), "{before:?}");
    let audit = AuditLog::of(ns.control_plane);
    let start = audit.mark();

    let applied = apply_stack(&ns.client, &stack(n, SHOP)).await;
    let uid = applied.uid().unwrap();
    // Until the first pass has applied everything it wanted (the status is written last), or
    // one of those objects was written.
    let stacks: Api<OpsConductorStack> = Api::namespaced(ns.client.clone(), n);
    let seen = eventually(
        "the first pass, or a write to someone else's object",
        WAIT,
        async || {
            let now = versions(&ns, &foreign).await;
            let s = stacks.get("shop").await.ok()?;
            let done = s.status.as_ref().is_some_and(|st| {
                st.observed_generation.is_some() && st.observed_generation == s.metadata.generation
            });
            (done || now != before).then_some(now)
        },
    )
    .await;
    assert_eq!(
        seen, before,
        "objects the stack did not create were written"
    );
    let (status, message) = ready_with_reason(&ns.client, n, "shop", "NameConflict").await;
    assert_eq!(status, "False");
    for (kind, name) in &foreign[..7] {
        assert!(
            message.contains(&format!("{kind}/{name}")),
            "{kind}/{name} missing from the Ready message: {message}"
        );
    }
    // One Warning Event per object, naming it.
    let warned = eventually("a NameConflict Event per object", WAIT, async || {
        let all = events(&ns.client, n, "NameConflict").await;
        let ok = foreign[..7].iter().all(|(kind, name)| {
            all.iter().any(|e| {
                e.type_.as_deref() == Some("Warning")
                    && e.message
                        .as_deref()
                        .unwrap_or("")
                        .contains(&format!("{kind}/{name}"))
            })
        });
        ok.then_some(all)
    })
    .await;
    assert!(warned.len() >= 7, "{warned:?}");
    let foreign_service = ns.api::<Service>().get("db").await.unwrap();
    assert_eq!(
        foreign_service.spec.unwrap().selector.unwrap(),
        BTreeMap::from([("app".to_string(), "real-db".to_string())]),
        "the db Service's selector must stay its owner's"
    );

    // The rest of the stack goes on: what has no conflict exists and is the stack's ...
    let owned = owned_objects(&ns.client, n, &uid).await;
    for wanted in [
        "Deployment/web",
        "Service/web",
        "ServiceAccount/web",
        "Deployment/db",
        "ServiceAccount/db",
        "Service/builder",
        "Service/worker",
        "ServiceAccount/worker",
        "Service/shop-gateway",
        "ServiceAccount/shop-gateway",
        "NetworkPolicy/shop-default-deny",
        "NetworkPolicy/shop-gateway",
    ] {
        assert!(owned.contains(wanted), "{wanted} missing: {owned:?}");
    }
    // ... but no pod would run with someone else's identity or configuration: the service
    // whose ServiceAccount is not the stack's, and the gateway whose ConfigMap and TLS Secret
    // are not, are held back.
    let deployments: Api<Deployment> = ns.api();
    assert!(deployments.get_opt("builder").await.unwrap().is_none());
    assert!(deployments.get_opt("shop-gateway").await.unwrap().is_none());

    // Conflicts are steady state like any other: a reconcile with nothing new writes nothing.
    let reconciles = op.metric("opsconductor_reconciles_total{result=\"ok\"}");
    let mark = audit.mark();
    Api::<OpsConductorStack>::namespaced(ns.client.clone(), n)
        .patch(
            "shop",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"touch": "1"}}})),
        )
        .await
        .unwrap();
    eventually(
        "the operator to reconcile the touched stack",
        WAIT,
        async || {
            (op.metric("opsconductor_reconciles_total{result=\"ok\"}") > reconciles).then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let writes: Vec<String> = audit
        .writes_since(&mark, |e| e.user == OPERATOR_USER && e.namespace == n)
        .iter()
        .map(|e| format!("{} {}/{}", e.verb, e.resource, e.name))
        .collect();
    assert!(
        writes.is_empty(),
        "an unchanged stack in conflict wrote: {writes:#?}"
    );

    // A name a stack service can never take: refused with its field path, nothing written.
    let mut with_default = stack(n, SHOP);
    with_default
        .spec
        .services
        .push(serde_json::from_value(json!({"name": "default", "image": "example/x:1"})).unwrap());
    apply_stack(&ns.client, &with_default).await;
    let (_, message) = ready_with_reason(&ns.client, n, "shop", "InvalidSpec").await;
    assert!(message.contains("spec.services[4].name"), "{message}");
    assert_eq!(versions(&ns, &foreign).await, before);
    apply_stack(&ns.client, &stack(n, SHOP)).await;
    ready_with_reason(&ns.client, n, "shop", "NameConflict").await;

    // Adoption is the object owner's decision, written on the object.
    ns.api::<ServiceAccount>()
        .patch(
            "builder",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"opsconductor.io/adopt": "shop"}}})),
        )
        .await
        .unwrap();
    eventually(
        "the adopted ServiceAccount to be the stack's",
        WAIT,
        async || {
            let sa = ns.api::<ServiceAccount>().get("builder").await.ok()?;
            controlled_by(sa.owner_references(), &uid).then_some(())
        },
    )
    .await;
    eventually(
        "the held Deployment builder to be created",
        WAIT,
        async || {
            let d = deployments.get_opt("builder").await.ok()??;
            controlled_by(d.owner_references(), &uid).then_some(())
        },
    )
    .await;
    let (_, message) = eventually(
        "the adopted object to leave the Ready message",
        WAIT,
        async || {
            let (status, message) = ready_with_reason(&ns.client, n, "shop", "NameConflict").await;
            (!message.contains("ServiceAccount/builder")).then_some((status, message))
        },
    )
    .await;
    assert!(message.contains("Service/db"), "{message}");
    // An adoption annotation naming another stack hands nothing over.
    ns.api::<Service>()
        .patch(
            "db",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"opsconductor.io/adopt": "other"}}})),
        )
        .await
        .unwrap();
    let db_content = content::<Service>(&ns, "db").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(content::<Service>(&ns, "db").await, db_content);

    // Deleting the stack garbage-collects what it owns (the adopted ServiceAccount included),
    // and nothing else.
    Api::<OpsConductorStack>::namespaced(ns.client.clone(), n)
        .delete("shop", &DeleteParams::background())
        .await
        .unwrap();
    eventually(
        "every owned object to be garbage-collected",
        Duration::from_secs(60),
        async || {
            owned_objects(&ns.client, n, &uid)
                .await
                .is_empty()
                .then_some(())
        },
    )
    .await;
    // Not one write request, not even a failed one, went to someone else's object (the
    // ServiceAccount builder was handed over on purpose).
    let never_written: Vec<String> = foreign
        .iter()
        .filter(|(kind, name)| (*kind, *name) != ("ServiceAccount", "builder"))
        .map(|(kind, name)| format!("{kind}/{name}"))
        .collect();
    let names: Vec<&str> = never_written.iter().map(String::as_str).collect();
    let writes = operator_writes(&audit, &start, n, &names);
    assert!(
        writes.is_empty(),
        "the operator wrote to objects it does not own: {writes:#?}"
    );
    let mut after = versions(&ns, &foreign).await;
    let mut expected = before.clone();
    // Changed by the test itself (the adoption annotations), then adopted and collected.
    expected.remove("ServiceAccount/builder");
    after.remove("ServiceAccount/builder");
    expected.insert("Service/db".into(), db_content);
    assert_eq!(
        after, expected,
        "the stack's deletion touched objects it never owned"
    );
}

const EDGE: &str = r#"
apiVersion: opsconductor.io/v1alpha1
kind: OpsConductorStack
metadata: {name: edge}
spec:
  gateway: {hosts: [edge.example.test]}
  tls: {secretName: edge-cert}
  services:
    - {name: web, image: example/web:1, route: /}
"#;

#[tokio::test]
async fn a_foreign_network_policy_is_reported_and_holds_every_workload() {
    let Some(_op) = operator().await else { return };
    let Some(ns) = TestNamespace::new("takeover-np").await else {
        return;
    };
    let n = ns.name.as_str();
    // Someone else's policy with the name of the stack's default-deny, allowing everything.
    create::<NetworkPolicy>(
        &ns,
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "edge-default-deny", "namespace": n},
        "spec": {"podSelector": {}, "ingress": [{}], "policyTypes": ["Ingress"]}}),
    )
    .await;
    let foreign = [("NetworkPolicy", "edge-default-deny")];
    let before = versions(&ns, &foreign).await;
    let applied = apply_stack(&ns.client, &stack(n, EDGE)).await;
    let uid = applied.uid().unwrap();
    converged(&ns.client, n, "edge").await;
    assert_eq!(
        versions(&ns, &foreign).await,
        before,
        "someone else's NetworkPolicy was written"
    );
    let (_, message) = ready_with_reason(&ns.client, n, "edge", "NameConflict").await;
    assert!(
        message.contains("NetworkPolicy/edge-default-deny"),
        "{message}"
    );
    let owned = owned_objects(&ns.client, n, &uid).await;
    assert!(owned.contains("NetworkPolicy/edge-allow-dns"), "{owned:?}");
    assert!(owned.contains("Service/web"), "{owned:?}");
    // Without the whole policy in place, no pod of the stack may start.
    let deployments = ns
        .api::<Deployment>()
        .list(&ListParams::default())
        .await
        .unwrap();
    assert!(
        deployments.items.is_empty(),
        "workloads started without the stack's default-deny: {:?}",
        deployments
            .items
            .iter()
            .map(|d| d.name_any())
            .collect::<Vec<_>>()
    );
}

/// Issue 14, item 5: the Secrets the operator keeps for stacks (every stack's ACME account
/// key, the other stacks' gateway certificate and key) cannot be handed to a stack's pods or
/// used as its own certificate: the stack is refused with the field path, nothing is applied.
#[tokio::test]
async fn a_stack_cannot_reference_the_secrets_kept_for_stacks() {
    let Some(_op) = operator().await else { return };
    let Some(ns) = TestNamespace::new("secret-refs").await else {
        return;
    };
    let n = ns.name.as_str();
    apply_stack(&ns.client, &stack(n, EDGE)).await;
    let reader = r#"
apiVersion: opsconductor.io/v1alpha1
kind: OpsConductorStack
metadata: {name: reader}
spec:
  gateway: {hosts: [reader.example.test]}
  tls: {secretName: edge-tls}
  services:
    - name: web
      image: example/web:1
      route: /
      env:
        - name: ACCOUNT
          valueFrom: {secretKeyRef: {name: edge-acme-account, key: credentials.json}}
        - name: OWN_ACCOUNT
          valueFrom: {secretKeyRef: {name: reader-acme-account, key: credentials.json}}
        - name: FINE
          valueFrom: {secretKeyRef: {name: app-db, key: url}}
"#;
    apply_stack(&ns.client, &stack(n, reader)).await;
    let (_, message) = ready_with_reason(&ns.client, n, "reader", "InvalidSpec").await;
    for path in [
        "spec.services[0].env[0].valueFrom.secretKeyRef.name: Secret \"edge-acme-account\" is the ACME account key of stack \"edge\"",
        "spec.services[0].env[1].valueFrom.secretKeyRef.name: Secret \"reader-acme-account\"",
        "spec.tls.secretName: Secret \"edge-tls\" holds the gateway certificate and key of stack \"edge\"",
    ] {
        assert!(message.contains(path), "{path} missing from: {message}");
    }
    assert!(!message.contains("app-db"), "{message}");
    // Nothing of the refused stack runs. (A Deployment `web` may exist: stack `edge` has a
    // service of that name too, so look for the refused stack's own objects.)
    let readers = ns
        .api::<Deployment>()
        .list(&ListParams::default().labels("opsconductor.io/stack=reader"))
        .await
        .unwrap();
    assert!(
        readers.items.is_empty(),
        "the refused stack created {:?}",
        readers
            .items
            .iter()
            .map(|d| d.metadata.name.clone())
            .collect::<Vec<_>>()
    );
}

/// Issue 14, item 3 (the audit's part): a pod that copies the stack's label, and so joins its
/// Services and NetworkPolicies, is reported unless it comes from one of the stack's own
/// Deployments (through their ReplicaSets, here the real controllers'); the stack's own pods
/// are not.
#[tokio::test]
async fn a_pod_that_copies_the_stacks_label_is_reported() {
    use k8s_openapi::api::core::v1::Pod;
    let Some(_op) = operator().await else { return };
    let Some(ns) = TestNamespace::new("joiner").await else {
        return;
    };
    let n = ns.name.as_str();
    apply_stack(&ns.client, &stack(n, EDGE)).await;
    // The real deployment and ReplicaSet controllers create the stack's own pods.
    eventually("the stack's own pods", WAIT, async || {
        let pods = ns
            .api::<Pod>()
            .list(&ListParams::default().labels("opsconductor.io/stack=edge"))
            .await
            .ok()?;
        (pods.items.len() >= 2).then_some(())
    })
    .await;
    create::<Pod>(
        &ns,
        json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "joiner", "namespace": n, "labels": {
            "opsconductor.io/stack": "edge", "app.kubernetes.io/component": "gateway"}},
        "spec": {"containers": [{"name": "c", "image": "example/joiner:1"}]}}),
    )
    .await;
    let api: Api<OpsConductorStack> = Api::namespaced(ns.client.clone(), n);
    let violations = eventually("the joining pod to be reported", WAIT, async || {
        let s = api.get("edge").await.ok()?;
        let v = s.status?.violations;
        v.iter()
            .any(|v| v.kind == "Pod" && v.name == "joiner")
            .then_some(v)
    })
    .await;
    let joiner = violations.iter().find(|v| v.name == "joiner").unwrap();
    assert!(
        joiner
            .reason
            .contains("not created by the stack's Deployments"),
        "{joiner:?}"
    );
    let own: Vec<_> = violations
        .iter()
        .filter(|v| v.kind == "Pod" && v.name != "joiner")
        .collect();
    assert!(
        own.is_empty(),
        "the stack's own pods were reported: {own:?}"
    );
}
