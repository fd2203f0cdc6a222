//! Requests by route and status class, and their latency (`spec.gateway.metrics`, issue 15).
//!
//! nginx open source counts neither in memory, so each request's result leaves nginx as one
//! short line: a second access log, sent as UDP syslog to the pod's loopback
//! ([`REQUEST_LOG_PORT`]), beside the JSON log on stdout. The `requests` sidecar, mtail (Google's
//! log-to-metrics exporter, as Debian builds it, in the gateway image), reads those datagrams with
//! the program [`program`] (the ConfigMap key [`PROGRAM_KEY`]) and serves counters and
//! histograms on its own port. The line format and the program are written here, side by side,
//! because one parses what the other writes.
//!
//! What keeps the series bounded: the route is never taken from the request. Each route's
//! locations set [`ROUTE_VARIABLE`] to the service's name (a DNS-1035 label from the validated
//! spec); every other request (no route matched, the redirect to HTTPS, ACME answers, a Host
//! the stack does not serve, a request refused before a location was chosen) logs
//! [`NO_ROUTE`], which no service name can be (a name starts with a letter). The program accepts
//! nothing else in that field, and the other fields are nginx's numbers (status, times). So
//! the series are at most (routes + 1) x 5 status classes, plus the histograms' buckets per
//! route, whatever URIs clients send.
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

/// The syslog tag nginx puts in front of each line; the program matches on it.
pub const TAG: &str = "opsconductor";

/// The ConfigMap key of the mtail program (mounted alone into the sidecar).
pub const PROGRAM_KEY: &str = "requests.mtail";

/// Upper bounds, in seconds, of the latency histograms' buckets (Prometheus' default
/// buckets, then 30 s and 60 s for slow routes; `+Inf` is added by the exporter). Fixed: a
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

/// The mtail program that turns the lines of [`request_log`] into metrics. mtail takes the
/// first value of a `buckets` list as the lower edge of the first bucket and leaves a value
/// equal to it out of every bucket, so the list starts below 0: a request that took 0.000 s
/// (most answers nginx gives itself) is in every bucket, as Prometheus expects.
pub fn program() -> String {
    let buckets = std::iter::once("-1".to_string())
        .chain(LATENCY_BUCKETS.iter().map(ToString::to_string))
        .collect::<Vec<_>>()
        .join(", ");
    let escaped_none = NO_ROUTE.replace('(', "\\(").replace(')', "\\)");
    format!(
        r#"# Generated by opsconductor-operator (src/build/nginx/request_metrics.rs): the gateway's
# requests by route and status class, and latency, from the lines nginx sends to
# udp://127.0.0.1:{REQUEST_LOG_PORT}. Counters since this exporter started, per pod.

counter opsconductor_gateway_requests_total by route, status_class
histogram opsconductor_gateway_request_duration_seconds by route buckets {buckets}
histogram opsconductor_gateway_upstream_duration_seconds by route buckets {buckets}
counter opsconductor_gateway_request_lines_unparsed_total

# "<route> <status> <request_time> <upstream_response_time>": the route is a service name or
# "{NO_ROUTE}"; the upstream times are "-" without an upstream, or one per try ("0.001, 0.002",
# " : " across internal redirects), of which the last is the response the client got.
/ {TAG}: (?P<route>[a-z][a-z0-9-]{{0,62}}|{escaped_none}) (?P<status>[1-5]\d\d) (?P<request_time>\d+\.\d+) (?:(?:\d+\.\d+|-)(?:, | : ))*(?P<upstream_time>\d+\.\d+|-)$/ {{
  $status >= 500 {{
    opsconductor_gateway_requests_total[$route]["5xx"]++
  }} else {{
    $status >= 400 {{
      opsconductor_gateway_requests_total[$route]["4xx"]++
    }} else {{
      $status >= 300 {{
        opsconductor_gateway_requests_total[$route]["3xx"]++
      }} else {{
        $status >= 200 {{
          opsconductor_gateway_requests_total[$route]["2xx"]++
        }} else {{
          opsconductor_gateway_requests_total[$route]["1xx"]++
        }}
      }}
    }}
  }}
  opsconductor_gateway_request_duration_seconds[$route] = $request_time
  $upstream_time != "-" {{
    opsconductor_gateway_upstream_duration_seconds[$route] = float($upstream_time)
  }}
}} else {{
  opsconductor_gateway_request_lines_unparsed_total++
}}
"#
    )
}
