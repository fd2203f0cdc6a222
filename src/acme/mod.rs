//! ACME certificates for the gateway: renewal policy, certificate checks, account, orders,
//! and the [`Manager`] the controller asks once per reconcile.
//!
//! - [`policy`]: when to order and when to retry (pure, clock passed in);
//! - [`cert`]: inspecting a `kubernetes.io/tls` Secret's contents, keys, CSRs, the bootstrap
//!   certificate;
//! - [`account`]: the account Secret, registration, the CA's HTTP client, the thumbprint;
//! - [`order`]: one order behind the [`order::Solver`] interface; HTTP-01 through the gateway;
//! - [`dns01`]: DNS-01 through a [`dns01::DnsProvider`] (RFC 2136 with TSIG).
//!
//! Reconcile never waits for the CA: [`Manager::reconcile`] reads the Secrets, decides with
//! [`policy`], starts at most one background job per stack (an order, or an ARI check) and
//! reports what it knows. The job writes the Secret `<stack>-tls` when it succeeds, and
//! records its failure and the next attempt otherwise. See `docs/acme.md`.

pub mod account;
pub mod cert;
pub mod dns01;
pub mod order;
pub mod policy;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};

use crate::crd::{CertificateState, CertificateStatus};
use crate::metrics::Metrics;
use crate::model::{Acme, Stack};
use crate::names::{self, Component};
use crate::ownership::{self, Claim, NameConflict};
use policy::{Backoff, Current, Decision, Why, Window};

/// Annotation on `<stack>-tls`: sha256 of what the operator wrote, to notice changes by others.
pub const DIGEST_ANNOTATION: &str = "opsconductor.io/certificate-sha256";
/// Annotation on `<stack>-tls`: `temporary` for the bootstrap certificate, `acme` otherwise.
pub const SOURCE_ANNOTATION: &str = "opsconductor.io/certificate-source";

/// `t` as RFC 3339 in UTC, to the second (`2027-01-27T10:00:00Z`).
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    k8s_openapi::jiff::Timestamp::from_second(secs)
        .map(|ts| ts.to_string())
        .unwrap_or_default()
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

// ---------------------------------------------------------------------------------------------
// Failures

/// What went wrong, in a bounded set (for metrics and Event reasons).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// The gateway does not answer the challenge (self-check, before the CA is asked).
    ChallengeUnreachable,
    /// The CA tried the challenge and failed.
    ChallengeFailed,
    /// DNS-01: the DNS server could not be reached or did not take the update.
    DnsUpdateFailed,
    /// DNS-01: an authoritative server did not serve the TXT record in time.
    DnsNotPropagated,
    /// No answer from the CA, or a TLS or HTTP error talking to it.
    CaUnreachable,
    /// The CA said `rateLimited`.
    RateLimited,
    /// The CA refused or invalidated the order.
    OrderInvalid,
    /// The CA no longer knows the stored account.
    AccountUnknown,
    /// The CA refused the account.
    AccountRefused,
    /// The CA returned a certificate that fails the checks.
    BadCertificate,
    /// A referenced Secret is missing or unusable.
    Config,
    /// A Secret the certificate needs exists and is someone else's.
    NameConflict,
    /// The Kubernetes API failed.
    Kube,
    Internal,
    /// A failure the status recorded without its kind (an earlier process stopped while its
    /// next order ran): its message is all that is known.
    Earlier,
}

impl FailureKind {
    const ALL: [FailureKind; 15] = [
        FailureKind::ChallengeUnreachable,
        FailureKind::ChallengeFailed,
        FailureKind::DnsUpdateFailed,
        FailureKind::DnsNotPropagated,
        FailureKind::CaUnreachable,
        FailureKind::RateLimited,
        FailureKind::OrderInvalid,
        FailureKind::AccountUnknown,
        FailureKind::AccountRefused,
        FailureKind::BadCertificate,
        FailureKind::Config,
        FailureKind::NameConflict,
        FailureKind::Kube,
        FailureKind::Internal,
        FailureKind::Earlier,
    ];

    /// The kind whose [`FailureKind::reason`] is `reason`.
    pub fn from_reason(reason: &str) -> Option<FailureKind> {
        FailureKind::ALL.into_iter().find(|k| k.reason() == reason)
    }

    /// Whether a failure of this kind may carry the CA's `Retry-After`, which makes its next
    /// attempt more than a function of the failure count and time.
    fn may_carry_retry_after(self) -> bool {
        matches!(self, FailureKind::RateLimited | FailureKind::CaUnreachable)
    }

    pub fn reason(self) -> &'static str {
        match self {
            FailureKind::ChallengeUnreachable => "ChallengeUnreachable",
            FailureKind::ChallengeFailed => "ChallengeFailed",
            FailureKind::DnsUpdateFailed => "DNSUpdateFailed",
            FailureKind::DnsNotPropagated => "DNSNotPropagated",
            FailureKind::CaUnreachable => "CAUnreachable",
            FailureKind::RateLimited => "RateLimited",
            FailureKind::OrderInvalid => "OrderInvalid",
            FailureKind::AccountUnknown => "AccountUnknown",
            FailureKind::AccountRefused => "AccountRefused",
            FailureKind::BadCertificate => "BadCertificate",
            FailureKind::Config => "ConfigurationError",
            FailureKind::NameConflict => "NameConflict",
            FailureKind::Kube => "KubernetesError",
            FailureKind::Internal => "InternalError",
            FailureKind::Earlier => "EarlierFailure",
        }
    }
}

/// A failed attempt: its kind, plain words, and the CA's `Retry-After` when it sent one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub kind: FailureKind,
    pub message: String,
    pub retry_after: Option<SystemTime>,
}

impl Failure {
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Failure {
        Failure {
            kind,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn config(message: impl Into<String>) -> Failure {
        Failure::new(FailureKind::Config, message)
    }

    pub fn kube(message: impl Into<String>) -> Failure {
        Failure::new(FailureKind::Kube, message)
    }

    /// Classifies an instant-acme error met while doing `step`.
    pub fn from_acme(step: &str, e: instant_acme::Error, http: &account::CaClient) -> Failure {
        use instant_acme::Error as E;
        match e {
            E::Api(p) if order::is_type(&p, "rateLimited") => {
                let retry_after = http.last_retry_after();
                let until = retry_after
                    .map(|t| format!("rate-limited until {}", rfc3339(t)))
                    .unwrap_or_else(|| "rate-limited".into());
                Failure {
                    kind: FailureKind::RateLimited,
                    message: format!("{until}: {} (while {step})", order::problem_text(&p)),
                    retry_after,
                }
            }
            E::Api(p) if order::is_type(&p, "accountDoesNotExist") => Failure::new(
                FailureKind::AccountUnknown,
                format!(
                    "the CA does not know the stored account: {} (while {step})",
                    order::problem_text(&p)
                ),
            ),
            E::Api(p) if order::is_type(&p, "externalAccountRequired") => Failure::new(
                FailureKind::AccountRefused,
                format!(
                    "the CA requires External Account Binding: set \
                     spec.tls.acme.externalAccountBinding (keyId, and hmacKeySecretRef naming \
                     a Secret with the HMAC key) to the credentials the CA gave you; \
                     the CA said: {} (while {step})",
                    order::problem_text(&p)
                ),
            ),
            E::Api(p) if step.contains("account") => Failure::new(
                FailureKind::AccountRefused,
                format!(
                    "the CA refused the account: {} (while {step})",
                    order::problem_text(&p)
                ),
            ),
            E::Api(p) if p.status.is_some_and(|s| s >= 500) => Failure {
                kind: FailureKind::CaUnreachable,
                message: format!("CA unavailable: {} (while {step})", order::problem_text(&p)),
                retry_after: http.last_retry_after(),
            },
            E::Api(p) => Failure::new(
                FailureKind::OrderInvalid,
                format!("order invalid: {} (while {step})", order::problem_text(&p)),
            ),
            E::Other(e) if e.downcast_ref::<account::RefusedAddress>().is_some() => {
                Failure::config(format!("{e}; nothing was sent to it (while {step})"))
            }
            E::Timeout(_) => Failure::new(
                FailureKind::CaUnreachable,
                format!("CA unreachable: the CA did not finish in time (while {step})"),
            ),
            other => Failure::new(
                FailureKind::CaUnreachable,
                format!(
                    "CA unreachable: {} (while {step})",
                    order::error_chain(&other)
                ),
            ),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Failures recorded in the status

/// What the stack's status says about earlier attempts: written by this operator before a
/// restart, or by the replica that led before a change of leader. The backoff resumes from it,
/// so that neither orders again at once after failures (a crash-looping operator is what gets
/// an account rate-limited or blocked by a real CA).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Recorded {
    /// `status.certificate`, when it describes the stack's current spec (its
    /// `observedGeneration` is the stack's generation; a spec changed since starts afresh, as a
    /// change of hosts or ACME settings does in a running operator).
    pub certificate: Option<CertificateStatus>,
    /// The CertificateReady condition's reason: the kind of the last failure.
    pub reason: Option<String>,
}

/// A backoff resumed from the status.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Resumed {
    failures: u32,
    failure: Failure,
    failed_at: SystemTime,
    next_attempt: SystemTime,
}

fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    let secs = text
        .parse::<k8s_openapi::jiff::Timestamp>()
        .ok()?
        .as_second();
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).ok()?))
}

