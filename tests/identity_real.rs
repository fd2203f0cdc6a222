//! Service identity (issue 18) against the real control plane and the real operator: a stack
//! with `spec.serviceIdentity` gets the projected, audience-bound token volume in every service
//! Deployment (and the API server admits the pods the deployment controller makes of it), and
//! a `<stack>-identity` ConfigMap with the API server's issuer and signing keys. Then tokens
//! are requested with the TokenRequest API, exactly what the kubelet does for the volume (no
//! kubelet runs here; `tests/node_e2e.rs` reads the real files on the node), and checked two
//! ways: TokenReview with the stack's audience, and offline against the ConfigMap's keys, as a
//! service does it (docs/gateway.md, "Service identity between services").

mod support;

use std::time::Duration;

use base64::Engine as _;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, ServiceAccount};
use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use opsconductor_operator::crd::OpsConductorStack;
use serde_json::{Value, json};
use support::identity::{claims, verify_offline};
use support::operator::{apply_stack, operator};
use support::{TestNamespace, client_as, eventually};

const WAIT: Duration = Duration::from_secs(30);

/// A stack named `shop` with the services `a` (calls `b`) and `b`, identity on with `expiration`
/// seconds. ACME with a CA this control plane cannot reach: the order fails in the background
/// and changes nothing here.
fn stack(namespace: &str, expiration: i64) -> OpsConductorStack {
    serde_json::from_value(json!({
        "apiVersion": "opsconductor.io/v1alpha1",
        "kind": "OpsConductorStack",
        "metadata": {"name": "shop", "namespace": namespace},
        "spec": {
            "gateway": {"hosts": ["shop.example.com"]},
            "tls": {"acme": {
                "directoryUrl": "https://acme-v02.api.letsencrypt.org/directory",
                "acceptTermsOfService": true
            }},
            "services": [
                {"name": "a", "image": "registry.example/a:1", "route": "/", "calls": ["b"]},
                {"name": "b", "image": "registry.example/b:1"}
            ],
            "serviceIdentity": {"enabled": true, "expirationSeconds": expiration}
        }
    }))
    .unwrap()
}

fn audience(namespace: &str) -> String {
    format!("opsconductor.io/{namespace}/shop")
}

/// A token for the ServiceAccount `sa` with `audience`, from the TokenRequest API.
async fn request_token(client: &Client, ns: &str, sa: &str, audience: &str) -> String {
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![audience.to_string()],
            expiration_seconds: Some(600),
            ..TokenRequestSpec::default()
        },
        ..TokenRequest::default()
    };
    let answer: TokenRequest = api
        .create_subresource("token", sa, &PostParams::default(), &request)
        .await
        .unwrap_or_else(|e| panic!("TokenRequest for {ns}/{sa}: {e}"));
    answer
        .status
        .expect("a TokenRequest answer has a status")
        .token
}

/// TokenReview of `token` for `audience`: the username when authenticated, else the error.
async fn review(client: &Client, token: &str, audience: &str) -> Result<String, String> {
    support::identity::token_review(client, token, audience)
        .await
        .map(|(user, _pod)| user)
}

/// The keys and issuer the operator wrote, once it has.
async fn identity_config(client: &Client, ns: &str) -> (String, Value, String) {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    eventually(
        "the operator to write the identity ConfigMap with the issuer and keys",
        WAIT,
        async || {
            let data = api.get_opt("shop-identity").await.ok()??.data?;
            let jwks: Value = serde_json::from_str(data.get("jwks.json")?).ok()?;
            Some((
                data.get("issuer")?.clone(),
                jwks,
                data.get("audience")?.clone(),
            ))
        },
    )
    .await
}

