//! Validation: the raw custom resource in, a [`Stack`] or every problem at once out.
//!
//! Pure: no client, no clock. Each problem names its field path the way `kubectl explain`
//! spells it (`spec.services[2].calls[0]: unknown service "user"`), so a user can find it.

mod address;
mod environment;
mod gateway;
mod services;
mod syntax;
#[cfg(test)]
mod tests;
mod tls;

pub use address::{Internal, check_cluster_cidr, internal_ip};
pub use environment::{
    directory_url_problems, egress_cluster_problems, gateway_image_problems, secret_references,
};

use gateway::validate_gateway;
use services::{validate_backends, validate_services};
use std::fmt;
use syntax::check_rfc1123_label;
pub use syntax::{check_cluster_domain, parse_duration};
use tls::{check_wildcards, validate_tls};

use ipnet::IpNet;

use crate::crd::OpsConductorStack;
use crate::model::{DnsLabel, Port, Stack};
use crate::names::{self};

/// One problem in a stack, at one field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Every problem found in a stack, in field order.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ValidationErrors(pub Vec<FieldError>);

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lines: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&lines.join("\n"))
    }
}

impl ValidationErrors {
    /// The messages joined with "; " for a condition message or an Event.
    pub fn one_line(&self) -> String {
        self.0
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// Collects errors while walking the spec.
#[derive(Default)]
struct Errors(Vec<FieldError>);

impl Errors {
    fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            path: path.into(),
            message: message.into(),
        });
    }

    fn label(&mut self, path: &str, value: &str) -> Option<DnsLabel> {
        DnsLabel::parse(value).map_err(|e| self.add(path, e)).ok()
    }

    fn port(&mut self, path: &str, value: i32) -> Option<Port> {
        match Port::try_from(value) {
            Ok(p) if p >= 1 => Some(p),
            _ => {
                self.add(path, format!("port {value} is out of range 1 to 65535"));
                None
            }
        }
    }

    fn cidr(&mut self, path: &str, value: &str) -> Option<IpNet> {
        match value.parse::<IpNet>() {
            Ok(net) if net.trunc() == net => Some(net),
            Ok(net) => {
                self.add(
                    path,
                    format!("{value:?} has host bits set; did you mean {}?", net.trunc()),
                );
                None
            }
            Err(_) => {
                self.add(
                    path,
                    format!("{value:?} is not a CIDR (e.g. 10.0.0.0/8 or 2001:db8::/32)"),
                );
                None
            }
        }
    }
}

/// Validates `stack`; `default_namespace` is used when the object has none (offline render).
pub fn validate(
    stack: &OpsConductorStack,
    default_namespace: &str,
) -> Result<Stack, ValidationErrors> {
    let mut errs = Errors::default();
    let raw_name = stack.metadata.name.clone().unwrap_or_default();
    let name = if raw_name.is_empty() {
        errs.add("metadata.name", "must be set");
        None
    } else {
        let name = errs.label("metadata.name", &raw_name);
        let max = names::max_stack_name_len();
        if raw_name.len() > max {
            errs.add(
                "metadata.name",
                format!(
                    "{raw_name:?} is {} characters; at most {max} fit, because derived names such as \"{raw_name}-gateway-config\" must stay within 63",
                    raw_name.len()
                ),
            );
            None
        } else {
            name
        }
    };
    let namespace = stack
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| default_namespace.to_string());
    // It reaches nginx.conf (upstream addresses) and every object: a DNS label, as the API
    // server requires of namespaces (checked here for `render`, which takes it from `-n`).
    if DnsLabel::parse(&namespace).is_err() && check_rfc1123_label(&namespace).is_err() {
        errs.add(
            "metadata.namespace",
            format!("{namespace:?} is not a namespace name (a DNS label: lowercase letters, digits and '-')"),
        );
    }
    let spec = &stack.spec;

    let gateway = validate_gateway(spec, &mut errs);
    let tls = validate_tls(spec, &mut errs);
    let services = validate_services(spec, name.as_ref(), &mut errs);
    let backends = validate_backends(spec, name.as_ref(), &services, &mut errs);
    let service_identity = services::validate_identity(spec, &mut errs);
    check_wildcards(spec, &mut errs);
    if name.is_some() {
        errs.0
            .extend(secret_references(stack, std::slice::from_ref(&raw_name)));
    }

    match (name, gateway, tls) {
        (Some(name), Some(gateway), Some(tls)) if errs.0.is_empty() => Ok(Stack {
            service_identity: service_identity.map(|expiration_seconds| {
                crate::model::ServiceIdentity {
                    audience: crate::model::identity_audience(&namespace, &name),
                    expiration_seconds,
                }
            }),
            name,
            namespace,
            uid: stack.metadata.uid.clone(),
            gateway,
            tls,
            services,
            backends,
            mode: spec.policy.mode,
            service_to_service: spec.policy.service_to_service,
        }),
        _ => Err(ValidationErrors(errs.0)),
    }
}
