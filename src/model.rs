//! The validated model of a stack: what the builders are allowed to see.
//!
//! A [`Stack`] can only be made by [`crate::validate::validate`], so every name in it is a
//! DNS-1035 label, every derived object name fits, every reference points at something that
//! exists and every CIDR has been parsed. Builders never look at the raw custom resource.

use std::fmt;
use std::time::Duration;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{EnvVar, ResourceRequirements};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

pub use crate::crd::{GatewayServiceType, PolicyMode, ServiceToService};

/// A DNS-1035 label: lowercase letters, digits and `-`, starting with a letter, ending with a
/// letter or digit, at most 63 characters.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DnsLabel(String);

impl DnsLabel {
    /// Checks `s` and wraps it. The error says what is wrong, without the field path.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("must not be empty".into());
        }
        if s.len() > 63 {
            return Err(format!("{s:?} is longer than 63 characters"));
        }
        let bytes = s.as_bytes();
        if !bytes[0].is_ascii_lowercase() {
            return Err(format!(
                "{s:?} must start with a lowercase letter (DNS-1035 label)"
            ));
        }
        if !bytes[bytes.len() - 1].is_ascii_lowercase() && !bytes[bytes.len() - 1].is_ascii_digit()
        {
            return Err(format!(
                "{s:?} must end with a lowercase letter or digit (DNS-1035 label)"
            ));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
        {
            return Err(format!(
                "{s:?} contains {c:?}; only lowercase letters, digits and '-' are allowed (DNS-1035 label)"
            ));
        }
        Ok(Self(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DnsLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A TCP port, 1 to 65535.
pub type Port = u16;

/// A validated stack.
#[derive(Clone, Debug, PartialEq)]
pub struct Stack {
    pub name: DnsLabel,
    pub namespace: String,
    /// The stack's uid once the API server assigned one; owner references need it.
    pub uid: Option<String>,
    pub gateway: Gateway,
    pub tls: Tls,
    pub services: Vec<Service>,
    pub backends: Vec<Backend>,
    pub mode: PolicyMode,
    pub service_to_service: ServiceToService,
    /// The services' identity tokens, when `spec.serviceIdentity.enabled`.
    pub service_identity: Option<ServiceIdentity>,
}

impl Stack {
    pub fn service(&self, name: &DnsLabel) -> Option<&Service> {
        self.services.iter().find(|s| &s.name == name)
    }

    /// Whether the gateway connects to `svc`: it has a route, or it gives the verdicts of
    /// edge authentication (which needs no route of its own).
    pub fn gateway_reaches(&self, svc: &Service) -> bool {
        svc.route.is_some() || self.verdicts().is_some_and(|a| a.service == svc.name)
    }

    /// The verdict service of edge authentication, when at least one route uses it.
    pub fn verdicts(&self) -> Option<&EdgeAuth> {
        self.gateway
            .edge_auth
            .as_ref()
            .filter(|_| self.services.iter().any(|s| s.edge_auth.is_some()))
    }
}

/// Identity tokens of the services (`spec.serviceIdentity`, enabled).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceIdentity {
    /// `opsconductor.io/<namespace>/<stack>` ([`identity_audience`]).
    pub audience: String,
    /// Within [`crate::crd::IDENTITY_EXPIRATION_RANGE`].
    pub expiration_seconds: i64,
}

/// The audience of a stack's service identity tokens: `opsconductor.io/<namespace>/<stack>`.
/// Both parts are DNS labels (no `/`), so two stacks differ in their audience exactly when they
/// differ in namespace or name; a token of one never passes as a token of the other.
pub fn identity_audience(namespace: &str, stack: &DnsLabel) -> String {
    format!("opsconductor.io/{namespace}/{stack}")
}

/// The validated gateway.
#[derive(Clone, Debug, PartialEq)]
pub struct Gateway {
    /// Lowercase DNS names, in the order given.
    pub hosts: Vec<String>,
    pub image: String,
    pub replicas: i32,
    pub service_type: GatewayServiceType,
    pub allowed_source_ranges: Vec<IpNet>,
    /// Proxies whose word about the client address is taken; empty: nobody's.
    pub trusted_proxies: Vec<IpNet>,
    /// The listeners on 8080 and 8443 expect the PROXY protocol (then `trusted_proxies` is
    /// not empty).
    pub proxy_protocol: bool,
    /// Lowercase header names removed from requests before they go to a service: the
    /// built-in [`ALWAYS_STRIPPED_HEADERS`] first, then the spec's, without repeats.
    pub strip_request_headers: Vec<String>,
    pub rate_limit: Option<RateLimit>,
    /// Where routes with edge authentication get their verdicts.
    pub edge_auth: Option<EdgeAuth>,
    /// The Content-Security-Policy header, checked: printable ASCII that cannot end or escape
    /// an nginx string (no `"`, `\`, `$`, braces, control characters).
    pub content_security_policy: Option<ContentSecurityPolicy>,
    pub hsts: Hsts,
    /// nginx size syntax, checked: digits with an optional k/m/g suffix.
    pub client_max_body_size: String,
    pub timeouts: Timeouts,
    /// The gateway container's requests and limits: the spec's, or
    /// [`crate::build::gateway::default_resources`].
    pub resources: ResourceRequirements,
    /// The metrics exporter beside nginx, when `spec.gateway.metrics.enabled`.
    pub metrics: Option<GatewayMetrics>,
}

/// The gateway's metrics exporter (`spec.gateway.metrics`, enabled).
#[derive(Clone, Debug, PartialEq)]
pub struct GatewayMetrics {
    /// The exporter's image: the spec's, or [`crate::crd::DEFAULT_GATEWAY_IMAGE`].
    pub image: String,
    /// Who may scrape the metrics port; never empty (validation refuses an enabled exporter
    /// without it).
    pub allow_from: Vec<MetricsScraper>,
}

/// One peer allowed to scrape: pods (all when `pod_selector` is `None`) in the namespaces
/// `namespace_selector` matches. Both checked as the API server checks label selectors.
#[derive(Clone, Debug, PartialEq)]
pub struct MetricsScraper {
    pub namespace_selector: LabelSelector,
    pub pod_selector: Option<LabelSelector>,
}

/// Request headers the gateway always removes before proxying: the ones the seed's services
/// trust from each other (`X-Internal: true`, `X-Service: <caller>`), which must never come
/// from outside.
pub const ALWAYS_STRIPPED_HEADERS: [&str; 2] = ["x-internal", "x-service"];

/// Gateway-to-service timeouts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Duration,
    pub send: Duration,
    pub read: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    pub requests_per_second: u32,
    pub burst: u32,
}

/// The verdict service of edge authentication (issue 18).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EdgeAuth {
    /// A service of the stack.
    pub service: DnsLabel,
    /// A checked path (as a route's characters), without query.
    pub path: String,
    /// Header names of letters, digits and `-`, lowercase, none the gateway sets itself.
    pub pass_headers: Vec<String>,
    /// 0: no cache.
    pub cache_seconds: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContentSecurityPolicy {
    pub policy: String,
    pub report_only: bool,
}

/// Edge authentication of one route.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteAuth {
    /// Checked paths under the route (longer than it, not under a longer route of another
    /// service): ending in `/`, a prefix; otherwise one exact path.
    pub public_paths: Vec<String>,
}

