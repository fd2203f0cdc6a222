//! The `OpsConductorStack` custom resource (`opsconductor.io/v1alpha1`).
//!
//! These types are the user-facing contract (see `docs/api.md`). The CRD YAML in
//! `crds/` is generated from them by `opsconductor-operator crd`; rustdoc on every field becomes
//! `kubectl explain` text, so it is written for the people who write stacks.
//!
//! Rules that the API server can check by itself (ranges, lengths, enums, "exactly one of",
//! unique names) live in the schema and in CEL `x-kubernetes-validations`, so a bad stack is
//! rejected at admission. Everything else is checked by [`crate::validate`].

use k8s_openapi::api::core::v1::{EnvVar, ResourceRequirements};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The operator's own image, published with each release under its version: the gateway's
/// `requests` sidecar (`spec.gateway.metrics`) runs the operator's binary from it
/// (`opsconductor-operator gateway-requests`).
pub const DEFAULT_OPERATOR_IMAGE: &str = concat!(
    "ghcr.io/opsconductor/opsconductor-operator:",
    env!("CARGO_PKG_VERSION")
);

/// The default image of the gateway: the project's own, built from `images/gateway/Dockerfile`
/// (Debian 12's nginx, uid 101, listening on 8080/8443) and published with each release under
/// the operator's version; `docs/images.md`.
pub const DEFAULT_GATEWAY_IMAGE: &str = concat!(
    "ghcr.io/opsconductor/opsconductor-gateway:",
    env!("CARGO_PKG_VERSION")
);

/// One stack of internal HTTP services behind one TLS gateway, with the network policy that
/// keeps it that way.
// The `printcolumn` entries repeat `type_ = "string"` by design; clippy reads them as
// duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "opsconductor.io",
    version = "v1alpha1",
    kind = "OpsConductorStack",
    plural = "opsconductorstacks",
    shortname = "ocs",
    namespaced,
    status = "OpsConductorStackStatus",
    doc = "A stack of internal HTTP services behind one TLS gateway, with certificates, NetworkPolicies and enforcement managed by opsconductor-operator.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="Ready")].status"#
    ),
    printcolumn(
        name = "Services",
        type_ = "string",
        json_path = ".status.services.summary"
    ),
    printcolumn(name = "Host", type_ = "string", json_path = ".spec.gateway.hosts[0]"),
    printcolumn(
        name = "Certificate",
        type_ = "string",
        json_path = ".status.certificate.state"
    ),
    printcolumn(
        name = "Expires",
        type_ = "string",
        json_path = ".status.certificate.notAfter"
    ),
    printcolumn(
        name = "Violations",
        type_ = "integer",
        json_path = ".status.violationCount"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct OpsConductorStackSpec {
    /// The one external entry point of the stack. TLS terminates here; everything behind it
    /// speaks plain HTTP to ClusterIP Services.
    pub gateway: GatewaySpec,
    /// Where the gateway's certificate comes from: exactly one of `acme` or `secretName`.
    pub tls: TlsSpec,
    /// The internal services of the stack (1 to 200). Each becomes a Deployment and a
    /// ClusterIP Service named exactly like the service.
    #[schemars(length(min = 1, max = 200))]
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "self.all(s, self.exists_one(t, t.name == s.name))",
         "message": "service names must be unique within the stack"},
        {"rule": "self.all(s, !has(s.route) || self.exists_one(t, has(t.route) && t.route == s.route))",
         "message": "routes must be unique within the stack"}
    ]))]
    pub services: Vec<ServiceSpec>,
    /// Existing workloads in the namespace (databases, caches, object stores) that some
    /// services may reach. The operator does not run them; it only writes the NetworkPolicy
    /// that admits exactly the services listed in `allowFrom`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100))]
    pub backends: Vec<BackendSpec>,
    /// How strictly the policy is enforced.
    #[serde(default)]
    pub policy: PolicySpec,
    /// An identity for every service of the stack to present to the others: a ServiceAccount
    /// token bound to the stack's audience, mounted into each service container and renewed
    /// by the kubelet. Absent (the default): no token is mounted. See `docs/gateway.md`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_identity: Option<ServiceIdentitySpec>,
}

