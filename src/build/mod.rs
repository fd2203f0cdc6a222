//! Desired state: a validated [`Stack`] in, one [`Bundle`] of typed objects out.
//!
//! Pure functions only: no client, no clock, no randomness. The same stack always gives the
//! same objects, byte for byte, which is what makes `render` diffable and lets the controller
//! skip writes when nothing changed.

pub mod gateway;
pub mod netpol;
pub mod nginx;
mod service;

pub use service::{
    IDENTITY_AUDIENCE_KEY, IDENTITY_DIR, IDENTITY_ENV, IDENTITY_ISSUER_KEY, IDENTITY_JWKS_KEY,
    IDENTITY_TOKEN_FILE,
};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, HTTPGetAction, Probe, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;
use serde::Serialize;

use crate::crd::OpsConductorStack;
use crate::model::Stack;
use crate::names::{self, Component};

/// The cluster DNS domain when none is given (`--cluster-domain`).
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";

/// Inputs to the builders that do not come from the stack's spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildOptions {
    /// The cluster's DNS domain; the gateway reaches services at
    /// `<service>.<namespace>.svc.<cluster_domain>`.
    pub cluster_domain: String,
    /// The ACME account key's JWK thumbprint (RFC 7638), once the account exists. The
    /// gateway answers HTTP-01 challenges with `<token>.<thumbprint>` (stateless mode).
    pub acme_thumbprint: Option<String>,
    /// How the gateway finds the routed services (see [`Upstreams`]).
    pub upstreams: Upstreams,
    /// The namespace the operator runs in, when known (in-cluster). With
    /// `allowedSourceRanges`, the gateway's NetworkPolicy then also admits the operator's pods
    /// on 8080 for the ACME self-check.
    pub operator_namespace: Option<String>,
    /// The cluster's own address ranges (pods, Services, nodes), from the operator's
    /// `--cluster-cidrs`. A service's egress CIDR never reaches into them: they are cut out of
    /// a wider CIDR (`except`), and validation refuses a CIDR inside one
    /// ([`crate::validate::egress_cluster_problems`]).
    pub cluster_cidrs: Vec<ipnet::IpNet>,
    /// The image of the gateway's `requests` metrics sidecar (`spec.gateway.metrics`): the
    /// operator's own, from `--gateway-requests-image` (the chart passes the operator's image).
    pub requests_exporter_image: String,
    /// The API server's service account token issuer and signing keys, once the operator has
    /// read them (`run`; the offline `render` has none). With `spec.serviceIdentity`, they go
    /// into the stack's identity ConfigMap, for the services to verify tokens offline.
    pub identity_keys: Option<IdentityKeys>,
}

/// What a service needs to verify a service identity token without asking the API server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityKeys {
    /// The `iss` of every service account token (`issuer` of the API server's
    /// `/.well-known/openid-configuration`).
    pub issuer: String,
    /// The public keys that sign the tokens: the API server's `/openid/v1/jwks`, as served.
    pub jwks: String,
}

impl Default for BuildOptions {
    fn default() -> Self {
        Self {
            cluster_domain: DEFAULT_CLUSTER_DOMAIN.into(),
            acme_thumbprint: None,
            upstreams: Upstreams::Names,
            operator_namespace: None,
            cluster_cidrs: Vec::new(),
            identity_keys: None,
            requests_exporter_image: crate::crd::DEFAULT_OPERATOR_IMAGE.into(),
        }
    }
}

/// How the gateway reaches the routed services. Either way each service is an `upstream` block
/// with kept-alive connections; nothing is resolved per request. See `docs/gateway.md`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Upstreams {
    /// `server <service>.<namespace>.svc.<cluster domain>:<port>`, resolved by nginx once when
    /// it starts or reloads (a name that does not resolve then stops it). What the offline
    /// `render` writes: it has no cluster to ask for addresses.
    Names,
    /// The ClusterIP of each routed service's Service, by service name, as the operator's
    /// Service cache shows it (`run`). A routed service missing here (its Service not created
    /// yet, or not the stack's) answers 503 on its route until the operator writes the
    /// configuration again with its address; nginx never waits for, or fails on, a name.
    ClusterIps(std::collections::BTreeMap<String, std::net::IpAddr>),
}

