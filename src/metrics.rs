//! Prometheus metrics of the operator, in the text exposition format.
//!
//! A handful of counters and one histogram, kept by hand: label values are bounded (kinds,
//! reasons from a fixed set), never free-form strings.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds of the reconcile duration histogram, in seconds.
const BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

/// A series: its metric name and its sorted label pairs.
type SeriesKey = (&'static str, Vec<(&'static str, String)>);

#[derive(Default)]
struct Inner {
    counters: BTreeMap<SeriesKey, u64>,
    gauges: BTreeMap<SeriesKey, f64>,
    reconcile_buckets: Vec<u64>,
    reconcile_sum: f64,
    reconcile_count: u64,
    /// ACME request latency by request type: (buckets, sum, count).
    acme_latency: BTreeMap<String, (Vec<u64>, f64, u64)>,
}

/// Upper bounds of the ACME request latency histogram, in seconds.
const ACME_BUCKETS: &[f64] = &[0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

const HELP: &[(&str, &str, &str)] = &[
    (
        "opsconductor_reconciles_total",
        "counter",
        "Reconciles of stacks, by result.",
    ),
    (
        "opsconductor_reconcile_errors_total",
        "counter",
        "Failed reconciles, by reason.",
    ),
    (
        "opsconductor_objects_applied_total",
        "counter",
        "Server-side applies of managed objects, by kind and cause.",
    ),
    (
        "opsconductor_objects_pruned_total",
        "counter",
        "Managed objects deleted because the stack no longer wants them, by kind.",
    ),
    (
        "opsconductor_drift_total",
        "counter",
        "Changes by others to managed objects, by kind and action (reverted or reported).",
    ),
    (
        "opsconductor_leader",
        "gauge",
        "1 while this process leads (or runs without leader election), 0 on a standby.",
    ),
    (
        "opsconductor_violations",
        "gauge",
        "Policy violations found in stack namespaces, per stack.",
    ),
    (
        "opsconductor_cache_objects",
        "gauge",
        "Objects held by the watch caches, by kind.",
    ),
    (
        "opsconductor_cache_json_bytes",
        "gauge",
        "Compact JSON held by the watch caches, by kind (the objects' size in memory, roughly).",
    ),
    (
        "opsconductor_acme_requests_total",
        "counter",
        "Requests to ACME CAs, by type (newOrder, finalize, ..., and order for a whole order) and outcome (ok, problem, rate-limited, error).",
    ),
    (
        "opsconductor_certificate_not_after_seconds",
        "gauge",
        "Expiry of the gateway certificate in use (Unix time), per stack.",
    ),
    (
        "opsconductor_certificate_renewal_seconds",
        "gauge",
        "When the operator will renew (or retry) the gateway certificate (Unix time), per stack.",
    ),
    (
        "opsconductor_certificate_ready",
        "gauge",
        "1 when a valid certificate covering every gateway host is in use, per stack.",
    ),
];

impl Metrics {
    pub fn inc(&self, name: &'static str, labels: &[(&'static str, &str)]) {
        self.add(name, labels, 1);
    }

    pub fn add(&self, name: &'static str, labels: &[(&'static str, &str)], n: u64) {
        let key = (
            name,
            labels.iter().map(|(k, v)| (*k, v.to_string())).collect(),
        );
        *self.inner.lock().unwrap().counters.entry(key).or_default() += n;
    }

    pub fn set(&self, name: &'static str, labels: &[(&'static str, &str)], value: f64) {
        let key = (
            name,
            labels.iter().map(|(k, v)| (*k, v.to_string())).collect(),
        );
        self.inner.lock().unwrap().gauges.insert(key, value);
    }

    pub fn observe_reconcile(&self, d: Duration) {
        let mut inner = self.inner.lock().unwrap();
        if inner.reconcile_buckets.is_empty() {
            inner.reconcile_buckets = vec![0; BUCKETS.len()];
        }
        let secs = d.as_secs_f64();
        for (i, le) in BUCKETS.iter().enumerate() {
            if secs <= *le {
                inner.reconcile_buckets[i] += 1;
            }
        }
        inner.reconcile_sum += secs;
        inner.reconcile_count += 1;
    }

    /// Counts one ACME request of `kind` with `outcome` and records its latency.
    pub fn observe_acme(&self, kind: &'static str, outcome: &'static str, d: Duration) {
        self.inc(
            "opsconductor_acme_requests_total",
            &[("type", kind), ("outcome", outcome)],
        );
        let mut inner = self.inner.lock().unwrap();
        let entry = inner
            .acme_latency
            .entry(kind.to_string())
            .or_insert_with(|| (vec![0; ACME_BUCKETS.len()], 0.0, 0));
        let secs = d.as_secs_f64();
        for (i, le) in ACME_BUCKETS.iter().enumerate() {
            if secs <= *le {
                entry.0[i] += 1;
            }
        }
        entry.1 += secs;
        entry.2 += 1;
    }

    /// The distinct values of `label` among the gauge samples (e.g. every stack with a series).
    pub fn label_values(&self, label: &str) -> Vec<String> {
        let inner = self.inner.lock().unwrap();
        let values: std::collections::BTreeSet<String> = inner
            .gauges
            .keys()
            .flat_map(|(_, labels)| labels.iter().filter(|(k, _)| *k == label))
            .map(|(_, v)| v.clone())
            .collect();
        values.into_iter().collect()
    }

    /// Drops every gauge sample carrying `label=value` (a deleted stack).
    pub fn forget(&self, label: &'static str, value: &str) {
        self.inner
            .lock()
            .unwrap()
            .gauges
            .retain(|(_, labels), _| !labels.iter().any(|(k, v)| *k == label && v == value));
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let inner = self.inner.lock().unwrap();
        let mut out = String::new();
        for (name, kind, help) in HELP {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for ((n, labels), v) in &inner.counters {
                if n == name {
                    let _ = writeln!(out, "{name}{} {v}", fmt_labels(labels));
                }
            }
            for ((n, labels), v) in &inner.gauges {
                if n == name {
                    let _ = writeln!(out, "{name}{} {v}", fmt_labels(labels));
                }
            }
        }
        if let Some(bytes) = crate::memory::heap_in_use() {
            let name = "opsconductor_heap_in_use_bytes";
            let _ = writeln!(
                out,
                "# HELP {name} Heap allocated and not freed (the resident size also counts free pages the allocator keeps).\n# TYPE {name} gauge\n{name} {bytes}"
            );
        }
        let name = "opsconductor_reconcile_duration_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Time spent in one reconcile.\n# TYPE {name} histogram"
        );
        for (i, le) in BUCKETS.iter().enumerate() {
            let n = inner.reconcile_buckets.get(i).copied().unwrap_or(0);
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{le=\"+Inf\"}} {}",
            inner.reconcile_count
        );
        let _ = writeln!(out, "{name}_sum {}", inner.reconcile_sum);
        let _ = writeln!(out, "{name}_count {}", inner.reconcile_count);
        let name = "opsconductor_acme_request_duration_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Latency of requests to ACME CAs, by type.\n# TYPE {name} histogram"
        );
        for (kind, (buckets, sum, count)) in &inner.acme_latency {
            for (i, le) in ACME_BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "{name}_bucket{{type=\"{kind}\",le=\"{le}\"}} {}",
                    buckets[i]
                );
            }
            let _ = writeln!(out, "{name}_bucket{{type=\"{kind}\",le=\"+Inf\"}} {count}");
            let _ = writeln!(out, "{name}_sum{{type=\"{kind}\"}} {sum}");
            let _ = writeln!(out, "{name}_count{{type=\"{kind}\"}} {count}");
        }
        out
    }
}

