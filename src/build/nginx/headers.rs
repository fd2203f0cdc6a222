//! The headers the gateway sets: on every HTTPS response (HSTS, CSP and the other security
//! headers), and on every request towards a service (the ones the inside trusts are removed;
//! the verdict's are set from the verdict alone).

use super::edge_auth::verdict_var;
use crate::model::Stack;

/// The headers of every HTTPS response, errors included (`always`).
pub(super) fn security_headers(stack: &Stack) -> String {
    format!(
        r#"        add_header Strict-Transport-Security "{hsts}" always;
        add_header X-Content-Type-Options "nosniff" always;
        add_header X-Frame-Options "DENY" always;
        add_header Referrer-Policy "strict-origin-when-cross-origin" always;
        add_header X-Request-ID $request_id always;{csp}"#,
        hsts = hsts_value(stack),
        csp = csp_header(stack),
    )
}

/// The Content-Security-Policy line, if the stack has one. The value is checked: printable
/// ASCII without '"', '\', '$' or braces (`validate::gateway::check_csp`), so it stays one string.
fn csp_header(stack: &Stack) -> String {
    let Some(c) = &stack.gateway.content_security_policy else {
        return String::new();
    };
    let name = if c.report_only {
        "Content-Security-Policy-Report-Only"
    } else {
        "Content-Security-Policy"
    };
    format!("\n        add_header {name} \"{}\" always;", c.policy)
}

fn hsts_value(stack: &Stack) -> String {
    let h = stack.gateway.hsts;
    let mut v = format!("max-age={}", h.max_age_seconds);
    if h.include_sub_domains {
        v.push_str("; includeSubDomains");
    }
    if h.preload {
        v.push_str("; preload");
    }
    v
}

/// `proxy_set_header` lines that remove the headers the inside trusts from every request, and
/// set the verdict's headers from the verdict alone (a client's own are never passed on).
pub(super) fn request_header_hygiene(stack: &Stack) -> String {
    let g = &stack.gateway;
    let pass: &[String] = g.edge_auth.as_ref().map_or(&[], |a| &a.pass_headers);
    let mut lines: Vec<String> = g
        .strip_request_headers
        .iter()
        .filter(|h| !pass.contains(h))
        .map(|h| format!("        proxy_set_header {h} \"\";"))
        .collect();
    for h in pass {
        let value = if stack.verdicts().is_some() {
            verdict_var(h)
        } else {
            "\"\"".to_string()
        };
        lines.push(format!("        proxy_set_header {h} {value};"));
    }
    lines.join("\n")
}