/// Every object the operator wants to exist for one stack.
///
/// Field order is apply order: identities and configuration first, so that nothing starts
/// without them; NetworkPolicies before Deployments, so that no pod ever runs unprotected;
/// Services and disruption budgets last.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Bundle {
    pub service_accounts: Vec<ServiceAccount>,
    pub config_maps: Vec<ConfigMap>,
    pub network_policies: Vec<NetworkPolicy>,
    pub deployments: Vec<Deployment>,
    pub services: Vec<Service>,
    pub pod_disruption_budgets: Vec<PodDisruptionBudget>,
}

impl Bundle {
    /// All objects as JSON values (with apiVersion and kind), in apply order.
    pub fn to_values(&self) -> Vec<serde_json::Value> {
        // Destructured so that a new kind in the bundle cannot be forgotten here.
        let Bundle {
            service_accounts,
            config_maps,
            network_policies,
            deployments,
            services,
            pod_disruption_budgets,
        } = self;
        let mut out = Vec::new();
        push_all(&mut out, service_accounts);
        push_all(&mut out, config_maps);
        push_all(&mut out, network_policies);
        push_all(&mut out, deployments);
        push_all(&mut out, services);
        push_all(&mut out, pod_disruption_budgets);
        out
    }

    /// Number of objects in the bundle.
    pub fn len(&self) -> usize {
        self.service_accounts.len()
            + self.config_maps.len()
            + self.network_policies.len()
            + self.deployments.len()
            + self.services.len()
            + self.pod_disruption_budgets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn push_all<T: Serialize>(out: &mut Vec<serde_json::Value>, objects: &[T]) {
    for o in objects {
        out.push(serde_json::to_value(o).expect("k8s-openapi objects always serialize"));
    }
}

/// Builds every object for `stack`.
pub fn build(stack: &Stack, options: &BuildOptions) -> Bundle {
    let mut bundle = Bundle::default();
    for svc in &stack.services {
        bundle
            .service_accounts
            .push(service::service_account(stack, svc));
        bundle.deployments.push(service::deployment(stack, svc));
        bundle.services.push(service::service(stack, svc));
    }
    let config = gateway::config_map(stack, options);
    bundle
        .service_accounts
        .insert(0, gateway::service_account(stack));
    bundle
        .deployments
        .insert(0, gateway::deployment(stack, options));
    bundle.services.insert(0, gateway::service(stack));
    bundle.config_maps.push(config);
    if let Some(identity) = &stack.service_identity {
        bundle.config_maps.push(service::identity_config_map(
            stack,
            identity,
            options.identity_keys.as_ref(),
        ));
    }
    bundle
        .pod_disruption_budgets
        .push(gateway::pod_disruption_budget(stack));
    bundle.network_policies = netpol::network_policies(
        stack,
        options.operator_namespace.as_deref(),
        &options.cluster_cidrs,
    );
    bundle
}

/// Metadata of an object named `name` that belongs to `component` of `stack`: namespace,
/// the fixed label set and, once the stack has a uid, a controller owner reference.
pub(crate) fn meta(stack: &Stack, name: impl Into<String>, component: Component<'_>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some(stack.namespace.clone()),
        labels: Some(names::labels(&stack.name, component)),
        owner_references: owner_reference(stack).map(|o| vec![o]),
        ..ObjectMeta::default()
    }
}

/// A plain-HTTP GET probe of `path` on `port` every `period` seconds, 2 s to answer.
fn http_probe(path: &str, port: i32, period: i32, failure_threshold: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(port),
            scheme: Some("HTTP".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(2),
        failure_threshold: Some(failure_threshold),
        ..Probe::default()
    }
}

fn owner_reference(stack: &Stack) -> Option<OwnerReference> {
    Some(OwnerReference {
        api_version: OpsConductorStack::api_version(&()).to_string(),
        kind: OpsConductorStack::kind(&()).to_string(),
        name: stack.name.to_string(),
        uid: stack.uid.clone()?,
        controller: Some(true),
        block_owner_deletion: Some(true),
    })
}
