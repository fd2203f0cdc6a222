//! Requests by route and status class, and their latency (`spec.gateway.metrics`, issue 15).
//!
//! nginx open source counts neither in memory, so each request's result leaves nginx as one
//! short line: a second access log, sent as UDP syslog to the pod's loopback
//! ([`REQUEST_LOG_PORT`]), beside the JSON log on stdout. The `requests` sidecar
//! (`opsconductor-operator gateway-requests`, [`crate::gateway_requests`], which parses this
//! format) counts them and serves counters and histograms on its own port.
//!
//! What keeps the series bounded: the route is never taken from the request. Each route's
//! locations set [`ROUTE_VARIABLE`] to the service's name (a DNS-1035 label from the validated
//! spec); every other request (no route matched, the redirect to HTTPS, ACME answers, a Host
//! the stack does not serve, a request refused before a location was chosen) logs
//! [`NO_ROUTE`], which no service name can be (a name starts with a letter). The exporter
//! accepts nothing else in that field, and the other fields are nginx's numbers (status,
//! times). So the series are at most (routes + 1) x 5 status classes, plus the histograms'
//! buckets per route, whatever URIs clients send.
//!
//! Why UDP: nginx never waits for the exporter. A datagram to a closed port (the exporter
//! restarting) is lost, and nginx notes the refused send in its error log; a full socket
//! buffer (an exporter that cannot keep up) drops datagrams in the kernel. A FIFO would block
//! nginx's worker when its reader stops, and a file would need a volume and rotation.

use std::fmt::Write as _;

use crate::model::{Service, Stack};

/// The UDP port on 127.0.0.1 where the `requests` sidecar receives one line per request.
pub const REQUEST_LOG_PORT: i32 = 8083;

/// The variable each route's locations set to the service's name.
pub const ROUTE_VARIABLE: &str = "$opsconductor_route";

/// The route label of every request that no route's location handled.
pub const NO_ROUTE: &str = "(none)";

/// The syslog tag nginx puts in front of each line; the exporter looks for it.
pub const TAG: &str = "opsconductor";

/// Upper bounds, in seconds, of the latency histograms' buckets (Prometheus' default
/// buckets, then 30 s and 60 s for slow routes, and `+Inf`). Fixed: a
/// histogram's series are its buckets, so this also bounds memory.
pub const LATENCY_BUCKETS: [f64; 13] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// The http-context lines: the route's label for requests no route handled, and the second
/// access log. Inherited everywhere the JSON log is; the listeners with `access_log off` (the
/// probes, the status listener) are in neither.
pub(super) fn request_log(w: &mut String, stack: &Stack) {
    if stack.gateway.metrics.is_none() {
        return;
    }
    let _ = writeln!(
        w,
        r#"
    # Requests by route and status class, and latency, for the metrics sidecar: one line per
    # request over UDP to the pod's loopback (nginx never waits for it; a line the sidecar
    # does not take is lost). The route is the service's name, set in its locations, or
    # "{NO_ROUTE}": never anything from the request itself, so the series stay bounded.
    # A request refused before any location runs has the variable unset: that is expected,
    # and not worth a warning per request.
    uninitialized_variable_warn off;
    map {ROUTE_VARIABLE} $opsconductor_route_label {{
        ""      "{NO_ROUTE}";
        default {ROUTE_VARIABLE};
    }}
    log_format opsconductor_metrics
        '$opsconductor_route_label $status $request_time $upstream_response_time\n';
    access_log syslog:server=127.0.0.1:{REQUEST_LOG_PORT},facility=local7,severity=info,tag={TAG},nohostname opsconductor_metrics;"#
    );
}

/// The line a route's locations start with (only with `metrics`): the route's label.
pub(super) fn route_label(stack: &Stack, svc: &Service) -> String {
    if stack.gateway.metrics.is_none() {
        return String::new();
    }
    format!("\n            set {ROUTE_VARIABLE} {};", svc.name)
}