/// Tokens the services of a stack present to one another (`Authorization: Bearer`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceIdentitySpec {
    /// Mount a token into every service container: a projected ServiceAccount token of the
    /// service's own ServiceAccount, for the audience `opsconductor.io/<namespace>/<stack>`,
    /// at the path in `OPSC_IDENTITY_TOKEN_FILE`. Default false. Switching it rolls the
    /// services' pods once.
    #[serde(default)]
    pub enabled: bool,
    /// Lifetime of each token in seconds, 600 to 86400. Default 3600. The kubelet writes a new
    /// token when 80% of it has passed (or after 24 hours), so a token read from the file is
    /// always valid for at least a fifth of this.
    #[serde(default = "default_identity_expiration")]
    #[schemars(range(min = 600, max = 86400))]
    pub expiration_seconds: i64,
}

/// Shortest and longest lifetime of a service identity token (`expirationSeconds`): the API
/// server refuses projected tokens below 10 minutes; the kubelet renews any token after 24 hours
/// at the latest, so a longer one only lives longer once stolen.
pub const IDENTITY_EXPIRATION_RANGE: std::ops::RangeInclusive<i64> = 600..=86_400;

fn default_identity_expiration() -> i64 {
    3600
}

/// The TLS gateway (nginx).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.proxyProtocol) || !self.proxyProtocol || (has(self.trustedProxies) && size(self.trustedProxies) > 0)",
     "message": "proxyProtocol: true needs trustedProxies, the addresses of the proxies that send it"}
]))]
pub struct GatewaySpec {
    /// DNS names served by the gateway (1 to 100). The certificate covers all of them; a
    /// request for any other name is refused during the TLS handshake.
    #[schemars(length(min = 1, max = 100), inner(length(min = 1, max = 253)))]
    pub hosts: Vec<String>,
    /// The nginx image (nginx 1.22 or later). Default: the project's gateway image. The pod
    /// runs it as uid 101 with a read-only root filesystem; it needs `sh`, `cat`, `cksum` and
    /// `sleep` on PATH (the certificate-reload loop); nginx listens on 8080 and 8443.
    #[serde(default = "default_gateway_image")]
    #[schemars(length(min = 1, max = 512))]
    pub image: String,
    /// Number of gateway pods.
    #[serde(default = "default_gateway_replicas")]
    #[schemars(range(min = 1, max = 100))]
    pub replicas: i32,
    /// How the gateway is exposed: `LoadBalancer` (default), `NodePort`, or `ClusterIP` (behind
    /// an ingress or load balancer that already exists in the cluster).
    #[serde(default)]
    pub service_type: GatewayServiceType,
    /// CIDRs allowed to reach ports 80 and 443. Empty means everyone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100), inner(length(max = 43)))]
    pub allowed_source_ranges: Vec<String>,
    /// Addresses (CIDRs) of the proxies or load balancers in front of the gateway whose word
    /// about the client's address is taken: the address in the PROXY protocol header (with
    /// `proxyProtocol: true`) or, otherwise, in `X-Forwarded-For`. The rate limits and the
    /// access log then see the real client. Empty (the default): nobody is trusted, the client
    /// is the TCP peer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100), inner(length(max = 43)))]
    pub trusted_proxies: Vec<String>,
    /// The gateway's listeners on 80 and 443 expect the PROXY protocol (v1 or v2) on every
    /// connection; a connection without it is closed. Needs `trustedProxies`. With
    /// `tls.acme`, the proxy must send it on port 80 too: the CA's HTTP-01 validation comes
    /// through it. Default false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub proxy_protocol: bool,
    /// Request headers removed before a request goes to a service, on top of `X-Internal` and
    /// `X-Service`, which are always removed: headers the services trust from each other
    /// must never come from outside. Names of letters, digits and `-`, any case.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 50),
        inner(length(min = 1, max = 64), pattern(r"^[A-Za-z0-9-]+$"))
    )]
    pub strip_request_headers: Vec<String>,
    /// Per-client-address rate limit. Requests beyond it get HTTP 429.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitSpec>,
    /// The auth service that gives verdicts for the routes with `edgeAuth`: before such a
    /// request is proxied, the gateway asks this service (nginx `auth_request`) and passes the
    /// request on only on a 2xx answer; 401 and 403 go back to the client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edge_auth: Option<EdgeAuthSpec>,
    /// A Content-Security-Policy header on every HTTPS response (errors included). Absent by
    /// default: a policy that fits one app breaks another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_security_policy: Option<ContentSecurityPolicySpec>,
    /// The Strict-Transport-Security header sent on every HTTPS response.
    #[serde(default)]
    pub hsts: HstsSpec,
    /// Largest request body the gateway accepts, in nginx size syntax (`10m`, `512k`).
    /// Larger bodies get HTTP 413.
    #[serde(default = "default_client_max_body_size")]
    #[schemars(length(min = 1, max = 16))]
    pub client_max_body_size: String,
    /// Timeouts of the gateway's connections to the services.
    #[serde(default)]
    pub timeouts: ProxyTimeouts,
    /// CPU and memory requests and limits of the gateway container. Default (when absent):
    /// requests `cpu: 100m`, `memory: 64Mi`; limits `memory: 512Mi`. Given, it replaces the
    /// default as a whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// The gateway's own metrics for Prometheus: nginx's connection and request counters
    /// (`stub_status`) served by an exporter beside nginx in each gateway pod, on port 9113,
    /// and requests by route and status class with their latency, served by a second one
    /// (the operator's own binary) on port 9114; both reachable only from `allowFrom`.
    /// Absent (the default): no exporter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<GatewayMetricsSpec>,
}

