//! The gateway's requests by route and status class, and latency: the `requests` sidecar of
//! `spec.gateway.metrics` (issue 15), `opsconductor-operator gateway-requests`.
//!
//! nginx sends one line per request as UDP syslog to the pod's loopback
//! (`src/build/nginx/request_metrics.rs` writes that format):
//!
//! ```text
//! <190>Nov 30 22:00:00 opsconductor: <route> <status> <request_time> <upstream_response_time>
//! ```
//!
//! This reads the datagrams, counts them by route and status class, records both times in
//! histograms with fixed buckets, and serves the result on `/metrics` (Prometheus text format).
//! Counters start at 0 when the exporter starts, per pod.
//!
//! Why not an existing exporter: Debian's mtail (the only log-to-metrics exporter this project
//! can build) reads one datagram per poll interval from a UDP or unixgram socket (4 lines a
//! second by default, under a thousand at a 1 ms interval, measured), and its FIFO and file
//! inputs would block nginx or need rotation; nginx's own exporter reads only `stub_status`.
//!
//! Bounded whatever clients send: the route is a service name nginx was configured with, or
//! `(none)`; a line with anything else, or past [`MAX_ROUTES`] distinct routes, is not counted
//! by route but in `opsconductor_gateway_request_lines_dropped_total{reason}`. No field of the
//! line comes from the request. So memory is at most [`MAX_ROUTES`] routes of 5 counters and
//! two histograms each.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::UdpSocket;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::build::nginx::request_metrics::{LATENCY_BUCKETS, NO_ROUTE, TAG};

/// The most routes counted: a stack has at most 200 services, plus `(none)`. A line naming one
/// more is counted as dropped (`too_many_routes`): a bound even if something else in the pod
/// sent to the port.
pub const MAX_ROUTES: usize = 256;

/// The status classes, by the first digit of the status.
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// One request as nginx logged it.
#[derive(Debug, PartialEq)]
pub struct Line<'a> {
    pub route: &'a str,
    /// 0 for 1xx ... 4 for 5xx.
    pub class: usize,
    pub request_seconds: f64,
    /// The last upstream try's time (the response the client got), when a service was asked.
    pub upstream_seconds: Option<f64>,
}

/// Parses one line (with or without the syslog header and the final newline). `None`: not a
/// line of ours, or a field out of its bounds.
pub fn parse(line: &str) -> Option<Line<'_>> {
    let marker = format!("{TAG}: ");
    let start = line.find(&marker)? + marker.len();
    let body = line[start..].trim_end_matches('\n');
    let mut fields = body.split(' ');
    let route = fields.next()?;
    if !(route == NO_ROUTE || is_service_name(route)) {
        return None;
    }
    let status = fields.next()?;
    let class = match status.as_bytes() {
        [d @ b'1'..=b'5', b'0'..=b'9', b'0'..=b'9'] => usize::from(d - b'1'),
        _ => return None,
    };
    let request_seconds = seconds(fields.next()?)?;
    // "-", "0.002", "0.001, 0.002" (tries), "0.001 : 0.002" (internal redirects).
    let mut upstream_seconds = None;
    let mut any = false;
    for token in fields {
        any = true;
        match token.trim_end_matches(',') {
            ":" => {}
            "-" => upstream_seconds = None,
            t => upstream_seconds = Some(seconds(t)?),
        }
    }
    any.then_some(Line {
        route,
        class,
        request_seconds,
        upstream_seconds,
    })
}

/// A DNS-1035 label, as service names are (checked by validation).
fn is_service_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

/// nginx's times: seconds with millisecond resolution ("0.003").
fn seconds(s: &str) -> Option<f64> {
    if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit() || c == b'.') {
        return None;
    }
    s.parse().ok().filter(|v: &f64| v.is_finite())
}

