//! The controller: watches stacks and every kind of object it creates for them, and
//! reconciles each stack as a pipeline (see [`reconcile`]).
//!
//! Child objects are watched through label-filtered watches that fill caches of the operator's
//! own ([`cache`]), shared with the reconciler, so "is this object already as we want it?" is answered from memory and an
//! unchanged stack causes no write request at all.
//!
//! The files, in the order a reconcile meets them:
//! - [`run`]: the watches and the controller that turns their events into reconciles;
//! - [`stores`]: the watch caches the reconciler reads, and their readiness;
//! - [`cache`]: one kind's cache, and which watch events are worth a reconcile; [`compact`]:
//!   how it holds an object;
//! - [`reconcile`]: one reconcile of one stack, stage by stage (gather, validate,
//!   dereference, build, apply, status), each failing with its own [`Error`];
//! - beside it, the stages' helpers: [`dereference`] (the certificate), [`apply`] (the only
//!   writes of children), [`diff`] (is an object exactly ours?), [`marker`] (the namespace
//!   admission label), [`status`] (the status as a value), [`config_status`] (which
//!   configuration the gateway pods run), [`events`];
//! - [`janitor`]: what follows from the caches, not from single events.

mod apply;
pub mod cache;
pub mod compact;
pub mod config_status;
mod dereference;
pub mod diff;
mod error;
mod events;
mod identity;
pub mod janitor;
mod marker;
mod reconcile;
mod run;
pub mod scope;
mod slim;
pub mod status;
mod stores;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::runtime::events::Recorder;
use kube::runtime::reflector::Store;
use kube::{Client, Resource};

use crate::build::BuildOptions;
use crate::crd::OpsConductorStack;
use crate::metrics::Metrics;

pub use error::{Error, Request};
pub use marker::{MARKER_MANAGER, sync_namespace_marker};
pub use run::{WatchBackoff, backoff, run};
pub use stores::{AuditStores, GuardrailStores, Stores};

/// Settings of `opsconductor-operator run`.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// What the builders take from the operator's settings: the cluster domain, the operator's
    /// own namespace and the cluster's address ranges (each reconcile adds the ACME thumbprint
    /// and the upstreams' addresses).
    pub build: BuildOptions,
    /// Compare desired objects with the watch caches and write only what differs. Switched
    /// off only to measure what it saves (every reconcile then applies everything).
    pub compare_before_apply: bool,
    /// Periodic re-check of every stack, on top of the watches.
    pub resync: Duration,
    /// Stacks reconciled at the same time.
    pub max_concurrent_reconciles: u16,
    /// Report `PolicyEnforced=True` only while the admission guardrails
    /// ([`crate::admission`]) are installed and bound (`--admission-guardrails require`);
    /// `false` when they are deliberately not installed (the chart's `admission.enabled=false`).
    pub require_guardrails: bool,
    /// Accept ACME directory URLs on loopback addresses (`--allow-loopback-acme-directory`:
    /// a test CA on the operator's own machine); see
    /// [`crate::validate::directory_url_problems`].
    pub allow_loopback_acme_directory: bool,
    /// Gateway images stacks may use (`--allowed-gateway-images`); empty: any. See
    /// [`crate::validate::gateway_image_problems`].
    pub allowed_gateway_images: Vec<String>,
    /// The namespaces served (`--watch-namespaces`, `--namespace-selector`); see [`scope`].
    pub scope: scope::Scope,
    /// Where the violation audit watches (`--audit-namespaces`).
    pub audit_namespaces: scope::AuditNamespaces,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            build: BuildOptions::default(),
            compare_before_apply: true,
            resync: Duration::from_secs(300),
            max_concurrent_reconciles: 8,
            require_guardrails: true,
            allow_loopback_acme_directory: false,
            allowed_gateway_images: Vec::new(),
            scope: scope::Scope::Cluster,
            audit_namespaces: scope::AuditNamespaces::Scope,
        }
    }
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub stores: Stores,
    pub options: RunOptions,
    /// With `--namespace-selector`: the selected namespaces, and which are still being
    /// listed (see [`scope::Dynamic`]).
    pub dynamic: scope::Dynamic,
    /// The controller's own cache of stacks (to find the stacks of a namespace).
    pub stacks: Store<OpsConductorStack>,
    /// Turns true once the stack cache has had its first list (see [`Context::stacks_listed`]).
    stacks_listed: tokio::sync::watch::Receiver<bool>,
    /// ACME issuance and renewal of the gateway certificates.
    pub acme: crate::acme::Manager,
    applied: apply::AppliedLog,
    /// Consecutive failures per stack (namespace/name), for the retry backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// The name conflicts last announced by Events, per stack, so each is announced once.
    announced_conflicts: Mutex<HashMap<String, std::collections::BTreeSet<String>>>,
    /// The violations last announced by Events, per stack, so none is announced twice.
    announced_violations: Mutex<HashMap<String, Vec<crate::crd::Violation>>>,
    /// The namespace markers written lately: namespace -> (the label as the write left it,
    /// the Namespace's resourceVersion after it), until the namespace cache has caught up.
    markers_written: Mutex<HashMap<String, (Option<String>, String)>>,
    /// The generation of each stack (namespace/name) this process last applied in full, so
    /// that a stack cache that has not yet seen the status write does not hide convergence.
    applied_generations: Mutex<HashMap<String, i64>>,
    /// The API server's token issuer and signing keys, for stacks with service identity.
    identity_keys: identity::KeysCache,
    /// Cancelled when the controller must stop (shutdown, or the Lease lost). A reconcile
    /// that waits for something the controller's own streams bring (the caches' first lists)
    /// gives up on it: the controller stops polling those streams when it stops, and waits
    /// for the reconciles in flight.
    stop: tokio_util::sync::CancellationToken,
}

impl Context {
    /// Waits until the stack cache has had its first list; false when the controller stopped
    /// first. Wait here, never on the cache's own `wait_until_ready`: kube-runtime's runner
    /// already waits on that, and it wakes only the last of several waiters (a oneshot
    /// receiver behind a lock: each poll replaces the waker of the one before).
    async fn stacks_listed(&self) -> bool {
        self.stacks_listed
            .clone()
            .wait_for(|listed| *listed)
            .await
            .is_ok()
    }
}

fn stack_key(stack: &OpsConductorStack) -> String {
    format!(
        "{}/{}",
        stack.metadata.namespace.as_deref().unwrap_or(""),
        stack.metadata.name.as_deref().unwrap_or("")
    )
}

/// A reference to the stack for Events.
fn reference(stack: &OpsConductorStack) -> k8s_openapi::api::core::v1::ObjectReference {
    stack.object_ref(&())
}