/// The exporter of the gateway's metrics (a sidecar in each gateway pod).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.enabled) || !self.enabled || (has(self.allowFrom) && size(self.allowFrom) > 0)",
     "message": "metrics.enabled needs allowFrom, the namespaces (and pods) of the Prometheus that scrapes the gateways"}
]))]
pub struct GatewayMetricsSpec {
    /// Run the exporter. Default false. Switching it on or off rolls the gateway pods once.
    #[serde(default)]
    pub enabled: bool,
    /// Who may connect to the metrics ports 9113 and 9114: each entry is one peer, pods matching
    /// `podSelector` (all pods when absent) in the namespaces matching `namespaceSelector`.
    /// Nothing else reaches the port. Needed when `enabled`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10))]
    pub allow_from: Vec<MetricsScraperSpec>,
    /// The image of the exporter on port 9113: it must hold `prometheus-nginx-exporter` on
    /// PATH (Debian's build of nginx's exporter, 0.11 or later) and run as uid 101. Default:
    /// the project's gateway image, which carries it. The operator's gateway image allow-list
    /// applies to it too. (The exporter on 9114 runs from the operator's own image.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,
}

/// Pods allowed to scrape the gateway's metrics.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MetricsScraperSpec {
    /// The namespaces of the scraping pods, e.g. `matchLabels:
    /// {kubernetes.io/metadata.name: monitoring}`. An empty selector means every namespace.
    pub namespace_selector: LabelSelector,
    /// The scraping pods in those namespaces, e.g. `matchLabels: {app.kubernetes.io/name:
    /// prometheus}`. Absent: every pod there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
}

/// Timeouts between the gateway and the services, in seconds.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProxyTimeouts {
    /// Time to establish a connection to a service.
    #[serde(default = "default_connect_timeout")]
    #[schemars(range(min = 1, max = 300))]
    pub connect_seconds: i32,
    /// Longest pause between two writes of a request to a service.
    #[serde(default = "default_io_timeout")]
    #[schemars(range(min = 1, max = 3600))]
    pub send_seconds: i32,
    /// Longest pause between two reads of a response from a service.
    #[serde(default = "default_io_timeout")]
    #[schemars(range(min = 1, max = 3600))]
    pub read_seconds: i32,
}

impl Default for ProxyTimeouts {
    fn default() -> Self {
        Self {
            connect_seconds: default_connect_timeout(),
            send_seconds: default_io_timeout(),
            read_seconds: default_io_timeout(),
        }
    }
}