#[tokio::test]
async fn identity_tokens_are_bound_to_the_stack_and_verify_offline() {
    let Some(_op) = operator().await else { return };
    let Some(ns) = TestNamespace::new("identity").await else {
        return;
    };
    let other = TestNamespace::new("identity-other").await.unwrap();
    let client = ns.client.clone();
    apply_stack(&client, &stack(&ns.name, 900)).await;
    apply_stack(&client, &stack(&other.name, 600)).await;
    let aud = audience(&ns.name);
    let other_aud = audience(&other.name);
    assert_ne!(aud, other_aud, "two stacks named alike in two namespaces");

    // Every service Deployment mounts the projected token and nothing for the API server.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    for svc in ["a", "b"] {
        let d = eventually("the service Deployments", WAIT, async || {
            deployments.get_opt(svc).await.ok()?
        })
        .await;
        let pod = serde_json::to_value(&d).unwrap()["spec"]["template"]["spec"].clone();
        assert_eq!(pod["automountServiceAccountToken"], json!(false), "{svc}");
        assert_eq!(pod["serviceAccountName"], json!(svc));
        let volume = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "identity")
            .unwrap_or_else(|| panic!("{svc}: no identity volume in {pod}"))
            .clone();
        assert_eq!(
            volume["projected"]["sources"][0]["serviceAccountToken"],
            json!({"audience": aud, "expirationSeconds": 900, "path": "token"})
        );
        assert_eq!(
            volume["projected"]["sources"][1]["configMap"]["name"],
            json!("shop-identity")
        );
        let mount = pod["containers"][0]["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "identity")
            .unwrap()
            .clone();
        assert_eq!(mount["readOnly"], json!(true));
        let env = pod["containers"][0]["env"].to_string();
        assert!(env.contains("OPSC_IDENTITY_TOKEN_FILE"), "{env}");
        assert!(env.contains(&format!("\"{aud}\"")), "{env}");
    }
    // The deployment controller made pods of it, and the API server admitted them (it checks
    // audience and lifetime of projected tokens): with the identity volume, without the
    // default API token volume.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let pod = eventually("a pod of service a", WAIT, async || {
        pods.list(&ListParams::default().labels("app.kubernetes.io/name=a"))
            .await
            .ok()?
            .items
            .into_iter()
            .next()
    })
    .await;
    let volumes: Vec<String> = pod
        .spec
        .unwrap()
        .volumes
        .unwrap_or_default()
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert_eq!(volumes, ["tmp", "identity"]);

    // The ConfigMap holds exactly what the API server publishes.
    let (issuer, jwks, cm_audience) = identity_config(&client, &ns.name).await;
    assert_eq!(cm_audience, aud);
    let served = support::identity::served_jwks(&client).await;
    assert_eq!(jwks, served);
    let discovery: Value = serde_json::from_str(
        &client
            .request_text(
                http::Request::get("/.well-known/openid-configuration")
                    .body(Vec::new())
                    .unwrap(),
            )
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(discovery["issuer"], json!(issuer));
    // Keys added by someone else (to sign tokens of their own) are reverted by the operator.
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    config_maps
        .patch(
            "shop-identity",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"jwks.json": "{\"keys\":[{\"kid\":\"mine\"}]}"}})),
        )
        .await
        .unwrap();
    eventually(
        "the operator to write the API server's keys back",
        WAIT,
        async || {
            let data = config_maps.get("shop-identity").await.ok()?.data?;
            let now: Value = serde_json::from_str(data.get("jwks.json")?).ok()?;
            (now == served).then_some(())
        },
    )
    .await;

    // A token of service a for its stack's audience: TokenReview names a's ServiceAccount, and
    // offline verification agrees.
    let a_sub = format!("system:serviceaccount:{}:a", ns.name);
    let token = request_token(&client, &ns.name, "a", &aud).await;
    assert_eq!(review(&client, &token, &aud).await, Ok(a_sub.clone()));
    assert_eq!(
        verify_offline(&token, &jwks, &issuer, &aud),
        Ok(a_sub.clone())
    );
    let b_token = request_token(&client, &ns.name, "b", &aud).await;
    let b_sub = format!("system:serviceaccount:{}:b", ns.name);
    assert_eq!(review(&client, &b_token, &aud).await, Ok(b_sub.clone()));
    assert_eq!(verify_offline(&b_token, &jwks, &issuer, &aud), Ok(b_sub));

    // The same ServiceAccount's token for the other stack's audience fails for this one.
    let wrong_audience = request_token(&client, &ns.name, "a", &other_aud).await;
    let refused = review(&client, &wrong_audience, &aud).await;
    assert!(refused.is_err(), "{refused:?}");
    let offline = verify_offline(&wrong_audience, &jwks, &issuer, &aud);
    assert!(
        offline.as_ref().is_err_and(|e| e.contains("aud")),
        "{offline:?}"
    );
    // The other stack's service a, with its own stack's audience: valid there, not here.
    let other_sub = format!("system:serviceaccount:{}:a", other.name);
    let foreign = request_token(&client, &other.name, "a", &other_aud).await;
    assert_eq!(review(&client, &foreign, &other_aud).await, Ok(other_sub));
    let refused = review(&client, &foreign, &aud).await;
    assert!(refused.is_err(), "{refused:?}");
    assert!(verify_offline(&foreign, &jwks, &issuer, &aud).is_err());
    // A changed claim breaks the signature.
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let parts: Vec<&str> = token.split('.').collect();
    let mut forged_claims = claims(&token);
    assert_eq!(forged_claims["sub"], json!(a_sub));
    forged_claims["sub"] = json!(format!("system:serviceaccount:{}:b", ns.name));
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        b64.encode(serde_json::to_vec(&forged_claims).unwrap()),
        parts[2]
    );
    assert_eq!(
        verify_offline(&forged, &jwks, &issuer, &aud),
        Err("bad signature".to_string())
    );
    assert!(review(&client, &forged, &aud).await.is_err());

    // The identity token is no credential for the API server: its audience is not the API's.
    let mut config = ns.control_plane.config().await;
    config.auth_info = kube::config::AuthInfo {
        token: Some(token.clone().into()),
        ..kube::config::AuthInfo::default()
    };
    let as_token = Client::try_from(config).unwrap();
    let err = as_token
        .apiserver_version()
        .await
        .expect_err("the API server must refuse a token for another audience");
    assert!(err.to_string().contains("401"), "{err}");
    eprintln!("identity: the API server refuses the identity token: {err}");
}