/// The failures to resume from, or `None` when the status records none (or no readable time
/// of the last one). The next attempt follows the backoff of the recorded count from the
/// recorded time; the recorded `renewalTime` (the next attempt the status named) counts only
/// when the failure may have carried the CA's `Retry-After`, which is not stored elsewhere.
fn resume(recorded: &Recorded, backoff: &Backoff) -> Option<Resumed> {
    let c = recorded.certificate.as_ref()?;
    let failures = u32::try_from(c.failed_attempts).ok().filter(|n| *n > 0)?;
    let failed_at = parse_rfc3339(c.last_failure_time.as_deref()?)?;
    let kind = recorded
        .reason
        .as_deref()
        .and_then(FailureKind::from_reason)
        .unwrap_or(FailureKind::Earlier);
    let retry_after = c
        .renewal_time
        .as_deref()
        .and_then(parse_rfc3339)
        .filter(|_| kind.may_carry_retry_after());
    Some(Resumed {
        failures,
        failure: Failure {
            kind,
            message: c
                .last_failure_reason
                .clone()
                .unwrap_or_else(|| "(no reason recorded)".into()),
            retry_after,
        },
        failed_at,
        next_attempt: policy::next_attempt(failed_at, failures, backoff, retry_after),
    })
}

// ---------------------------------------------------------------------------------------------
// Settings

/// Settings of the ACME engine.
#[derive(Clone, Debug)]
pub struct Config {
    pub cluster_domain: String,
    /// Where the operator reaches the gateway's port 80 for the self-check. Default:
    /// `http://<stack>-gateway.<namespace>.svc.<cluster domain>`. `{stack}` and `{namespace}`
    /// are replaced. Env `OPSC_ACME_GATEWAY_URL`.
    pub gateway_url: Option<String>,
    /// Env `OPSC_ACME_BACKOFF_FIRST_SECONDS`, `OPSC_ACME_BACKOFF_CAP_SECONDS`.
    pub backoff: Backoff,
    /// How long the self-check waits for the gateway to answer (a gateway that is still
    /// rolling out the configuration with the thumbprint). Env `OPSC_ACME_SELF_CHECK_SECONDS`.
    pub self_check_patience: Duration,
    /// Bounds on how often renewal information is fetched again. Env
    /// `OPSC_ACME_ARI_MIN_SECONDS`, `OPSC_ACME_ARI_MAX_SECONDS`.
    pub ari_min: Duration,
    pub ari_max: Duration,
    /// How soon reconcile looks again while a job runs.
    pub poll_interval: Duration,
    /// The longest a stack goes without a look at its certificate Secret (which the operator
    /// does not watch): bounds how long a change by someone else goes unnoticed. Env
    /// `OPSC_ACME_RECHECK_SECONDS`.
    pub recheck: Duration,
    /// Whether the CA may be on a loopback address (`--allow-loopback-acme-directory`).
    pub allow_loopback_directory: bool,
    /// The port on which the zone's NS servers are asked whether they serve a DNS-01 record
    /// (53; a test's servers on loopback listen elsewhere). Env `OPSC_ACME_DNS01_NS_PORT`.
    pub dns01_ns_port: u16,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            cluster_domain: "cluster.local".into(),
            gateway_url: None,
            backoff: Backoff::DEFAULT,
            self_check_patience: Duration::from_secs(180),
            ari_min: Duration::from_secs(60),
            ari_max: Duration::from_secs(6 * 3600),
            poll_interval: Duration::from_secs(2),
            recheck: Duration::from_secs(60),
            allow_loopback_directory: false,
            dns01_ns_port: 53,
        }
    }
}

impl Config {
    /// The defaults, with the `OPSC_ACME_*` environment variables applied.
    pub fn from_env(cluster_domain: &str) -> Config {
        let secs = |var: &str| -> Option<Duration> {
            std::env::var(var)
                .ok()?
                .parse::<f64>()
                .ok()
                .filter(|v| *v >= 0.0)
                .map(Duration::from_secs_f64)
        };
        let d = Config::default();
        Config {
            cluster_domain: cluster_domain.to_string(),
            gateway_url: std::env::var("OPSC_ACME_GATEWAY_URL")
                .ok()
                .filter(|s| !s.is_empty()),
            backoff: Backoff {
                first: secs("OPSC_ACME_BACKOFF_FIRST_SECONDS").unwrap_or(d.backoff.first),
                cap: secs("OPSC_ACME_BACKOFF_CAP_SECONDS").unwrap_or(d.backoff.cap),
            },
            self_check_patience: secs("OPSC_ACME_SELF_CHECK_SECONDS")
                .unwrap_or(d.self_check_patience),
            ari_min: secs("OPSC_ACME_ARI_MIN_SECONDS").unwrap_or(d.ari_min),
            ari_max: secs("OPSC_ACME_ARI_MAX_SECONDS").unwrap_or(d.ari_max),
            poll_interval: d.poll_interval,
            recheck: secs("OPSC_ACME_RECHECK_SECONDS").unwrap_or(d.recheck),
            allow_loopback_directory: d.allow_loopback_directory,
            dns01_ns_port: std::env::var("OPSC_ACME_DNS01_NS_PORT")
                .ok()
                .and_then(|p| p.parse().ok())
                .filter(|p| *p > 0)
                .unwrap_or(d.dns01_ns_port),
        }
    }