/// How the gateway Service is exposed outside the cluster.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum GatewayServiceType {
    /// A cloud or bare-metal load balancer (the default).
    #[default]
    LoadBalancer,
    /// A port on every node.
    NodePort,
    /// Reachable only inside the cluster: for a gateway behind an existing ingress controller
    /// or load balancer.
    #[serde(rename = "ClusterIP")]
    ClusterIp,
}

/// A token-bucket rate limit per client address.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitSpec {
    /// Sustained requests per second allowed for one client address.
    #[schemars(range(min = 1, max = 100000))]
    pub requests_per_second: i32,
    /// Requests allowed above the sustained rate in a short burst.
    #[serde(default)]
    #[schemars(range(min = 0, max = 100000))]
    pub burst: i32,
}

/// The service that gives the gateway its verdicts on requests to routes with `edgeAuth`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EdgeAuthSpec {
    /// A service of this stack (it needs no route). The gateway may reach it on its port.
    #[schemars(length(min = 1, max = 63))]
    pub service: String,
    /// The path on that service that answers the verdict, e.g. `/api/v1/auth/verify`. It gets
    /// a GET with the client's headers (`Authorization` included, no body) and
    /// `X-Original-URI`, `X-Original-Method`; it answers 2xx (pass), 401 or 403.
    #[schemars(length(min = 1, max = 256))]
    pub path: String,
    /// Headers of a 2xx verdict passed on to the service behind the route, e.g. `X-User-Id`.
    /// The gateway removes them from every client request first, on every route: a client
    /// can never send them itself. Names of letters, digits and `-`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 20),
        inner(length(min = 1, max = 64), pattern(r"^[A-Za-z0-9-]+$"))
    )]
    pub pass_headers: Vec<String>,
    /// How long a verdict is reused, per route and `Authorization` header value, instead of
    /// asking again (0 to 300 seconds). 0, the default: every request is checked. A request
    /// without `Authorization` is never answered from the cache.
    #[serde(default, skip_serializing_if = "is_zero")]
    #[schemars(range(min = 0, max = 300))]
    pub cache_seconds: i32,
}

fn is_zero(v: &i32) -> bool {
    *v == 0
}

/// The Content-Security-Policy header.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ContentSecurityPolicySpec {
    /// The policy, e.g. `default-src 'self'; frame-ancestors 'none'`. Printable ASCII without
    /// `"`, `\`, `$`, `{` or `}`.
    #[schemars(length(min = 1, max = 4096))]
    pub policy: String,
    /// Send it as `Content-Security-Policy-Report-Only`: browsers report violations and block
    /// nothing (to try a policy out first).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub report_only: bool,
}

/// Edge authentication of one route.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteAuthSpec {
    /// Paths under the route that skip the check, e.g. `/api/v1/auth/login`. A path ending
    /// in `/` covers everything under it; any other path only itself (no query string).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 50), inner(length(min = 1, max = 256)))]
    pub public_paths: Vec<String>,
}

/// Limits of one route, on top of the gateway's own (`spec.gateway.rateLimit` and the 256
/// requests in progress per client address): they can only make a route stricter.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!(has(self.requestsPerSecond) && has(self.requestsPerMinute))",
     "message": "at most one of requestsPerSecond and requestsPerMinute"}
]))]
pub struct RouteLimitsSpec {
    /// Sustained requests per second per client address on this route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub requests_per_second: Option<i32>,
    /// Sustained requests per minute per client address on this route (for slow ones such
    /// as a login).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000000))]
    pub requests_per_minute: Option<i32>,
    /// Requests allowed above the rate in a short burst. Needs a rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100000))]
    pub burst: Option<i32>,
    /// Requests one client address may have in progress on this route (HTTP/2 streams count
    /// one each), 1 to 256; more get 429.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 256))]
    pub concurrent_requests_per_client: Option<i32>,
}

/// HTTP Strict Transport Security.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HstsSpec {
    /// How long browsers remember to use HTTPS only, in seconds. 0 tells them to forget.
    #[serde(default = "default_hsts_max_age")]
    #[schemars(range(min = 0))]
    pub max_age_seconds: i64,
    /// Apply the rule to every subdomain of the hosts too.
    #[serde(default = "default_true")]
    pub include_sub_domains: bool,
    /// Ask to be included in browsers' preload lists. Needs `includeSubDomains` and a
    /// `maxAgeSeconds` of at least one year.
    #[serde(default)]
    pub preload: bool,
}