#[derive(Default)]
struct Histogram {
    /// Observations at or below each bound of [`LATENCY_BUCKETS`], not cumulative.
    buckets: [u64; LATENCY_BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, v: f64) {
        if let Some(i) = LATENCY_BUCKETS.iter().position(|b| v <= *b) {
            self.buckets[i] += 1;
        }
        self.count += 1;
        self.sum += v;
    }
}

/// Which of a route's histograms a series family renders.
type PickHistogram = fn(&Route) -> &Histogram;

#[derive(Default)]
struct Route {
    classes: [u64; 5],
    request: Histogram,
    upstream: Histogram,
}

/// What the exporter counted since it started.
#[derive(Default)]
pub struct Requests {
    routes: BTreeMap<String, Route>,
    malformed: u64,
    too_many_routes: u64,
}

impl Requests {
    /// Counts one datagram (one line; several when separated by new lines).
    pub fn record(&mut self, datagram: &str) {
        for text in datagram.split_inclusive('\n') {
            if text.trim().is_empty() {
                continue;
            }
            let Some(line) = parse(text) else {
                self.malformed += 1;
                continue;
            };
            if !self.routes.contains_key(line.route) && self.routes.len() >= MAX_ROUTES {
                self.too_many_routes += 1;
                continue;
            }
            let route = self.routes.entry(line.route.to_string()).or_default();
            route.classes[line.class] += 1;
            route.request.observe(line.request_seconds);
            if let Some(u) = line.upstream_seconds {
                route.upstream.observe(u);
            }
        }
    }

    /// The Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let w = &mut out;
        let _ = writeln!(
            w,
            "# HELP opsconductor_gateway_requests_total Requests the gateway answered, by route (the service, or \"{NO_ROUTE}\") and status class, since this exporter started.\n\
             # TYPE opsconductor_gateway_requests_total counter"
        );
        for (name, r) in &self.routes {
            for (class, n) in CLASSES.iter().zip(r.classes) {
                if n > 0 {
                    let _ = writeln!(
                        w,
                        "opsconductor_gateway_requests_total{{route=\"{name}\",status_class=\"{class}\"}} {n}"
                    );
                }
            }
        }
        let histograms: [(&str, &str, PickHistogram); 2] = [
            (
                "opsconductor_gateway_request_duration_seconds",
                "Time from the first byte of the request to the last byte of the response (nginx's $request_time), by route.",
                |r| &r.request,
            ),
            (
                "opsconductor_gateway_upstream_duration_seconds",
                "Time the service took to answer (nginx's $upstream_response_time, the last try), by route; requests that reached a service only.",
                |r| &r.upstream,
            ),
        ];
        for (metric, help, pick) in histograms {
            let _ = writeln!(w, "# HELP {metric} {help}\n# TYPE {metric} histogram");
            for (name, r) in &self.routes {
                let h = pick(r);
                if h.count == 0 {
                    continue;
                }
                let mut cumulative = 0;
                for (bound, n) in LATENCY_BUCKETS.iter().zip(h.buckets) {
                    cumulative += n;
                    let _ = writeln!(
                        w,
                        "{metric}_bucket{{route=\"{name}\",le=\"{bound}\"}} {cumulative}"
                    );
                }
                let _ = writeln!(
                    w,
                    "{metric}_bucket{{route=\"{name}\",le=\"+Inf\"}} {}\n\
                     {metric}_sum{{route=\"{name}\"}} {}\n\
                     {metric}_count{{route=\"{name}\"}} {}",
                    h.count, h.sum, h.count
                );
            }
        }
        let _ = writeln!(
            w,
            "# HELP opsconductor_gateway_request_lines_dropped_total Lines not counted by route: malformed, or naming a route past the first {MAX_ROUTES}.\n\
             # TYPE opsconductor_gateway_request_lines_dropped_total counter\n\
             opsconductor_gateway_request_lines_dropped_total{{reason=\"malformed\"}} {}\n\
             opsconductor_gateway_request_lines_dropped_total{{reason=\"too_many_routes\"}} {}",
            self.malformed, self.too_many_routes
        );
        out
    }
}