    fn gateway_url(&self, stack: &Stack) -> String {
        match &self.gateway_url {
            Some(template) => template
                .replace("{stack}", stack.name.as_str())
                .replace("{namespace}", &stack.namespace),
            None => format!(
                "http://{}.{}.svc.{}",
                names::gateway(&stack.name),
                stack.namespace,
                self.cluster_domain
            ),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The manager

/// An Event to publish about the stack.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertEvent {
    pub warning: bool,
    pub reason: &'static str,
    pub note: String,
}

/// What one reconcile learns about the certificate.
#[derive(Clone, Debug)]
pub struct Report {
    pub status: CertificateStatus,
    /// CertificateReady: a valid certificate covering every host is in use.
    pub ok: bool,
    /// Bounded reason for the condition.
    pub reason: &'static str,
    /// Plain words for the condition.
    pub message: String,
    /// The ACME account's JWK thumbprint, once known: goes into the gateway configuration.
    pub thumbprint: Option<String>,
    /// Look again after this long (an order runs, a retry or a renewal is due).
    pub requeue_after: Option<Duration>,
    /// Events for changes since the last reconcile.
    pub events: Vec<CertEvent>,
    /// The certificate's Secrets that exist and are someone else's: neither read nor written,
    /// and no order is started while there are any.
    pub conflicts: Vec<NameConflict>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Job {
    Order,
    RenewalInfo,
}

/// A certificate the operator wrote and checked.
#[derive(Clone)]
struct Good {
    crt: String,
    key: String,
    leaf: cert::Leaf,
}

struct AriState {
    serial: String,
    window: Option<Window>,
    next_check: SystemTime,
}

#[derive(Default)]
struct State {
    /// The stack is gone and this state was dropped by [`Manager::forget`]: no job may start
    /// on it (a reconcile that began before the stack went may still hold it).
    forgotten: bool,
    /// The failures recorded in the status were looked at (once, when the state is new).
    resumed: bool,
    /// The stack's UID, to refuse a reconcile of a stack already forgotten.
    uid: Option<String>,
    /// What the orders depend on; a change resets the backoff and cancels a running order.
    fingerprint: String,
    task: Option<(Job, tokio::task::JoinHandle<()>)>,
    thumbprint: Option<String>,
    failures: u32,
    failure: Option<(Failure, SystemTime)>,
    next_attempt: Option<SystemTime>,
    good: Option<Good>,
    ari: Option<AriState>,
    events: Vec<CertEvent>,
    /// (state, reason) last reported, for Events on changes only.
    announced: Option<(CertificateState, &'static str)>,
    /// What a running order waits for (a DNS record not yet served by some server).
    progress: Arc<Mutex<Option<String>>>,
}

impl State {
    fn running(&self) -> Option<Job> {
        self.task
            .as_ref()
            .filter(|(_, handle)| !handle.is_finished())
            .map(|(job, _)| *job)
    }

    /// Starts `job` in the background, unless the stack is gone.
    fn start(&mut self, job: Job, work: impl Future<Output = ()> + Send + 'static) {
        if self.forgotten {
            return;
        }
        self.task = Some((job, tokio::spawn(work)));
    }
}

/// How many UIDs of forgotten stacks are remembered (a reconcile that started before its
/// stack went finishes within seconds; this only has to outlast it).
const FORGOTTEN_UIDS: usize = 1024;

/// The ACME engine of the controller: one state per stack, at most one job per stack.
pub struct Manager {
    config: Config,
    metrics: Arc<Metrics>,
    stacks: Mutex<Stacks>,
}

#[derive(Default)]
struct Stacks {
    states: HashMap<String, Arc<Mutex<State>>>,
    /// UIDs of stacks forgotten, newest last: never brought back by a late reconcile.
    forgotten: VecDeque<String>,
}

impl Stacks {
    /// Drops the state of `key`: its job is aborted (at its next await, so no further request
    /// reaches the CA), no job starts on the state again, and its UID is remembered.
    fn drop_state(&mut self, key: &str) {
        let Some(state) = self.states.remove(key) else {
            return;
        };
        let mut st = state.lock().unwrap();
        st.forgotten = true;
        if let Some((job, handle)) = st.task.take() {
            if !handle.is_finished() {
                tracing::info!(stack = %key, ?job, "stack is gone: stopping its ACME job");
            }
            handle.abort();
        }
        if let Some(uid) = st.uid.clone() {
            if self.forgotten.len() == FORGOTTEN_UIDS {
                self.forgotten.pop_front();
            }
            self.forgotten.push_back(uid);
        }
    }
}

/// What a background job needs.
#[derive(Clone)]
struct JobContext {
    client: Client,
    stack: Stack,
    acme: Acme,
    config: Config,
    metrics: Arc<Metrics>,
    state: Arc<Mutex<State>>,
}

fn stack_key(stack: &Stack) -> String {
    format!("{}/{}", stack.namespace, stack.name)
}

fn fingerprint(stack: &Stack, acme: &Acme) -> String {
    let mut hosts: Vec<String> = stack
        .gateway
        .hosts
        .iter()
        .map(|h| h.to_ascii_lowercase())
        .collect();
    hosts.sort();
    format!(
        "{}|{:?}|{:?}|{:?}|{:?}|{:?}|{}",
        acme.directory_url,
        acme.profile,
        acme.key_algorithm,
        acme.external_account_binding,
        acme.ca_bundle,
        acme.dns01,
        hosts.join(",")
    )
}

impl Manager {
    pub fn new(config: Config, metrics: Arc<Metrics>) -> Manager {
        Manager {
            config,
            metrics,
            stacks: Mutex::default(),
        }
    }

    /// The state of the stack `key` with `uid`, made on first use; `None` when that stack
    /// was forgotten (a reconcile that began before the stack went).
    fn state(&self, key: &str, uid: Option<&str>) -> Option<Arc<Mutex<State>>> {
        let mut stacks = self.stacks.lock().unwrap();
        if let Some(uid) = uid
            && stacks.forgotten.iter().any(|u| u == uid)
        {
            return None;
        }
        // A stack deleted and created again under the same name between two looks of the
        // janitor: the new one inherits nothing (no job, no backoff, no certificate copy).
        let replaced = stacks.states.get(key).is_some_and(|state| {
            let st = state.lock().unwrap();
            st.uid.is_some() && uid.is_some() && st.uid.as_deref() != uid
        });
        if replaced {
            tracing::info!(stack = %key, "the stack was created again: forgetting the earlier one");
            stacks.drop_state(key);
        }
        let state = stacks.states.entry(key.to_string()).or_default().clone();
        let mut st = state.lock().unwrap();
        if st.uid.as_deref() != uid {
            st.uid = uid.map(str::to_string);
        }
        drop(st);
        Some(state)
    }

    /// The stacks (`namespace/name`) this manager keeps state for.
    pub fn known_stacks(&self) -> Vec<String> {
        self.stacks.lock().unwrap().states.keys().cloned().collect()
    }

    /// Forgets a deleted stack: stops its job (aborted at its next await, so no further
    /// request reaches the CA), drops its metrics, and makes sure no job starts for it again,
    /// also from a reconcile that is still under way.
    pub fn forget(&self, namespace: &str, name: &str) {
        let key = format!("{namespace}/{name}");
        self.stacks.lock().unwrap().drop_state(&key);
        self.metrics.forget_stack(&key);
    }

    /// One look at the certificate of an ACME stack. Talks to the API server (the two
    /// Secrets), never to the CA; starts a background job when one is due.
    /// `recorded` is what the stack's status says about earlier attempts: the backoff
    /// resumes from it when this manager has no state for the stack yet.
    pub async fn reconcile(
        &self,
        client: &Client,
        stack: &Stack,
        acme: &Acme,
        recorded: &Recorded,
        now: SystemTime,
    ) -> Result<Report, kube::Error> {
        let key = stack_key(stack);
        let Some(state) = self.state(&key, stack.uid.as_deref()) else {
            return Ok(self.gone_report());
        };
        let fp = fingerprint(stack, acme);
        {
            let mut st = state.lock().unwrap();
            if st.fingerprint != fp {
                if !st.fingerprint.is_empty() {
                    if let Some((job, handle)) = st.task.take() {
                        tracing::info!(stack = %key, ?job, "ACME settings or hosts changed; cancelling the running job");
                        handle.abort();
                    }
                    st.failures = 0;
                    st.failure = None;
                    st.next_attempt = None;
                    st.thumbprint = None;
                }
                st.fingerprint = fp;
            }
            if !st.resumed {
                st.resumed = true;
                if let Some(r) = resume(recorded, &self.config.backoff) {
                    tracing::info!(
                        stack = %key,
                        failures = r.failures,
                        last_failure = %rfc3339(r.failed_at),
                        next_attempt = %rfc3339(r.next_attempt),
                        "resuming the ACME backoff recorded in the status"
                    );
                    st.failures = r.failures;
                    st.next_attempt = Some(r.next_attempt);
                    st.failure = Some((r.failure, r.failed_at));
                }
            }
        }

        // The account's thumbprint, from the stored key (no CA request).
        let mut conflicts = Vec::new();
        let known = state.lock().unwrap().thumbprint.clone();
        let thumbprint = match known {
            Some(t) => Some(t),
            None => match account::read(client, stack).await {
                Ok(stored) => {
                    let t = stored
                        .filter(|s| s.directory.as_deref() == Some(acme.directory_url.as_str()))
                        .map(|s| s.thumbprint);
                    state.lock().unwrap().thumbprint.clone_from(&t);
                    t
                }
                Err(account::ReadError::Kube(e)) => return Err(e),
                Err(account::ReadError::Conflict(c)) => {
                    conflicts.push(c);
                    None
                }
            },
        };

        // The certificate in use.
        let mut events = Vec::new();
        let current = self
            .examine(client, stack, &state, now, &mut events)
            .await?;
        if let Examined::Conflict(c) = &current {
            conflicts.push(c.clone());
        }
        if !conflicts.is_empty() {
            return Ok(self.conflict_report(&key, conflicts));
        }
        let renew_before = stack.tls.renew_before;

        let mut st = state.lock().unwrap();
        let ari = match (&current, &st.ari) {
            (Examined::Issued(leaf), Some(a)) if a.serial == leaf.facts.serial => a.window,
            _ => None,
        };
        let policy_current = match &current {
            Examined::Temporary => Current::Temporary,
            Examined::Broken(reason, _) => Current::Broken(reason),
            Examined::Issued(leaf) => Current::Issued(&leaf.facts),
            // Returned above; never decided on.
            Examined::Conflict(c) => Current::Broken(&c.why),
        };
        let decision = policy::decide(
            policy_current,
            &stack.gateway.hosts,
            renew_before,
            ari.as_ref(),
            now,
        );
        let in_use: Option<&cert::Leaf> = match &current {
            Examined::Issued(leaf) => Some(leaf),
            Examined::Broken(_, Some(leaf)) => Some(leaf),
            _ => None,
        };
        let serving_valid = in_use.is_some_and(|leaf| {
            now < leaf.facts.not_after && cert::uncovered(leaf, &stack.gateway.hosts).is_empty()
        });
        let running = st.running();
        let mut requeue: Option<Duration>;
        let mut renewal_time = None;
        let (state_now, reason, mut message) = match &decision {
            Decision::Wait { renewal_time: at } => {
                renewal_time = Some(*at);
                requeue = Some(at.duration_since(now).unwrap_or_default());
                // Renewal information for the certificate in use, when due.
                if let Examined::Issued(leaf) = &current
                    && let Some(ari_id) = leaf.ari_id.clone()
                {
                    let due = st
                        .ari
                        .as_ref()
                        .filter(|a| a.serial == leaf.facts.serial)
                        .map(|a| a.next_check);
                    match due {
                        Some(next) if next > now => {
                            requeue =
                                requeue.min(Some(next.duration_since(now).unwrap_or_default()));
                        }
                        _ if running.is_none() => {
                            let ctx = self.job_context(client, stack, acme, &state);
                            let serial = leaf.facts.serial.clone();
                            st.start(Job::RenewalInfo, renewal_info_job(ctx, serial, ari_id));
                            requeue = Some(self.config.poll_interval);
                        }
                        _ => requeue = Some(self.config.poll_interval),
                    }
                }
                let leaf = in_use.expect("Wait only for an issued certificate");
                (
                    CertificateState::Valid,
                    "Issued",
                    format!(
                        "certificate {} for {} valid until {}; renewal at {}",
                        leaf.facts.serial,
                        leaf.facts.hosts.join(", "),
                        rfc3339(leaf.facts.not_after),
                        rfc3339(*at)
                    ),
                )
            }
            Decision::Issue(why) => {
                let busy_state = if serving_valid {
                    CertificateState::Renewing
                } else {
                    CertificateState::Issuing
                };
                match (running, st.next_attempt) {
                    (Some(Job::Order), _) => {
                        requeue = Some(self.config.poll_interval);
                        let progress = st.progress.lock().unwrap().clone();
                        (
                            busy_state,
                            "Ordering",
                            match progress {
                                Some(p) => {
                                    format!("ordering a certificate: {}; {p}", why.describe())
                                }
                                None => format!("ordering a certificate: {}", why.describe()),
                            },
                        )
                    }
                    (Some(Job::RenewalInfo), _) => {
                        requeue = Some(self.config.poll_interval);
                        (
                            busy_state,
                            "Ordering",
                            format!("about to order a certificate: {}", why.describe()),
                        )
                    }
                    (None, Some(next)) if next > now => {
                        renewal_time = Some(next);
                        requeue = Some(next.duration_since(now).unwrap_or_default());
                        let (failure, _) = st
                            .failure
                            .clone()
                            .expect("a next attempt follows a failure");
                        let state_now = if serving_valid {
                            CertificateState::Renewing
                        } else {
                            CertificateState::Failed
                        };
                        (
                            state_now,
                            failure.kind.reason(),
                            format!(
                                "{} failed {} time(s): {}; next attempt at {}",
                                if serving_valid { "renewal" } else { "issuance" },
                                st.failures,
                                failure.message,
                                rfc3339(next)
                            ),
                        )
                    }
                    (None, _) => {
                        let ctx = self.job_context(client, stack, acme, &state);
                        let replaces = match (&current, why) {
                            (Examined::Issued(leaf), Why::Due { .. }) => leaf.ari_id.clone(),
                            _ => None,
                        };
                        tracing::info!(stack = %key, why = %why.describe(), "starting an ACME order");
                        st.start(Job::Order, order_job(ctx, why.clone(), replaces));
                        requeue = Some(self.config.poll_interval);
                        (
                            busy_state,
                            "Ordering",
                            format!("ordering a certificate: {}", why.describe()),
                        )
                    }
                }
            }
        };
        if matches!(current, Examined::Temporary) {
            message = format!(
                "serving a temporary self-signed certificate until the first issuance; {message}"
            );
        }
        if st.thumbprint.is_none() {
            st.thumbprint.clone_from(&thumbprint);
        }
        let ok = serving_valid && state_now != CertificateState::Failed;
        let (failure, failure_time) = match &st.failure {
            Some((f, at)) => (Some(f.message.clone()), Some(rfc3339(*at))),
            None => (None, None),
        };
        let status = CertificateStatus {
            state: state_now,
            hosts: in_use.map(|l| l.facts.hosts.clone()).unwrap_or_default(),
            serial: in_use.map(|l| l.facts.serial.clone()),
            not_before: in_use.map(|l| rfc3339(l.facts.not_before)),
            not_after: in_use.map(|l| rfc3339(l.facts.not_after)),
            renewal_time: renewal_time.map(rfc3339),
            last_failure_reason: failure,
            last_failure_time: failure_time,
            failed_attempts: st.failures as i32,
        };

        // Events: what the jobs did, then the state when it changed.
        events.append(&mut st.events);
        if st.announced != Some((state_now, reason)) {
            let routine = matches!(
                (st.announced, state_now),
                (
                    Some((CertificateState::Renewing | CertificateState::Issuing, _)),
                    CertificateState::Valid
                )
            );
            // "Issued" after an order is announced by the job's CertificateIssued Event.
            if !routine && reason != "Ordering" {
                events.push(CertEvent {
                    warning: matches!(state_now, CertificateState::Failed)
                        || (state_now == CertificateState::Renewing && reason != "Ordering"),
                    reason: match state_now {
                        CertificateState::Valid => "CertificateValid",
                        CertificateState::Failed => "IssuanceFailing",
                        CertificateState::Renewing => "RenewalFailing",
                        CertificateState::Issuing => "Issuing",
                        CertificateState::Pending => "Pending",
                    },
                    note: message.clone(),
                });
            }
            st.announced = Some((state_now, reason));
        }
        drop(st);

        self.metrics.certificate(
            &key,
            ok,
            in_use.map(|leaf| unix(leaf.facts.not_after)),
            renewal_time.map(unix),
        );
        Ok(Report {
            status,
            ok,
            reason,
            message,
            thumbprint,
            requeue_after: Some(
                requeue
                    .unwrap_or(self.config.recheck)
                    .clamp(Duration::from_millis(500), self.config.recheck),
            ),
            events,
            conflicts: Vec::new(),
        })
    }

    /// The report for a stack that is gone (a reconcile that began before it went): nothing
    /// is read, written or ordered.
    fn gone_report(&self) -> Report {
        Report {
            status: CertificateStatus::pending(),
            ok: false,
            reason: "StackGone",
            message: "the stack is gone".into(),
            thumbprint: None,
            requeue_after: None,
            events: Vec::new(),
            conflicts: Vec::new(),
        }
    }

    /// The report while a Secret of the certificate is someone else's: nothing is ordered
    /// or written until it is gone or handed over.
    fn conflict_report(&self, key: &str, conflicts: Vec<NameConflict>) -> Report {
        let objects: Vec<String> = conflicts.iter().map(NameConflict::object).collect();
        self.metrics.certificate(key, false, None, None);
        Report {
            status: CertificateStatus {
                state: CertificateState::Failed,
                ..CertificateStatus::pending()
            },
            ok: false,
            reason: "NameConflict",
            message: format!(
                "{} exist(s) and belong(s) to someone else: not used, not written, and no \
                 certificate is ordered until it is removed or handed over",
                objects.join(", ")
            ),
            thumbprint: None,
            requeue_after: Some(self.config.recheck),
            events: Vec::new(),
            conflicts,
        }
    }

    fn job_context(
        &self,
        client: &Client,
        stack: &Stack,
        acme: &Acme,
        state: &Arc<Mutex<State>>,
    ) -> JobContext {
        JobContext {
            client: client.clone(),
            stack: stack.clone(),
            acme: acme.clone(),
            config: self.config.clone(),
            metrics: self.metrics.clone(),
            state: state.clone(),
        }
    }

    /// Reads `<stack>-tls` and says what is in use: writes the bootstrap certificate when
    /// there is none, and restores the last good certificate when someone changed it.
    async fn examine(
        &self,
        client: &Client,
        stack: &Stack,
        state: &Arc<Mutex<State>>,
        now: SystemTime,
        events: &mut Vec<CertEvent>,
    ) -> Result<Examined, kube::Error> {
        let name = names::tls_secret(&stack.name);
        let api: Api<Secret> = Api::namespaced(client.clone(), &stack.namespace);
        let Some(secret) = api.get_opt(&name).await? else {
            // (Created by server-side apply: a Secret created by someone else meanwhile would
            // be written. The window is one request long, and a stack only ever names its
            // own `<stack>-tls`.)
            let (crt, key) = cert::bootstrap(&stack.gateway.hosts, now)
                .map_err(|e| kube::Error::Service(e.to_string().into()))?;
            write_tls_secret(client, stack, &crt, &key, true).await?;
            events.push(CertEvent {
                warning: false,
                reason: "TemporaryCertificate",
                note: format!(
                    "wrote a temporary self-signed certificate to Secret {name} so the gateway can \
                     start; it is replaced after the first issuance"
                ),
            });
            return Ok(Examined::Temporary);
        };
        let claim = ownership::claim(&secret.metadata, stack.name.as_str(), stack.uid.as_deref());
        if let Claim::Foreign(why) = claim {
            return Ok(Examined::Conflict(NameConflict {
                kind: "Secret",
                name,
                why,
            }));
        }
        let data = secret.data.clone().unwrap_or_default();
        let field = |k: &str| data.get(k).map(|b| b.0.clone()).unwrap_or_default();
        let (crt, key) = (field("tls.crt"), field("tls.key"));
        let recorded = secret
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(DIGEST_ANNOTATION))
            .cloned();
        // An adopted Secret is rewritten (with the stack's owner reference) like a changed one.
        let untouched = claim == Claim::Ours
            && recorded.as_deref() == Some(cert::content_digest(&crt, &key).as_str());
        let parsed = cert::parse_chain(&crt).and_then(|leaf| {
            if cert::key_matches(&leaf, &key)? {
                Ok(leaf)
            } else {
                Err(cert::CertError::KeyMismatch)
            }
        });
        if untouched {
            return Ok(match parsed {
                Ok(leaf) if leaf.temporary => Examined::Temporary,
                Ok(leaf) => {
                    let mut st = state.lock().unwrap();
                    if st
                        .good
                        .as_ref()
                        .is_none_or(|g| g.leaf.facts.serial != leaf.facts.serial)
                    {
                        st.good = Some(Good {
                            crt: String::from_utf8_lossy(&crt).into_owned(),
                            key: String::from_utf8_lossy(&key).into_owned(),
                            leaf: leaf.clone(),
                        });
                    }
                    Examined::Issued(leaf)
                }
                Err(e) => Examined::Broken(e.to_string(), None),
            });
        }
        // Changed by someone else.
        let what = match &parsed {
            Ok(leaf) => format!("it now holds certificate {}", leaf.facts.serial),
            Err(e) => format!("its content is unusable: {e}"),
        };
        let good = state.lock().unwrap().good.clone();
        if let Some(good) = good.filter(|g| now < g.leaf.facts.not_after) {
            write_tls_secret(client, stack, &good.crt, &good.key, false).await?;
            events.push(CertEvent {
                warning: true,
                reason: "CertificateRepaired",
                note: format!(
                    "Secret {name} was changed by someone else ({what}); restored certificate {}",
                    good.leaf.facts.serial
                ),
            });
            return Ok(Examined::Issued(good.leaf));
        }
        events.push(CertEvent {
            warning: true,
            reason: "CertificateTampered",
            note: format!(
                "Secret {name} was changed by someone else ({what}) and the operator holds no \
                 copy of its own certificate; ordering a new one"
            ),
        });
        match parsed {
            // It still serves; keep it in place while a new certificate is ordered.
            Ok(leaf) if !leaf.temporary => Ok(Examined::Broken(
                format!("Secret {name} was changed by someone else"),
                Some(leaf),
            )),
            _ => {
                let (crt, key) = cert::bootstrap(&stack.gateway.hosts, now)
                    .map_err(|e| kube::Error::Service(e.to_string().into()))?;
                write_tls_secret(client, stack, &crt, &key, true).await?;
                Ok(Examined::Broken(
                    format!("Secret {name} was changed by someone else: {what}"),
                    None,
                ))
            }
        }
    }
}

/// What `<stack>-tls` holds.
enum Examined {
    Temporary,
    /// Unusable or not the operator's; the leaf when it still serves.
    Broken(String, Option<cert::Leaf>),
    Issued(cert::Leaf),
    /// Someone else's Secret of that name: not used, not written.
    Conflict(NameConflict),
}

/// Writes `<stack>-tls` (server-side apply): the chain, the key, the digest of both.
async fn write_tls_secret(
    client: &Client,
    stack: &Stack,
    crt: &str,
    key: &str,
    temporary: bool,
) -> Result<(), kube::Error> {
    let name = names::tls_secret(&stack.name);
    let mut meta = crate::build::meta(stack, name.clone(), Component::Gateway);
    meta.annotations = Some(BTreeMap::from([
        (
            DIGEST_ANNOTATION.to_string(),
            cert::content_digest(crt.as_bytes(), key.as_bytes()),
        ),
        (
            SOURCE_ANNOTATION.to_string(),
            if temporary { "temporary" } else { "acme" }.to_string(),
        ),
    ]));
    let secret = Secret {
        metadata: meta,
        type_: Some("kubernetes.io/tls".into()),
        data: Some(BTreeMap::from([
            ("tls.crt".to_string(), ByteString(crt.as_bytes().to_vec())),
            ("tls.key".to_string(), ByteString(key.as_bytes().to_vec())),
        ])),
        ..Secret::default()
    };
    let mut value = serde_json::to_value(&secret).map_err(kube::Error::SerdeError)?;
    value["apiVersion"] = "v1".into();
    value["kind"] = "Secret".into();
    Api::<Secret>::namespaced(client.clone(), &stack.namespace)
        .patch(
            &name,
            &PatchParams::apply(names::MANAGER).force(),
            &Patch::Apply(&value),
        )
        .await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Jobs

async fn ca_client(ctx: &JobContext) -> Result<account::CaClient, Failure> {
    let bundle = match &ctx.acme.ca_bundle {
        Some(r) => Some(
            account::secret_value(&ctx.client, &ctx.stack.namespace, r, "caBundleSecretRef")
                .await?,
        ),
        None => None,
    };
    account::CaClient::new(bundle.as_deref(), ctx.config.allow_loopback_directory)
}

/// One order, from account to written Secret; records the outcome in the state.
async fn order_job(ctx: JobContext, why: Why, replaces: Option<String>) {
    let started = Instant::now();
    let result = order_once(&ctx, replaces).await;
    let now = SystemTime::now();
    // Whatever the order waited for is over.
    let progress = ctx.state.lock().unwrap().progress.clone();
    *progress.lock().unwrap() = None;
    let outcome = if result.is_ok() { "ok" } else { "error" };
    ctx.metrics
        .observe_acme("order", outcome, started.elapsed());
    let mut st = ctx.state.lock().unwrap();
    match result {
        Ok((good, took)) => {
            tracing::info!(
                stack = %stack_key(&ctx.stack),
                serial = %good.leaf.facts.serial,
                seconds = took.as_secs_f64(),
                "certificate issued and written"
            );
            st.events.push(CertEvent {
                warning: false,
                reason: "CertificateIssued",
                note: format!(
                    "issued certificate {} for {} valid until {} ({}); order to Secret in {:.1} s",
                    good.leaf.facts.serial,
                    good.leaf.facts.hosts.join(", "),
                    rfc3339(good.leaf.facts.not_after),
                    why.describe(),
                    took.as_secs_f64()
                ),
            });
            st.good = Some(good);
            st.failures = 0;
            st.failure = None;
            st.next_attempt = None;
            st.ari = None;
        }
        Err(failure) => {
            st.failures += 1;
            let next =
                policy::next_attempt(now, st.failures, &ctx.config.backoff, failure.retry_after);
            tracing::warn!(
                stack = %stack_key(&ctx.stack),
                kind = failure.kind.reason(),
                message = %failure.message,
                failures = st.failures,
                next_attempt = %rfc3339(next),
                "ACME order failed"
            );
            let repeated = st
                .failure
                .as_ref()
                .is_some_and(|(f, _)| f.message == failure.message);
            if !repeated {
                st.events.push(CertEvent {
                    warning: true,
                    reason: failure.kind.reason(),
                    note: format!("{}; next attempt at {}", failure.message, rfc3339(next)),
                });
            }
            st.next_attempt = Some(next);
            st.failure = Some((failure, now));
        }
    }
}

async fn order_once(
    ctx: &JobContext,
    replaces: Option<String>,
) -> Result<(Good, Duration), Failure> {
    let http = ca_client(ctx).await?;
    let ready = account::load_or_register(&ctx.client, &ctx.stack, &ctx.acme, &http).await?;
    ctx.state.lock().unwrap().thumbprint = Some(ready.thumbprint.clone());
    let gateway = order::GatewaySolver::new(
        ctx.config.gateway_url(&ctx.stack),
        ctx.config.self_check_patience,
    );
    let request = order::Request {
        hosts: ctx.stack.gateway.hosts.clone(),
        profile: ctx.acme.profile.clone(),
        replaces,
        key_algorithm: match ctx.acme.key_algorithm {
            crate::crd::KeyAlgorithm::EcdsaP256 => cert::KeyAlgorithm::EcdsaP256,
            crate::crd::KeyAlgorithm::EcdsaP384 => cert::KeyAlgorithm::EcdsaP384,
            crate::crd::KeyAlgorithm::Rsa2048 => cert::KeyAlgorithm::Rsa2048,
        },
    };
    let started = Instant::now();
    let Some(dns01) = &ctx.acme.dns01 else {
        return issue_with(ctx, &http, ready, &gateway, &request, started).await;
    };
    let progress = ctx.state.lock().unwrap().progress.clone();
    let secret = account::secret_value(
        &ctx.client,
        &ctx.stack.namespace,
        &dns01.rfc2136.tsig_secret,
        "spec.tls.acme.dns01.rfc2136.tsigSecretRef",
    )
    .await?;
    let key_source = format!(
        "Secret {}, key {:?}",
        dns01.rfc2136.tsig_secret.name, dns01.rfc2136.tsig_secret.key
    );
    let secret = account::decode_hmac(&secret).map_err(|e| {
        Failure::config(format!(
            "spec.tls.acme.dns01.rfc2136.tsigSecretRef: the TSIG secret in {key_source} is {e}"
        ))
    })?;
    let provider =
        dns01::Rfc2136::new(&dns01.rfc2136, secret, key_source, ctx.config.dns01_ns_port)?;
    let dns = dns01::Dns01Solver::new(
        provider,
        SecretLedger {
            client: ctx.client.clone(),
            stack: ctx.stack.clone(),
        },
        dns01.propagation_timeout,
        progress,
    );
    let solver = order::ByHost {
        first: dns,
        second: gateway,
        use_first: |host: &str| dns01.covers(host),
    };
    issue_with(ctx, &http, ready, &solver, &request, started).await
}

/// The order with `solver`, registering the account again when the CA forgot it; writes the
/// Secret.
async fn issue_with<S: order::Solver>(
    ctx: &JobContext,
    http: &account::CaClient,
    mut ready: account::Ready,
    solver: &S,
    request: &order::Request,
    started: Instant,
) -> Result<(Good, Duration), Failure> {
    let http = http.clone();
    let request = request.clone();
    let mut attempt = order::issue(
        &ready.account,
        &http,
        solver,
        &ready.thumbprint,
        &request,
        &ctx.metrics,
        SystemTime::now,
    )
    .await;
    if let Err(f) = &attempt
        && f.kind == FailureKind::AccountUnknown
    {
        // The CA forgot the account (a CA reset): register again with the same key, so the
        // thumbprint, and with it the gateway's configuration, stays the same.
        tracing::warn!(stack = %stack_key(&ctx.stack), message = %f.message, "registering the account again");
        let stored = account::read(&ctx.client, &ctx.stack).await?;
        ready =
            account::register(&ctx.client, &ctx.stack, &ctx.acme, &http, stored.as_ref()).await?;
        ctx.state.lock().unwrap().thumbprint = Some(ready.thumbprint.clone());
        attempt = order::issue(
            &ready.account,
            &http,
            solver,
            &ready.thumbprint,
            &request,
            &ctx.metrics,
            SystemTime::now,
        )
        .await;
    }
    let issued = attempt?;
    // The Secret may have been replaced by someone else's while the order ran.
    let name = names::tls_secret(&ctx.stack.name);
    let existing = Api::<Secret>::namespaced(ctx.client.clone(), &ctx.stack.namespace)
        .get_opt(&name)
        .await
        .map_err(|e| Failure::kube(format!("reading Secret {name}: {e}")))?;
    if let Some(existing) = existing
        && let Claim::Foreign(why) = ownership::claim(
            &existing.metadata,
            ctx.stack.name.as_str(),
            ctx.stack.uid.as_deref(),
        )
    {
        let conflict = NameConflict {
            kind: "Secret",
            name,
            why,
        };
        return Err(Failure::new(
            FailureKind::NameConflict,
            conflict.to_string(),
        ));
    }
    write_tls_secret(
        &ctx.client,
        &ctx.stack,
        &issued.chain_pem,
        &issued.key_pem,
        false,
    )
    .await
    .map_err(|e| {
        Failure::kube(format!(
            "writing Secret {}: {e}",
            names::tls_secret(&ctx.stack.name)
        ))
    })?;
    Ok((
        Good {
            crt: issued.chain_pem,
            key: issued.key_pem,
            leaf: issued.leaf,
        },
        started.elapsed(),
    ))
}

/// Annotation on `<stack>-tls`: the DNS-01 records written and not yet removed (JSON list of
/// `{name, value}`), written before each record is, under its own field manager.
pub const DNS01_RECORDS_ANNOTATION: &str = "opsconductor.io/dns01-records";
/// The field manager of [`DNS01_RECORDS_ANNOTATION`] (apart from the Secret's content, so
/// that neither write removes the other's fields).
const DNS01_MANAGER: &str = "opsconductor-operator-dns01";

/// The DNS-01 ledger kept in an annotation of the stack's certificate Secret: the Secret
/// exists before any order (the temporary certificate), belongs to the stack and goes with
/// it; a record listed there was written by this stack's orders and by nothing else.
struct SecretLedger {
    client: Client,
    stack: Stack,
}

impl dns01::Ledger for SecretLedger {
    async fn load(&self) -> Result<Vec<dns01::Record>, Failure> {
        let name = names::tls_secret(&self.stack.name);
        let secret = Api::<Secret>::namespaced(self.client.clone(), &self.stack.namespace)
            .get_opt(&name)
            .await
            .map_err(|e| Failure::kube(format!("reading Secret {name}: {e}")))?;
        let text = secret
            .and_then(|s| s.metadata.annotations)
            .and_then(|mut a| a.remove(DNS01_RECORDS_ANNOTATION));
        Ok(text
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default())
    }

    async fn save(&self, records: &[dns01::Record]) -> Result<(), Failure> {
        let name = names::tls_secret(&self.stack.name);
        // A merge patch: it never creates the Secret (gone with its stack, or replaced by
        // someone else's meanwhile: a 404 or a conflict, not a Secret made here).
        let listed = if records.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::Value::String(serde_json::to_string(records).unwrap_or_default())
        };
        let value = serde_json::json!({
            "metadata": {"annotations": {DNS01_RECORDS_ANNOTATION: listed}},
        });
        let params = PatchParams {
            field_manager: Some(DNS01_MANAGER.into()),
            ..PatchParams::default()
        };
        Api::<Secret>::namespaced(self.client.clone(), &self.stack.namespace)
            .patch(&name, &params, &Patch::Merge(&value))
            .await
            .map_err(|e| {
                Failure::kube(format!("recording DNS-01 records in Secret {name}: {e}"))
            })?;
        Ok(())
    }
}

/// Fetches the CA's renewal window for the certificate `serial`.
async fn renewal_info_job(ctx: JobContext, serial: String, ari_id: String) {
    let now = SystemTime::now();
    let result = async {
        let http = ca_client(&ctx).await?;
        let Some(stored) = account::read(&ctx.client, &ctx.stack).await? else {
            return Err(Failure::config("no ACME account yet"));
        };
        let account = instant_acme::Account::builder_with_http(Box::new(http.clone()))
            .from_credentials(
                serde_json::from_str(&stored.credentials_json)
                    .map_err(|e| Failure::config(e.to_string()))?,
            )
            .await
            .map_err(|e| Failure::from_acme("reading the CA's directory", e, &http))?;
        let (aki, serial_b64) = ari_id.split_once('.').unwrap_or_default();
        let id = instant_acme::CertificateIdentifier {
            authority_key_identifier: aki.to_string().into(),
            serial: serial_b64.to_string().into(),
        };
        order::timed(&ctx.metrics, "renewalInfo", account.renewal_info(&id))
            .await
            .map_err(|e| Failure::from_acme("fetching renewal information", e, &http))
    }
    .await;
    let mut st = ctx.state.lock().unwrap();
    let (window, retry) = match result {
        Ok((info, retry)) => {
            let at = |t: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(t.max(0) as u64);
            let window = Window {
                start: at(info.suggested_window.start.unix_timestamp()),
                end: at(info.suggested_window.end.unix_timestamp()),
            };
            tracing::info!(
                stack = %stack_key(&ctx.stack),
                %serial,
                start = %rfc3339(window.start),
                end = %rfc3339(window.end),
                "renewal information"
            );
            (Some(window), Some(retry))
        }
        // No ARI at this CA, or it failed: the default schedule applies; ask again later.
        Err(f) => {
            tracing::debug!(stack = %stack_key(&ctx.stack), message = %f.message, "no renewal information");
            (
                st.ari
                    .as_ref()
                    .filter(|a| a.serial == serial)
                    .and_then(|a| a.window),
                None,
            )
        }
    };
    let wait = policy::ari_recheck(retry, ctx.config.ari_min, ctx.config.ari_max);
    st.ari = Some(AriState {
        serial,
        window,
        next_check: now + wait,
    });
}

// ---------------------------------------------------------------------------------------------
// A user's own Secret

/// The status of a user-managed certificate Secret (`tls.secretName`), checked with
/// [`cert::inspect`]: (status, ok, reason, message).
pub fn user_secret_status(
    secret: Option<&Secret>,
    name: &str,
    namespace: &str,
    hosts: &[String],
    now: SystemTime,
) -> (CertificateStatus, bool, &'static str, String) {
    let mut status = CertificateStatus::pending();
    let Some(secret) = secret else {
        let message = format!("Secret {name} does not exist in namespace {namespace}");
        status.last_failure_reason = Some(message.clone());
        return (status, false, "SecretMissing", message);
    };
    let data = secret.data.clone().unwrap_or_default();
    let (Some(crt), Some(key)) = (data.get("tls.crt"), data.get("tls.key")) else {
        let message = format!("Secret {name} has no tls.crt and tls.key");
        status.state = CertificateState::Failed;
        status.last_failure_reason = Some(message.clone());
        return (status, false, "SecretInvalid", message);
    };
    if let Ok(leaf) = cert::parse_chain(&crt.0) {
        status.hosts = leaf.facts.hosts.clone();
        status.serial = Some(leaf.facts.serial.clone());
        status.not_before = Some(rfc3339(leaf.facts.not_before));
        status.not_after = Some(rfc3339(leaf.facts.not_after));
    }
    match cert::inspect(&crt.0, &key.0, hosts, now) {
        Ok(leaf) => {
            status.state = CertificateState::Valid;
            let message = format!(
                "serving certificate {} from Secret {name} (managed by you), valid until {}",
                leaf.facts.serial,
                rfc3339(leaf.facts.not_after)
            );
            (status, true, "SecretPresent", message)
        }
        // A key format ring cannot read (PKCS#1, SEC1) is not the user's error.
        Err(cert::CertError::Key(_)) if status.serial.is_some() => {
            status.state = CertificateState::Valid;
            let message = format!(
                "serving the certificate in Secret {name} (managed by you); its key is not in \
                 PKCS#8 form, so the key match was not checked"
            );
            (status, true, "SecretPresent", message)
        }
        Err(e) => {
            let message = format!("Secret {name}: {e}");
            status.state = CertificateState::Failed;
            status.last_failure_reason = Some(message.clone());
            (status, false, "SecretInvalid", message)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_secrets_show_serial_and_expiry_or_say_what_is_wrong() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let hosts = vec!["a.example".to_string()];
        let (crt, key) = cert::bootstrap(&hosts, now).unwrap();
        let secret = |crt: &str, key: &str| Secret {
            data: Some(BTreeMap::from([
                ("tls.crt".to_string(), ByteString(crt.as_bytes().to_vec())),
                ("tls.key".to_string(), ByteString(key.as_bytes().to_vec())),
            ])),
            ..Secret::default()
        };
        let (status, ok, reason, _) =
            user_secret_status(Some(&secret(&crt, &key)), "mine", "ns", &hosts, now);
        assert!(ok, "{status:?}");
        assert_eq!(reason, "SecretPresent");
        assert_eq!(status.state, CertificateState::Valid);
        assert!(status.serial.is_some());
        assert_eq!(
            status.not_after,
            Some(rfc3339(now + cert::BOOTSTRAP_LIFETIME))
        );

        let other = vec!["b.example".to_string()];
        let (status, ok, _, message) =
            user_secret_status(Some(&secret(&crt, &key)), "mine", "ns", &other, now);
        assert!(!ok);
        assert_eq!(status.state, CertificateState::Failed);
        assert_eq!(
            message,
            "Secret mine: the certificate does not cover b.example"
        );

        let (_, ok, reason, message) = user_secret_status(None, "mine", "ns", &hosts, now);
        assert!(!ok);
        assert_eq!(reason, "SecretMissing");
        assert_eq!(message, "Secret mine does not exist in namespace ns");
    }

    #[test]
    fn the_gateway_url_defaults_to_the_service_and_can_be_templated() {
        let stack = crate::validate::validate(
            &serde_yaml::from_str(
                "apiVersion: opsconductor.io/v1alpha1\nkind: OpsConductorStack\nmetadata: {name: prod, namespace: ops}\nspec:\n  gateway: {hosts: [a.example]}\n  tls: {acme: {directoryUrl: 'https://ca.test/dir', acceptTermsOfService: true}}\n  services: [{name: web, image: web:1, route: /}]\n",
            )
            .unwrap(),
            "ops",
        )
        .unwrap();
        let config = Config::default();
        assert_eq!(
            config.gateway_url(&stack),
            "http://prod-gateway.ops.svc.cluster.local"
        );
        let templated = Config {
            gateway_url: Some("http://127.0.0.1:8080/{namespace}/{stack}".into()),
            ..Config::default()
        };
        assert_eq!(
            templated.gateway_url(&stack),
            "http://127.0.0.1:8080/ops/prod"
        );
    }

    /// A reconcile that began before its stack went and goes on after the stack was
    /// forgotten gets no state (it looked after the forget) or cannot start a job on the one
    /// it holds (it looked before): either way no job runs for a gone stack.
    #[tokio::test]
    async fn a_forgotten_stack_gets_no_job_whenever_its_reconcile_looks() {
        let manager = Manager::new(Config::default(), Arc::new(Metrics::default()));
        let held = manager.state("ns/shop", Some("uid-1")).unwrap();
        assert_eq!(manager.known_stacks(), vec!["ns/shop".to_string()]);
        let running = manager.state("ns/other", Some("uid-2")).unwrap();
        running
            .lock()
            .unwrap()
            .start(Job::Order, std::future::pending());
        let handle_running = running
            .lock()
            .unwrap()
            .task
            .as_ref()
            .map(|(_, h)| h.abort_handle());

        manager.forget("ns", "shop");
        manager.forget("ns", "other");
        assert!(manager.known_stacks().is_empty());
        // Looked before the forget: the state it holds refuses to start a job.
        held.lock().unwrap().start(Job::Order, async {});
        assert!(held.lock().unwrap().task.is_none());
        // Looks after the forget: no state at all.
        assert!(manager.state("ns/shop", Some("uid-1")).is_none());
        assert!(manager.known_stacks().is_empty());
        // The running job was aborted.
        let aborted = handle_running.unwrap();
        for _ in 0..100 {
            if aborted.is_finished() {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(aborted.is_finished());
        // A new stack of the same name (another UID) is a stack like any other.
        let new = manager.state("ns/shop", Some("uid-3")).unwrap();
        new.lock()
            .unwrap()
            .start(Job::Order, std::future::pending());
        assert!(new.lock().unwrap().task.is_some());
        new.lock().unwrap().failures = 3;

        // Deleted and created again between two looks of the janitor: the new stack (another
        // UID) inherits neither the job nor the backoff, and the old one's job stops.
        let old_job = new
            .lock()
            .unwrap()
            .task
            .as_ref()
            .map(|(_, h)| h.abort_handle())
            .unwrap();
        let again = manager.state("ns/shop", Some("uid-4")).unwrap();
        assert!(!Arc::ptr_eq(&new, &again));
        assert!(again.lock().unwrap().task.is_none());
        assert_eq!(again.lock().unwrap().failures, 0);
        assert!(new.lock().unwrap().forgotten);
        for _ in 0..100 {
            if old_job.is_finished() {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(old_job.is_finished());
        assert!(manager.state("ns/shop", Some("uid-3")).is_none());
        // The same stack looked at again keeps its state.
        let same = manager.state("ns/shop", Some("uid-4")).unwrap();
        assert!(Arc::ptr_eq(&again, &same));
    }

    #[test]
    fn every_failure_reason_names_its_kind() {
        for kind in FailureKind::ALL {
            assert_eq!(FailureKind::from_reason(kind.reason()), Some(kind));
        }
        assert_eq!(FailureKind::from_reason("Issued"), None);
    }

    #[test]
    fn the_backoff_resumes_from_the_recorded_failures() {
        let t = |s: &str| parse_rfc3339(s).unwrap();
        let backoff = Backoff {
            first: Duration::from_secs(60),
            cap: Duration::from_secs(3600),
        };
        let recorded = |failed: i32, at: Option<&str>, next: Option<&str>, reason: &str| Recorded {
            certificate: Some(CertificateStatus {
                state: CertificateState::Failed,
                renewal_time: next.map(str::to_string),
                last_failure_reason: Some("challenge not reachable from the CA: x".into()),
                last_failure_time: at.map(str::to_string),
                failed_attempts: failed,
                ..CertificateStatus::pending()
            }),
            reason: Some(reason.into()),
        };
        // Two failures, the last at 10:00: the third attempt waits 2 minutes from then.
        let r = resume(
            &recorded(
                2,
                Some("2027-01-27T10:00:00Z"),
                Some("2027-01-27T10:02:00Z"),
                "ChallengeFailed",
            ),
            &backoff,
        )
        .unwrap();
        assert_eq!(r.failures, 2);
        assert_eq!(r.failed_at, t("2027-01-27T10:00:00Z"));
        assert_eq!(r.next_attempt, t("2027-01-27T10:02:00Z"));
        assert_eq!(r.failure.kind, FailureKind::ChallengeFailed);
        assert_eq!(r.failure.message, "challenge not reachable from the CA: x");
        // The backoff of this process counts, not the next attempt an earlier one computed
        // (it may have run with other settings)...
        let r = resume(
            &recorded(
                2,
                Some("2027-01-27T10:00:00Z"),
                Some("2027-01-27T12:00:00Z"),
                "ChallengeFailed",
            ),
            &backoff,
        )
        .unwrap();
        assert_eq!(r.next_attempt, t("2027-01-27T10:02:00Z"));
        // ...except a later one that may come from the CA's Retry-After.
        for reason in ["RateLimited", "CAUnreachable"] {
            let r = resume(
                &recorded(
                    2,
                    Some("2027-01-27T10:00:00Z"),
                    Some("2027-01-27T12:00:00Z"),
                    reason,
                ),
                &backoff,
            )
            .unwrap();
            assert_eq!(r.next_attempt, t("2027-01-27T12:00:00Z"), "{reason}");
        }
        // Many failures: the cap.
        let r = resume(
            &recorded(30, Some("2027-01-27T10:00:00Z"), None, "OrderInvalid"),
            &backoff,
        )
        .unwrap();
        assert_eq!(r.next_attempt, t("2027-01-27T11:00:00Z"));
        // Nothing to resume: no failure, no time, an unreadable time, no certificate status.
        assert_eq!(
            resume(
                &recorded(0, Some("2027-01-27T10:00:00Z"), None, "Issued"),
                &backoff
            ),
            None
        );
        assert_eq!(
            resume(&recorded(2, None, None, "ChallengeFailed"), &backoff),
            None
        );
        assert_eq!(
            resume(
                &recorded(2, Some("yesterday"), None, "ChallengeFailed"),
                &backoff
            ),
            None
        );
        assert_eq!(resume(&Recorded::default(), &backoff), None);
        // Stopped while the next order ran: the reason is no failure's, the backoff resumes.
        let r = resume(
            &recorded(1, Some("2027-01-27T10:00:00Z"), None, "Ordering"),
            &backoff,
        )
        .unwrap();
        assert_eq!(r.failure.kind, FailureKind::Earlier);
        assert_eq!(r.next_attempt, t("2027-01-27T10:01:00Z"));
    }

    #[test]
    fn failures_are_put_in_plain_words() {
        let http = account::CaClient::new(None, false).unwrap();
        let problem: instant_acme::Problem = serde_json::from_value(serde_json::json!({
            "type": "urn:ietf:params:acme:error:rateLimited",
            "detail": "too many certificates for this name",
            "status": 429
        }))
        .unwrap();
        let f = Failure::from_acme(
            "placing the order",
            instant_acme::Error::Api(problem),
            &http,
        );
        assert_eq!(f.kind, FailureKind::RateLimited);
        assert_eq!(
            f.message,
            "rate-limited: too many certificates for this name (rateLimited) (while placing the order)"
        );
        let problem: instant_acme::Problem = serde_json::from_value(serde_json::json!({
            "type": "urn:ietf:params:acme:error:rejectedIdentifier",
            "detail": "name is blocked",
            "status": 400
        }))
        .unwrap();
        let f = Failure::from_acme(
            "placing the order",
            instant_acme::Error::Api(problem),
            &http,
        );
        assert_eq!(f.kind, FailureKind::OrderInvalid);
        assert!(
            f.message.starts_with("order invalid: name is blocked"),
            "{}",
            f.message
        );
        let f = Failure::from_acme(
            "reading the CA's directory",
            instant_acme::Error::Other("connection refused".into()),
            &http,
        );
        assert_eq!(f.kind, FailureKind::CaUnreachable);
        assert_eq!(
            f.message,
            "CA unreachable: connection refused (while reading the CA's directory)"
        );
    }
}