impl Default for HstsSpec {
    fn default() -> Self {
        Self {
            max_age_seconds: default_hsts_max_age(),
            include_sub_domains: true,
            preload: false,
        }
    }
}

/// Where the gateway's certificate comes from.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.acme) != has(self.secretName)",
     "message": "exactly one of tls.acme or tls.secretName must be set"}
]))]
pub struct TlsSpec {
    /// Obtain and renew the certificate from an ACME CA (for example Let's Encrypt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acme: Option<AcmeSpec>,
    /// Renew this long before the certificate expires (Go duration, e.g. `720h`). By default
    /// the certificate is renewed at 2/3 of its lifetime, or earlier when the CA's renewal
    /// information says so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    pub renew_before: Option<String>,
    /// Use your own `kubernetes.io/tls` Secret in the stack's namespace instead of ACME.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: Option<String>,
}

/// An ACME account and CA.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AcmeSpec {
    /// The CA's ACME directory URL (https).
    #[schemars(length(min = 1, max = 2048))]
    pub directory_url: String,
    /// Contact address registered with the account; the CA may send expiry warnings there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 254))]
    pub email: Option<String>,
    /// You accept the CA's terms of service. Must be true: the operator registers no account
    /// otherwise.
    #[serde(default)]
    pub accept_terms_of_service: bool,
    /// External Account Binding, required by some CAs (ZeroSSL, Google, private CAs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_account_binding: Option<ExternalAccountBinding>,
    /// A CA bundle (PEM) to trust when talking to a private ACME server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_bundle_secret_ref: Option<SecretKeyRef>,
    /// The ACME profile to ask the CA for (e.g. `tlsserver`, `shortlived`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub profile: Option<String>,
    /// Key type of the certificate; a new key is generated for every issuance.
    #[serde(default)]
    pub key_algorithm: KeyAlgorithm,
    /// Answer DNS-01 challenges (TXT records at `_acme-challenge.<host>`) instead of HTTP-01,
    /// for every host or for the hosts under `dns01.domains`. Needed for wildcard hosts and
    /// for gateways the CA cannot reach (`allowedSourceRanges`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns01: Option<Dns01Spec>,
}

/// DNS-01 challenges: which hosts, and the DNS provider that writes the TXT records.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Dns01Spec {
    /// The gateway hosts validated with DNS-01: a host is when it equals one of these domains
    /// or lies below one (`example.com` covers `example.com`, `*.example.com` and
    /// `a.b.example.com`); the other hosts use HTTP-01. Empty (the default): every host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100), inner(length(min = 1, max = 253)))]
    pub domains: Vec<String>,
    /// How long to wait for every authoritative server of the zone to serve the TXT records
    /// before telling the CA (seconds, 1 to 3600). Default 300.
    #[serde(default = "default_propagation_timeout")]
    #[schemars(range(min = 1, max = 3600))]
    pub propagation_timeout_seconds: i32,
    /// RFC 2136 dynamic update, authenticated with TSIG (BIND, Knot, PowerDNS, Windows DNS,
    /// several managed DNS services).
    pub rfc2136: Rfc2136Spec,
}

fn default_propagation_timeout() -> i32 {
    300
}

/// An authoritative server accepting RFC 2136 dynamic updates signed with a TSIG key.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Rfc2136Spec {
    /// The primary server that takes the updates: `host` or `host:port` (port 53 by default;
    /// an IPv6 address in brackets, `[2001:db8::53]:53`).
    #[schemars(length(min = 1, max = 261))]
    pub nameserver: String,
    /// The zone to update (e.g. `example.com`). Default: found by asking the nameserver for
    /// the SOA of each `_acme-challenge` name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub zone: Option<String>,
    /// The TSIG key's name, as the server knows it.
    #[schemars(length(min = 1, max = 253))]
    pub tsig_key_name: String,
    /// The TSIG algorithm.
    #[serde(default)]
    pub tsig_algorithm: TsigAlgorithm,
    /// The TSIG secret (base64, as `tsig-keygen` or `keymgr` print it) in a Secret of the
    /// stack's namespace.
    pub tsig_secret_ref: SecretKeyRef,
}