/// A route's own limits (on top of the gateway's).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RouteLimits {
    pub rate: Option<Rate>,
    pub burst: u32,
    pub concurrent_requests_per_client: Option<u32>,
}

/// A sustained request rate, as nginx writes it (`5r/s`, `10r/m`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rate {
    PerSecond(u32),
    PerMinute(u32),
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rate::PerSecond(n) => write!(f, "{n}r/s"),
            Rate::PerMinute(n) => write!(f, "{n}r/m"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hsts {
    pub max_age_seconds: u64,
    pub include_sub_domains: bool,
    pub preload: bool,
}

/// Where the certificate comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum CertificateSource {
    Acme(Acme),
    /// A user-managed `kubernetes.io/tls` Secret.
    Secret(String),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Tls {
    pub source: CertificateSource,
    pub renew_before: Option<Duration>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Acme {
    pub directory_url: String,
    pub email: Option<String>,
    pub external_account_binding: Option<(String, SecretKey)>,
    pub ca_bundle: Option<SecretKey>,
    pub profile: Option<String>,
    pub key_algorithm: crate::crd::KeyAlgorithm,
    /// Boxed: most stacks have none, and it would make every certificate source as large.
    pub dns01: Option<Box<Dns01>>,
}

/// Validated DNS-01 settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dns01 {
    /// Lowercase domains whose hosts use DNS-01; empty: every host.
    pub domains: Vec<String>,
    pub propagation_timeout: std::time::Duration,
    pub rfc2136: Rfc2136,
}

impl Dns01 {
    /// Whether `host` (possibly `*.name`) is validated with DNS-01.
    pub fn covers(&self, host: &str) -> bool {
        let name = host.strip_prefix("*.").unwrap_or(host);
        self.domains.is_empty()
            || self
                .domains
                .iter()
                .any(|d| name == d || name.ends_with(&format!(".{d}")))
    }
}

/// Validated RFC 2136 settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rfc2136 {
    /// `host:port` as written (port added when missing).
    pub nameserver: String,
    /// Lowercase, without the trailing dot.
    pub zone: Option<String>,
    pub tsig_key_name: String,
    pub tsig_algorithm: crate::crd::TsigAlgorithm,
    pub tsig_secret: SecretKey,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretKey {
    pub name: String,
    pub key: String,
}

/// A validated internal service.
#[derive(Clone, Debug, PartialEq)]
pub struct Service {
    pub name: DnsLabel,
    pub image: String,
    pub port: Port,
    pub replicas: i32,
    /// Starts and ends with `/`, made only of URL path characters that are safe in nginx.
    pub route: Option<String>,
    /// Requests on the route need a verdict from [`Gateway::edge_auth`] (then `route` is set).
    pub edge_auth: Option<RouteAuth>,
    /// The route's own limits (then `route` is set).
    pub route_limits: Option<RouteLimits>,
    pub health_path: String,
    pub env: Vec<EnvVar>,
    pub resources: Option<ResourceRequirements>,
    /// Services this one may call, each one that exists in the stack, no duplicates.
    pub calls: Vec<DnsLabel>,
    pub egress: Vec<Egress>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Egress {
    pub cidr: IpNet,
    pub ports: Vec<Port>,
}

/// A validated backend.
#[derive(Clone, Debug, PartialEq)]
pub struct Backend {
    pub name: DnsLabel,
    /// Not empty: an empty selector would select every pod, the stack's own included.
    pub pod_selector: LabelSelector,
    pub ports: Vec<Port>,
    pub allow_from: Vec<DnsLabel>,
}