/// The operator reads the issuer and keys with the permission every service account has by
/// default (ClusterRoleBinding `system:service-account-issuer-discovery` to the group
/// `system:serviceaccounts`), so the chart needs no rule for it; a user outside that group is
/// refused.
#[tokio::test]
async fn every_service_account_may_read_the_signing_keys() {
    let Some(admin) = support::admin_client().await else {
        return;
    };
    let binding: ClusterRoleBinding = Api::all(admin.clone())
        .get("system:service-account-issuer-discovery")
        .await
        .unwrap();
    assert_eq!(
        binding.role_ref.name,
        "system:service-account-issuer-discovery"
    );
    assert!(
        binding
            .subjects
            .unwrap_or_default()
            .iter()
            .any(|s| s.kind == "Group" && s.name == "system:serviceaccounts"),
        "the default binding names the group system:serviceaccounts"
    );
    let get = |path: &str| http::Request::get(path).body(Vec::new()).unwrap();
    let sa = client_as(
        "system:serviceaccount:opsc-identity-nowhere:reader",
        &["system:serviceaccounts", "system:authenticated"],
    )
    .await
    .unwrap();
    for path in ["/openid/v1/jwks", "/.well-known/openid-configuration"] {
        sa.request_text(get(path))
            .await
            .unwrap_or_else(|e| panic!("a service account reads {path}: {e}"));
    }
    let user = client_as("someone", &["system:authenticated"])
        .await
        .unwrap();
    let refused = user.request_text(get("/openid/v1/jwks")).await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.to_string().contains("403")),
        "{refused:?}"
    );
}