/// A TSIG HMAC algorithm (RFC 8945).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum TsigAlgorithm {
    /// HMAC-SHA256 (the default).
    #[default]
    #[serde(rename = "hmac-sha256")]
    HmacSha256,
    /// HMAC-SHA384.
    #[serde(rename = "hmac-sha384")]
    HmacSha384,
    /// HMAC-SHA512.
    #[serde(rename = "hmac-sha512")]
    HmacSha512,
}

/// Private key type of the gateway certificate.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum KeyAlgorithm {
    /// ECDSA on curve P-256 (the default): fast handshakes, accepted everywhere.
    #[default]
    #[serde(rename = "ECDSA-P256")]
    EcdsaP256,
    /// ECDSA on curve P-384.
    #[serde(rename = "ECDSA-P384")]
    EcdsaP384,
    /// RSA with a 2048-bit modulus, for clients that cannot use ECDSA certificates. Slower
    /// handshakes; each new key takes the operator a fraction of a second to make.
    #[serde(rename = "RSA-2048")]
    Rsa2048,
}

/// External Account Binding credentials.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExternalAccountBinding {
    /// The key identifier given by the CA.
    #[schemars(length(min = 1, max = 512))]
    pub key_id: String,
    /// The Secret key holding the base64url HMAC key given by the CA.
    pub hmac_key_secret_ref: SecretKeyRef,
}

/// A key in a Secret of the stack's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// One internal service: a Deployment and a ClusterIP Service, plain HTTP.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    /// DNS-1035 label, unique in the stack. The Deployment and Service get exactly this name,
    /// so other services reach it at `http://<name>:<port>`.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// Container image.
    #[schemars(length(min = 1, max = 512))]
    pub image: String,
    /// The HTTP port the container listens on; the Service exposes the same port.
    #[serde(default = "default_service_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Number of pods.
    #[serde(default = "default_service_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,
    /// Path prefix under which the gateway exposes this service, starting and ending with `/`.
    /// Absent means internal only: never reachable from outside.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "self.startsWith('/') && self.endsWith('/')",
         "message": "route must start and end with '/'"}
    ]))]
    pub route: Option<String>,
    /// Requests on the route need a 2xx verdict from `spec.gateway.edgeAuth` first, except
    /// on `publicPaths`. Needs `route`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edge_auth: Option<RouteAuthSpec>,
    /// Rate and concurrency limits of the route, per client address and gateway pod, on top of
    /// the gateway's. Needs `route`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route_limits: Option<RouteLimitsSpec>,
    /// HTTP path used for the readiness and liveness probes.
    #[serde(default = "default_health_path")]
    #[schemars(length(min = 1, max = 256))]
    pub health_path: String,
    /// Environment variables of the container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// CPU and memory requests and limits of the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Services of this stack that this one may call (the service-to-service allow-list).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 200), inner(length(min = 1, max = 63)))]
    pub calls: Vec<String>,
    /// Extra egress beyond the stack, e.g. SSH to managed hosts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 50))]
    pub egress: Vec<EgressRule>,
}

/// Traffic a service may send outside the stack.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EgressRule {
    /// Destination network, e.g. `10.20.0.0/16`.
    #[schemars(length(min = 1, max = 43))]
    pub cidr: String,
    /// Destination TCP ports (at least one).
    #[schemars(length(min = 1, max = 20), inner(range(min = 1, max = 65535)))]
    pub ports: Vec<i32>,
    /// Must be true for a CIDR wider than /8 (IPv4) or /16 (IPv6), such as `0.0.0.0/0` or
    /// `::/0`: an explicit yes to egress to most of the internet.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_wide: bool,
}

/// An existing workload in the namespace that some services may reach.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackendSpec {
    /// Name of the backend (DNS-1035 label), used to name its NetworkPolicy.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// Selects the backend's pods in the stack's namespace. Must not be empty.
    pub pod_selector: LabelSelector,
    /// TCP ports of the backend that the listed services may reach.
    #[schemars(length(min = 1, max = 20), inner(range(min = 1, max = 65535)))]
    pub ports: Vec<i32>,
    /// Services of this stack that may reach the backend. Nothing else can.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 200), inner(length(min = 1, max = 63)))]
    pub allow_from: Vec<String>,
}