fn fmt_labels(labels: &[(&'static str, String)]) -> String {
    if labels.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")))
        .collect();
    format!("{{{}}}", parts.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histogram() {
        let m = Metrics::default();
        m.inc("opsconductor_reconciles_total", &[("result", "ok")]);
        m.inc("opsconductor_reconciles_total", &[("result", "ok")]);
        m.observe_reconcile(Duration::from_millis(30));
        let text = m.render();
        assert!(
            text.contains("opsconductor_reconciles_total{result=\"ok\"} 2"),
            "{text}"
        );
        assert!(text.contains("opsconductor_reconcile_duration_seconds_bucket{le=\"0.05\"} 1"));
        assert!(text.contains("opsconductor_reconcile_duration_seconds_bucket{le=\"0.025\"} 0"));
        assert!(text.contains("opsconductor_reconcile_duration_seconds_count 1"));
    }

    #[test]
    fn renders_acme_requests_and_latency() {
        let m = Metrics::default();
        m.observe_acme("newOrder", "ok", Duration::from_millis(80));
        m.observe_acme("newOrder", "rate-limited", Duration::from_millis(20));
        m.set(
            "opsconductor_certificate_ready",
            &[("stack", "ns/prod")],
            1.0,
        );
        let text = m.render();
        assert!(text.contains(
            "opsconductor_acme_requests_total{type=\"newOrder\",outcome=\"rate-limited\"} 1"
        ));
        assert!(text.contains(
            "opsconductor_acme_request_duration_seconds_bucket{type=\"newOrder\",le=\"0.05\"} 1"
        ));
        assert!(
            text.contains("opsconductor_acme_request_duration_seconds_count{type=\"newOrder\"} 2")
        );
        assert!(text.contains("opsconductor_certificate_ready{stack=\"ns/prod\"} 1"));
        m.forget("stack", "ns/prod");
        assert!(!m.render().contains("stack=\"ns/prod\""));
    }
}
