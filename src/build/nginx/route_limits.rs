//! Per-route limits (`spec.services[].routeLimits`, issue 18): a shared-memory zone per
//! limit at http level, and the lines each route's locations carry.

use std::fmt::Write as _;

use super::MAX_REQUESTS_PER_CLIENT;
use crate::model::{Service, Stack};

/// The nginx name part for a service: DNS-1035 labels have no `_`, so this is one to one.
fn zone_id(svc: &Service) -> String {
    svc.name.as_str().replace('-', "_")
}

pub(super) fn any_route_rate(stack: &Stack) -> bool {
    stack
        .services
        .iter()
        .any(|s| s.route_limits.is_some_and(|l| l.rate.is_some()))
}

/// One shared-memory zone per limit a route sets, keyed on the client address (as
/// `client_address` finds it). 1 MiB holds about 16,000 addresses; the least recently used go
/// first when it is full.
pub(super) fn route_limit_zones(w: &mut String, stack: &Stack) {
    let limited: Vec<_> = stack
        .services
        .iter()
        .filter_map(|s| s.route_limits.map(|l| (s, l)))
        .collect();
    if limited.is_empty() {
        return;
    }
    let _ = writeln!(
        w,
        "\n    # Per-route limits (spec.services[].routeLimits), per client address and pod."
    );
    if stack.gateway.rate_limit.is_none() && any_route_rate(stack) {
        let _ = writeln!(
            w,
            "    limit_req_status 429;\n    limit_req_log_level warn;"
        );
    }
    for (svc, l) in limited {
        let id = zone_id(svc);
        if let Some(rate) = l.rate {
            let _ = writeln!(
                w,
                "    limit_req_zone $binary_remote_addr zone=opsconductor_route_{id}:1m rate={rate};"
            );
        }
        if l.concurrent_requests_per_client.is_some() {
            let _ = writeln!(
                w,
                "    limit_conn_zone $binary_remote_addr zone=opsconductor_route_conn_{id}:1m;"
            );
        }
    }
}

/// A route's own limits. nginx drops inherited `limit_req` / `limit_conn` where a location
/// has its own, so the gateway's are repeated beside them: a route's limits only add.
pub(super) fn route_limit_lines(stack: &Stack, svc: &Service) -> String {
    let Some(l) = svc.route_limits else {
        return String::new();
    };
    let id = zone_id(svc);
    let mut out = String::new();
    if l.rate.is_some() {
        if let Some(rl) = stack.gateway.rate_limit {
            let _ = write!(
                out,
                "\n            limit_req zone=opsconductor_per_client burst={} nodelay;",
                rl.burst
            );
        }
        let _ = write!(
            out,
            "\n            limit_req zone=opsconductor_route_{id} burst={} nodelay;",
            l.burst
        );
    }
    if let Some(n) = l.concurrent_requests_per_client {
        let _ = write!(
            out,
            "\n            limit_conn opsconductor_conn_per_client {MAX_REQUESTS_PER_CLIENT};\
             \n            limit_conn opsconductor_route_conn_{id} {n};"
        );
    }
    out
}