/// How the policy is enforced.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicySpec {
    /// `Enforce` (default) reverts drift and writes policies; `Audit` only reports.
    #[serde(default)]
    pub mode: PolicyMode,
    /// `Declared` (default): a service reaches only the services in its `calls`.
    /// `All`: any service of the stack reaches any other.
    #[serde(default)]
    pub service_to_service: ServiceToService,
}

/// Enforcement mode.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum PolicyMode {
    /// Revert drift on managed objects and generate policies.
    #[default]
    Enforce,
    /// Report violations and drift only; change nothing that was changed by others.
    Audit,
}

/// Which service-to-service traffic is allowed.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ServiceToService {
    /// Only the edges declared in `calls`.
    #[default]
    Declared,
    /// Any service of the stack may call any other.
    All,
}

/// What the operator observed and did.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OpsConductorStackStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `ServicesReady`, `GatewayReady`, `CertificateReady`, `PolicyEnforced`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Ready and total services.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub services: Option<ServicesStatus>,
    /// The gateway's ready pods and external address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<GatewayStatus>,
    /// The gateway certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<CertificateStatus>,
    /// Objects in the namespace that break the edge-TLS / internal-HTTP policy (at most 50
    /// listed; `violationCount` has the total).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub violations: Vec<Violation>,
    /// Total number of violations found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub violation_count: Option<i32>,
}

/// Services ready out of the total.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct ServicesStatus {
    /// Services whose Deployment has all desired replicas ready.
    pub ready: i32,
    /// Services in the stack.
    pub total: i32,
    /// `ready/total`, as shown by `kubectl get ocs`.
    pub summary: String,
}

/// Gateway state.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GatewayStatus {
    /// Ready gateway pods.
    pub ready_replicas: i32,
    /// External address (load balancer IP or hostname) once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
}

/// Certificate lifecycle state.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum CertificateState {
    /// No certificate yet.
    Pending,
    /// An order is in progress.
    Issuing,
    /// A certificate covering all hosts is in use.
    Valid,
    /// A renewal order is in progress; the current certificate stays in use.
    Renewing,
    /// Issuance keeps failing; see `lastFailureReason`.
    Failed,
}

/// The gateway certificate.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CertificateStatus {
    /// Pending, Issuing, Valid, Renewing or Failed.
    pub state: CertificateState,
    /// DNS names the current certificate covers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// Serial number (hex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// Start of validity (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<String>,
    /// End of validity (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<String>,
    /// When the operator will renew (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renewal_time: Option<String>,
    /// Why issuance is stuck, in plain words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure_reason: Option<String>,
    /// When issuance last failed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure_time: Option<String>,
    /// Failed attempts since the last success.
    #[serde(default)]
    pub failed_attempts: i32,
}

impl CertificateStatus {
    /// No certificate yet: the state before anything is known or issued.
    pub fn pending() -> Self {
        Self {
            state: CertificateState::Pending,
            hosts: vec![],
            serial: None,
            not_before: None,
            not_after: None,
            renewal_time: None,
            last_failure_reason: None,
            last_failure_time: None,
            failed_attempts: 0,
        }
    }
}

/// An object that breaks the policy.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, JsonSchema)]
pub struct Violation {
    /// Kind of the object.
    pub kind: String,
    /// Name of the object.
    pub name: String,
    /// What is wrong, in plain words.
    pub reason: String,
}

fn default_gateway_image() -> String {
    DEFAULT_GATEWAY_IMAGE.to_string()
}
fn default_gateway_replicas() -> i32 {
    2
}
fn default_client_max_body_size() -> String {
    "10m".to_string()
}
fn default_hsts_max_age() -> i64 {
    31_536_000
}
fn default_connect_timeout() -> i32 {
    15
}
fn default_io_timeout() -> i32 {
    60
}
fn default_true() -> bool {
    true
}
fn default_service_port() -> i32 {
    8000
}
fn default_service_replicas() -> i32 {
    1
}
fn default_health_path() -> String {
    "/health".to_string()
}