/// The API server refuses a lifetime out of range at admission (the CRD's schema), naming the
/// field, so such a stack is never stored.
#[tokio::test]
async fn the_api_server_refuses_a_lifetime_out_of_range() {
    let Some(ns) = TestNamespace::new("identity-range").await else {
        return;
    };
    support::operator::install_crd(ns.control_plane).await;
    let api: Api<OpsConductorStack> = Api::namespaced(ns.client.clone(), &ns.name);
    for (bad, bound) in [(599, "600"), (86_401, "86400")] {
        let refused = eventually("the CRD to be served", WAIT, async || {
            match api
                .create(&PostParams::default(), &stack(&ns.name, bad))
                .await
            {
                Err(kube::Error::Api(e)) if e.code == 422 => Some(e.message),
                Err(_) => None,
                Ok(_) => panic!("a lifetime of {bad} s was stored"),
            }
        })
        .await;
        assert!(
            refused.contains("spec.serviceIdentity.expirationSeconds") && refused.contains(bound),
            "{refused}"
        );
        eprintln!("identity: the API server says: {refused}");
    }
}

/// A ConfigMap of someone else under the identity ConfigMap's name is never written, and no
/// service runs with it (its keys would be the ones the services trust): the services'
/// Deployments are held back, the stack says `NameConflict`; once the foreign ConfigMap is
/// gone, the operator writes its own and the services are created.
#[tokio::test]
async fn someone_elses_identity_config_map_holds_the_services_back() {
    let Some(_op) = operator().await else { return };
    let Some(ns) = TestNamespace::new("identity-foreign").await else {
        return;
    };
    let client = ns.client.clone();
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    let foreign: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "shop-identity"},
        "data": {"jwks.json": "{\"keys\":[{\"kid\":\"mine\"}]}", "issuer": "https://me"}
    }))
    .unwrap();
    config_maps
        .create(&PostParams::default(), &foreign)
        .await
        .unwrap();
    apply_stack(&client, &stack(&ns.name, 900)).await;
    let stacks: Api<OpsConductorStack> = Api::namespaced(client.clone(), &ns.name);
    let message = eventually("Ready=False/NameConflict", WAIT, async || {
        let s = stacks.get("shop").await.ok()?;
        let status = s.status?;
        (status.observed_generation == s.metadata.generation).then_some(())?;
        let ready = status.conditions.into_iter().find(|c| c.type_ == "Ready")?;
        (ready.reason == "NameConflict").then_some(ready.message)
    })
    .await;
    assert!(message.contains("ConfigMap/shop-identity"), "{message}");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    for svc in ["a", "b"] {
        assert!(
            deployments.get_opt(svc).await.unwrap().is_none(),
            "service {svc} must not run with someone else's keys"
        );
    }
    let untouched = config_maps.get("shop-identity").await.unwrap();
    assert_eq!(
        untouched.data, foreign.data,
        "the foreign ConfigMap is never written"
    );

    config_maps
        .delete("shop-identity", &Default::default())
        .await
        .unwrap();
    let (_, jwks, _) = identity_config(&client, &ns.name).await;
    assert_ne!(jwks["keys"][0]["kid"], json!("mine"));
    for svc in ["a", "b"] {
        eventually(
            "the held service Deployments to be created",
            WAIT,
            async || deployments.get_opt(svc).await.ok()?,
        )
        .await;
    }
}

/// Switched off, identity leaves nothing behind: the ConfigMap is deleted and the services'
/// pods lose the volume and the variables.
#[tokio::test]
async fn switching_identity_off_removes_the_volume_and_the_config_map() {
    let Some(_op) = operator().await else { return };
    let Some(ns) = TestNamespace::new("identity-off").await else {
        return;
    };
    let client = ns.client.clone();
    apply_stack(&client, &stack(&ns.name, 900)).await;
    identity_config(&client, &ns.name).await;
    let mut off = stack(&ns.name, 900);
    off.spec.service_identity.as_mut().unwrap().enabled = false;
    apply_stack(&client, &off).await;
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    eventually(
        "the identity ConfigMap to be deleted and the volume gone",
        WAIT,
        async || {
            config_maps
                .get_opt("shop-identity")
                .await
                .ok()?
                .is_none()
                .then_some(())?;
            for svc in ["a", "b"] {
                let d = serde_json::to_value(deployments.get(svc).await.ok()?).ok()?;
                let pod = &d["spec"]["template"]["spec"];
                let text = pod.to_string();
                (!text.contains("serviceAccountToken") && !text.contains("OPSC_IDENTITY"))
                    .then_some(())?;
            }
            Some(())
        },
    )
    .await;
}
