//! Prometheus metrics of the operator, in the Prometheus text format (version 0.0.4).
//!
//! Every series goes through a typed family declared here (prometheus-client): a metric that is
//! not registered cannot be written, and label values are bounded (kinds, reasons and outcomes
//! from fixed sets; a stack's `namespace` and `name`, whose series go when the stack goes).

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Upper bounds of the reconcile duration histogram, in seconds.
const BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Upper bounds of the ACME request latency histogram, in seconds.
const ACME_BUCKETS: &[f64] = &[0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

/// The labels of a per-stack series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct StackLabels {
    pub namespace: String,
    pub name: String,
}

impl StackLabels {
    /// From a stack key, `namespace/name`.
    pub fn from_key(key: &str) -> Self {
        let (namespace, name) = key.split_once('/').unwrap_or(("", key));
        Self {
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }

    fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindCause {
    kind: &'static str,
    cause: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindAction {
    kind: &'static str,
    action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TypeOutcome {
    r#type: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TypeLabel {
    r#type: &'static str,
}

type FloatGauge = Gauge<f64, AtomicU64>;

fn reconcile_histogram() -> Histogram {
    Histogram::new(BUCKETS.iter().copied())
}

fn acme_histogram() -> Histogram {
    Histogram::new(ACME_BUCKETS.iter().copied())
}

/// The operator's metrics: one registry, its families, and the stacks that have series.
pub struct Metrics {
    registry: Registry,
    reconciles: Family<ResultLabel, Counter>,
    reconcile_errors: Family<ReasonLabel, Counter>,
    reconcile_duration: Histogram,
    applied: Family<KindCause, Counter>,
    pruned: Family<KindLabel, Counter>,
    drift: Family<KindAction, Counter>,
    leader: Gauge,
    violations: Family<StackLabels, Gauge>,
    cache_objects: Family<KindLabel, Gauge>,
    cache_json_bytes: Family<KindLabel, Gauge>,
    cache_packed_bytes: Family<KindLabel, Gauge>,
    acme_requests: Family<TypeOutcome, Counter>,
    acme_latency: Family<TypeLabel, Histogram, fn() -> Histogram>,
    certificate_not_after: Family<StackLabels, FloatGauge>,
    certificate_renewal: Family<StackLabels, FloatGauge>,
    certificate_ready: Family<StackLabels, Gauge>,
    /// Registered only where the allocator can tell (glibc), set on each scrape.
    heap_in_use: Option<Gauge>,
    /// The stacks with per-stack series, so that a gone stack's series can be removed.
    stacks: Mutex<BTreeSet<StackLabels>>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            reconciles: Family::default(),
            reconcile_errors: Family::default(),
            reconcile_duration: reconcile_histogram(),
            applied: Family::default(),
            pruned: Family::default(),
            drift: Family::default(),
            leader: Gauge::default(),
            violations: Family::default(),
            cache_objects: Family::default(),
            cache_json_bytes: Family::default(),
            cache_packed_bytes: Family::default(),
            acme_requests: Family::default(),
            acme_latency: Family::new_with_constructor(acme_histogram),
            certificate_not_after: Family::default(),
            certificate_renewal: Family::default(),
            certificate_ready: Family::default(),
            heap_in_use: crate::memory::heap_in_use().map(|_| Gauge::default()),
            stacks: Mutex::default(),
            registry: Registry::default(),
        };
        // Counter names get their `_total` from the registry. Help texts end without a period:
        // the encoder adds one.
        registry.register(
            "opsconductor_reconciles",
            "Reconciles of stacks, by result",
            m.reconciles.clone(),
        );
        registry.register(
            "opsconductor_reconcile_errors",
            "Failed reconciles, by reason",
            m.reconcile_errors.clone(),
        );
        registry.register(
            "opsconductor_objects_applied",
            "Server-side applies of managed objects, by kind and cause",
            m.applied.clone(),
        );
        registry.register(
            "opsconductor_objects_pruned",
            "Managed objects deleted because the stack no longer wants them, by kind",
            m.pruned.clone(),
        );
        registry.register(
            "opsconductor_drift",
            "Changes by others to managed objects, by kind and action (reverted or reported)",
            m.drift.clone(),
        );
        registry.register(
            "opsconductor_leader",
            "1 while this process leads (or runs without leader election), 0 on a standby",
            m.leader.clone(),
        );
        registry.register(
            "opsconductor_violations",
            "Policy violations found in stack namespaces, per stack",
            m.violations.clone(),
        );
        registry.register(
            "opsconductor_cache_objects",
            "Objects held by the watch caches, by kind",
            m.cache_objects.clone(),
        );
        registry.register(
            "opsconductor_cache_json_bytes",
            "Compact JSON of the objects the watch caches hold, by kind, before compression",
            m.cache_json_bytes.clone(),
        );
        registry.register(
            "opsconductor_cache_packed_bytes",
            "What the watch caches keep of that JSON, by kind, after compression (their share of the memory, roughly)",
            m.cache_packed_bytes.clone(),
        );
        registry.register(
            "opsconductor_acme_requests",
            "Requests to ACME CAs, by type (newOrder, finalize, ..., and order for a whole order) and outcome (ok, problem, rate-limited, error)",
            m.acme_requests.clone(),
        );
        registry.register(
            "opsconductor_certificate_not_after_seconds",
            "Expiry of the gateway certificate in use (Unix time), per stack",
            m.certificate_not_after.clone(),
        );
        registry.register(
            "opsconductor_certificate_renewal_seconds",
            "When the operator will renew (or retry) the gateway certificate (Unix time), per stack",
            m.certificate_renewal.clone(),
        );
        registry.register(
            "opsconductor_certificate_ready",
            "1 when a valid certificate covering every gateway host is in use, per stack",
            m.certificate_ready.clone(),
        );
        if let Some(heap) = &m.heap_in_use {
            registry.register(
                "opsconductor_heap_in_use_bytes",
                "Heap allocated and not freed (the resident size also counts free pages the allocator keeps)",
                heap.clone(),
            );
        }
        registry.register(
            "opsconductor_reconcile_duration_seconds",
            "Time spent in one reconcile",
            m.reconcile_duration.clone(),
        );
        registry.register(
            "opsconductor_acme_request_duration_seconds",
            "Latency of requests to ACME CAs, by type",
            m.acme_latency.clone(),
        );
        Metrics { registry, ..m }
    }
}

fn gauge_value(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Metrics {
    /// One reconcile ended, well or not, after `took`.
    pub fn reconciled(&self, ok: bool, took: Duration) {
        self.reconcile_duration.observe(took.as_secs_f64());
        let result = if ok { "ok" } else { "error" };
        self.reconciles.get_or_create(&ResultLabel { result }).inc();
    }

    /// A reconcile failed with this bounded reason.
    pub fn reconcile_error(&self, reason: &'static str) {
        self.reconcile_errors
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// One server-side apply of a managed object of `kind`, for `cause`.
    pub fn applied(&self, kind: &'static str, cause: &'static str) {
        self.applied.get_or_create(&KindCause { kind, cause }).inc();
    }

    /// One managed object of `kind` deleted because its stack no longer wants it.
    pub fn pruned(&self, kind: &'static str) {
        self.pruned.get_or_create(&KindLabel { kind }).inc();
    }

    /// Changes by others to a managed object of `kind`, `reverted` or `reported`.
    pub fn drift(&self, kind: &'static str, action: &'static str) {
        self.drift.get_or_create(&KindAction { kind, action }).inc();
    }

    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }

    /// What the watch cache of `kind` holds.
    pub fn cache(
        &self,
        kind: &'static str,
        objects: usize,
        json_bytes: usize,
        packed_bytes: usize,
    ) {
        let labels = KindLabel { kind };
        self.cache_objects
            .get_or_create(&labels)
            .set(gauge_value(objects));
        self.cache_json_bytes
            .get_or_create(&labels)
            .set(gauge_value(json_bytes));
        self.cache_packed_bytes
            .get_or_create(&labels)
            .set(gauge_value(packed_bytes));
    }

    /// The number of violations in the namespace of the stack `key` (`namespace/name`).
    pub fn violations(&self, key: &str, n: usize) {
        let stack = self.stack(key);
        self.violations.get_or_create(&stack).set(gauge_value(n));
    }

    /// Counts one ACME request of `kind` with `outcome` and records its latency.
    pub fn observe_acme(&self, kind: &'static str, outcome: &'static str, d: Duration) {
        self.acme_requests
            .get_or_create(&TypeOutcome {
                r#type: kind,
                outcome,
            })
            .inc();
        self.acme_latency
            .get_or_create(&TypeLabel { r#type: kind })
            .observe(d.as_secs_f64());
    }

    /// The certificate of the stack `key`: whether it is ready and, when known, its expiry and
    /// the next renewal (Unix seconds).
    pub fn certificate(
        &self,
        key: &str,
        ready: bool,
        not_after: Option<f64>,
        renewal: Option<f64>,
    ) {
        let stack = self.stack(key);
        self.certificate_ready
            .get_or_create(&stack)
            .set(i64::from(ready));
        if let Some(t) = not_after {
            self.certificate_not_after.get_or_create(&stack).set(t);
        }
        if let Some(t) = renewal {
            self.certificate_renewal.get_or_create(&stack).set(t);
        }
    }

    fn stack(&self, key: &str) -> StackLabels {
        let stack = StackLabels::from_key(key);
        self.stacks.lock().unwrap().insert(stack.clone());
        stack
    }

    /// The stacks (`namespace/name`) that have per-stack series.
    pub fn stack_keys(&self) -> Vec<String> {
        self.stacks
            .lock()
            .unwrap()
            .iter()
            .map(StackLabels::key)
            .collect()
    }

    /// Removes every series of the stack `key` (`namespace/name`): it is gone.
    pub fn forget_stack(&self, key: &str) {
        let stack = StackLabels::from_key(key);
        self.stacks.lock().unwrap().remove(&stack);
        self.violations.remove(&stack);
        self.certificate_ready.remove(&stack);
        self.certificate_not_after.remove(&stack);
        self.certificate_renewal.remove(&stack);
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        if let (Some(gauge), Some(bytes)) = (&self.heap_in_use, crate::memory::heap_in_use()) {
            gauge.set(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histogram() {
        let m = Metrics::default();
        m.reconciled(true, Duration::from_millis(30));
        m.reconciled(true, Duration::from_millis(3));
        m.reconcile_error("Conflict");
        let text = m.render();
        assert!(
            text.contains("opsconductor_reconciles_total{result=\"ok\"} 2"),
            "{text}"
        );
        assert!(text.contains("# TYPE opsconductor_reconciles_total counter"));
        assert!(
            text.contains(
                "# HELP opsconductor_reconciles_total Reconciles of stacks, by result.\n"
            )
        );
        assert!(text.contains("opsconductor_reconcile_errors_total{reason=\"Conflict\"} 1"));
        assert!(text.contains("opsconductor_reconcile_duration_seconds_bucket{le=\"0.05\"} 2"));
        assert!(text.contains("opsconductor_reconcile_duration_seconds_bucket{le=\"0.025\"} 1"));
        assert!(text.contains("opsconductor_reconcile_duration_seconds_count 2"));
    }

    #[test]
    fn renders_acme_requests_and_latency() {
        let m = Metrics::default();
        m.observe_acme("newOrder", "ok", Duration::from_millis(80));
        m.observe_acme("newOrder", "rate-limited", Duration::from_millis(20));
        let text = m.render();
        assert!(
            text.contains(
                "opsconductor_acme_requests_total{type=\"newOrder\",outcome=\"rate-limited\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "opsconductor_acme_request_duration_seconds_bucket{le=\"0.05\",type=\"newOrder\"} 1"
            ) || text.contains(
                "opsconductor_acme_request_duration_seconds_bucket{type=\"newOrder\",le=\"0.05\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("opsconductor_acme_request_duration_seconds_count{type=\"newOrder\"} 2")
        );
    }

    #[test]
    fn a_stacks_series_carry_namespace_and_name_and_go_with_the_stack() {
        let m = Metrics::default();
        m.certificate(
            "ns/prod",
            true,
            Some(1_900_000_000.0),
            Some(1_890_000_000.0),
        );
        m.violations("ns/prod", 2);
        m.violations("other/dev", 0);
        let text = m.render();
        assert!(
            text.contains("opsconductor_certificate_ready{namespace=\"ns\",name=\"prod\"} 1"),
            "{text}"
        );
        assert!(text.contains("opsconductor_violations{namespace=\"ns\",name=\"prod\"} 2"));
        assert!(text.contains(
            "opsconductor_certificate_not_after_seconds{namespace=\"ns\",name=\"prod\"} 1900000000"
        ));
        assert_eq!(m.stack_keys(), ["ns/prod", "other/dev"]);
        m.forget_stack("ns/prod");
        let text = m.render();
        assert!(!text.contains("name=\"prod\""), "{text}");
        assert!(text.contains("opsconductor_violations{namespace=\"other\",name=\"dev\"} 0"));
        assert_eq!(m.stack_keys(), ["other/dev"]);
    }

    #[test]
    fn every_family_is_declared_with_help_and_type() {
        let m = Metrics::default();
        m.set_leader(true);
        m.cache("Service", 3, 1024, 256);
        m.applied("Service", "created");
        m.pruned("Service");
        m.drift("Service", "reverted");
        m.violations("ns/prod", 1);
        m.certificate("ns/prod", false, None, None);
        let text = m.render();
        for name in [
            "opsconductor_leader",
            "opsconductor_cache_objects",
            "opsconductor_cache_json_bytes",
            "opsconductor_cache_packed_bytes",
            "opsconductor_objects_applied_total",
            "opsconductor_objects_pruned_total",
            "opsconductor_drift_total",
            "opsconductor_violations",
            "opsconductor_certificate_ready",
            "opsconductor_reconcile_duration_seconds",
        ] {
            assert!(text.contains(&format!("# HELP {name} ")), "{name}: {text}");
            assert!(text.contains(&format!("# TYPE {name} ")), "{name}: {text}");
        }
        assert!(text.contains("opsconductor_leader 1"));
        assert!(text.contains("opsconductor_cache_json_bytes{kind=\"Service\"} 1024"));
        assert!(
            !text.contains(".."),
            "a help text ends in two periods: {text}"
        );
    }
}