/// Receives datagrams on `socket` until it fails, counting each into `requests`; `last` is
/// when the latest one came, in milliseconds since `epoch`.
pub fn receive(
    socket: &UdpSocket,
    requests: &Mutex<Requests>,
    epoch: Instant,
    last: &AtomicU64,
) -> std::io::Result<()> {
    // nginx's lines are short; a longer datagram is not one of them (cut, then malformed).
    let mut buf = vec![0u8; 2048];
    loop {
        let n = socket.recv(&mut buf)?;
        last.store(millis_since(epoch), Ordering::Relaxed);
        let text = String::from_utf8_lossy(&buf[..n]);
        requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .record(&text);
    }
}

fn millis_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// How long the socket must have been quiet after SIGTERM before the exporter exits: nginx is
/// told to stop at the same moment (both containers' `preStop` waits are equally long) and
/// finishes the requests in flight, whose lines still come.
pub const QUIET_BEFORE_EXIT: Duration = Duration::from_secs(1);

/// Runs the exporter: datagrams on `udp` (a thread), `/metrics` on `listen`, until SIGTERM or
/// an interrupt (then once the socket has been quiet for [`QUIET_BEFORE_EXIT`]). Without
/// this, as a container's first process it would ignore SIGTERM, and every gateway pod's
/// termination would wait out its whole grace period.
pub async fn run(udp: &str, listen: &str) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let socket = UdpSocket::bind(udp)
        .map_err(|e| anyhow::anyhow!("cannot receive request lines on udp {udp}: {e}"))?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot serve /metrics on {listen}: {e}"))?;
    let mut term = signal(SignalKind::terminate())
        .map_err(|e| anyhow::anyhow!("cannot handle SIGTERM: {e}"))?;
    let requests = Arc::new(Mutex::new(Requests::default()));
    let (epoch, last) = (Instant::now(), Arc::new(AtomicU64::new(0)));
    // A plain thread, not the runtime's blocking pool: the runtime would wait for it (blocked
    // in recv) when it is dropped; a plain thread ends with the process.
    let (stopped, on_stopped) = tokio::sync::oneshot::channel();
    {
        let (counted, last) = (requests.clone(), last.clone());
        std::thread::spawn(move || {
            let _ = stopped.send(receive(&socket, &counted, epoch, &last));
        });
    }
    let render = move || requests.lock().unwrap_or_else(|e| e.into_inner()).render();
    let server = crate::server::serve_metrics(listener, Arc::new(render));
    tokio::pin!(server);
    tokio::select! {
        () = &mut server => return Ok(()),
        result = on_stopped => return match result {
            Ok(Err(e)) => Err(anyhow::anyhow!("receiving request lines failed: {e}")),
            _ => Err(anyhow::anyhow!("the receiver stopped")),
        },
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    // Still serving scrapes while the last lines come.
    let quiet = async {
        loop {
            let since = millis_since(epoch).saturating_sub(last.load(Ordering::Relaxed));
            let left = QUIET_BEFORE_EXIT.saturating_sub(Duration::from_millis(since));
            if left.is_zero() {
                return;
            }
            tokio::time::sleep(left).await;
        }
    };
    tokio::select! {
        () = &mut server => {}
        () = quiet => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_nginx_writes_and_nothing_else() {
        let l = parse("<190>Nov 30 22:00:00 opsconductor: web 200 0.004 0.003\n").unwrap();
        assert_eq!(
            l,
            Line {
                route: "web",
                class: 1,
                request_seconds: 0.004,
                upstream_seconds: Some(0.003)
            }
        );
        // Without an upstream; a single-digit day; no header at all.
        let l = parse("<190>Dec  1 00:00:00 opsconductor: (none) 404 0.000 -").unwrap();
        assert_eq!((l.route, l.class, l.upstream_seconds), ("(none)", 3, None));
        assert!(parse("opsconductor: api-v2 502 1.250 0.001, 0.002").is_some());
        // The last try's time, across tries and internal redirects.
        let u = |s: &str| parse(s).unwrap().upstream_seconds;
        assert_eq!(u("opsconductor: a 502 0.004 0.001, 0.002"), Some(0.002));
        assert_eq!(u("opsconductor: a 200 0.004 0.001 : 0.003"), Some(0.003));
        assert_eq!(u("opsconductor: a 499 0.004 0.001, -"), None);
        for bad in [
            "opsconductor: /api/users 200 0.001 -", // a URI, never a route
            "opsconductor: Web 200 0.001 -",        // not a service name
            "opsconductor: 9web 200 0.001 -",       // not a service name
            &format!("opsconductor: {} 200 0.001 -", "a".repeat(64)),
            "opsconductor: web 600 0.001 -", // no such class
            "opsconductor: web 20 0.001 -",
            "opsconductor: web 200 fast -",
            "opsconductor: web 200 0.001 NaN",
            "opsconductor: web 200 0.001", // a field missing
            "opsconductor: web 200 -1 -",
            "web 200 0.001 -", // not our tag
            "",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn counts_by_route_and_class_with_cumulative_buckets() {
        let mut r = Requests::default();
        for line in [
            "opsconductor: web 200 0.000 0.000",
            "opsconductor: web 201 0.007 0.006",
            "opsconductor: web 503 70.000 70.000",
            "opsconductor: (none) 308 0.000 -",
            "opsconductor: web 200 0.001 -\nopsconductor: web 404 0.001 -\n",
            "garbage",
        ] {
            r.record(line);
        }
        let text = r.render();
        let has = |s: &str| assert!(text.lines().any(|l| l == s), "{s} in\n{text}");
        has(r#"opsconductor_gateway_requests_total{route="web",status_class="2xx"} 3"#);
        has(r#"opsconductor_gateway_requests_total{route="web",status_class="4xx"} 1"#);
        has(r#"opsconductor_gateway_requests_total{route="web",status_class="5xx"} 1"#);
        has(r#"opsconductor_gateway_requests_total{route="(none)",status_class="3xx"} 1"#);
        // 0.000 and 0.001 (x2) are in the first bucket; 0.007 in the second; 70 s only in +Inf.
        has(r#"opsconductor_gateway_request_duration_seconds_bucket{route="web",le="0.005"} 3"#);
        has(r#"opsconductor_gateway_request_duration_seconds_bucket{route="web",le="0.01"} 4"#);
        has(r#"opsconductor_gateway_request_duration_seconds_bucket{route="web",le="60"} 4"#);
        has(r#"opsconductor_gateway_request_duration_seconds_bucket{route="web",le="+Inf"} 5"#);
        has(r#"opsconductor_gateway_request_duration_seconds_count{route="web"} 5"#);
        has(r#"opsconductor_gateway_upstream_duration_seconds_count{route="web"} 3"#);
        assert!(!text.contains(r#"upstream_duration_seconds_count{route="(none)"}"#));
        has(r#"opsconductor_gateway_request_lines_dropped_total{reason="malformed"} 1"#);
        // Classes never seen are not series.
        assert!(!text.contains("1xx"));
    }

    #[test]
    fn routes_past_the_bound_are_dropped_not_added() {
        let mut r = Requests::default();
        for i in 0..MAX_ROUTES + 50 {
            r.record(&format!("opsconductor: r{i} 200 0.001 -"));
        }
        assert_eq!(r.routes.len(), MAX_ROUTES);
        assert_eq!(r.too_many_routes, 50);
        // A route already known is still counted.
        r.record("opsconductor: r0 200 0.001 -");
        assert_eq!(r.routes["r0"].classes[1], 2);
    }
}
