//! The dereference stage: the stack's certificate. ACME stacks: the ACME engine (reads and
//! writes the stack's certificate Secrets, starts orders in the background). A user's Secret:
//! read and checked (chain, key, hosts, expiry).

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Resource};

use super::status::{self, Verdict};
use super::{Context, Error, Request};
use crate::crd::{CertificateStatus, OpsConductorStack};
use crate::model::{CertificateSource, Stack};
use crate::ownership::NameConflict;

/// The certificate's status, its condition, the ACME thumbprint for the gateway, when to
/// look again and the Events to publish.
pub(super) struct Certificate {
    pub status: CertificateStatus,
    pub verdict: Verdict,
    pub thumbprint: Option<String>,
    pub requeue_after: Option<std::time::Duration>,
    pub events: Vec<crate::acme::CertEvent>,
    /// The certificate's Secrets that are someone else's.
    pub conflicts: Vec<NameConflict>,
}

/// The certificate of a validated stack (see the module docs). Reads, and for ACME stacks
/// writes the certificate Secrets; never waits for the CA.
pub(super) async fn certificate(
    stack: &OpsConductorStack,
    ctx: &Context,
    model: &Stack,
) -> Result<Certificate, Error> {
    let now = std::time::SystemTime::now();
    match &model.tls.source {
        CertificateSource::Secret(name) => {
            let secret = Api::<Secret>::namespaced(ctx.client.clone(), &model.namespace)
                .get_opt(name)
                .await
                .map_err(|e| Error::Certificate(Request::Kube(e)))?;
            let (status, ok, reason, message) = crate::acme::user_secret_status(
                secret.as_ref(),
                name,
                &model.namespace,
                &model.gateway.hosts,
                now,
            );
            Ok(Certificate {
                status,
                verdict: Verdict::new(ok, reason, message),
                thumbprint: None,
                requeue_after: None,
                events: vec![],
                conflicts: vec![],
            })
        }
        CertificateSource::Acme(acme) => {
            let recorded = recorded_certificate(stack);
            let report = ctx
                .acme
                .reconcile(&ctx.client, model, acme, &recorded, now)
                .await
                .map_err(Error::from)?;
            tracing::debug!(state = ?report.status.state, detail = %report.message, "certificate");
            Ok(Certificate {
                status: report.status,
                verdict: Verdict::new(report.ok, report.reason, report.message),
                thumbprint: report.thumbprint,
                requeue_after: report.requeue_after,
                events: report.events,
                conflicts: report.conflicts,
            })
        }
    }
}

/// What the status says about earlier certificate attempts, when it describes the current
/// spec (the ACME backoff resumes from it after a restart or a change of leader).
fn recorded_certificate(stack: &OpsConductorStack) -> crate::acme::Recorded {
    let Some(status) = stack.status.as_ref().filter(|s| {
        s.observed_generation.is_some() && s.observed_generation == stack.meta().generation
    }) else {
        return crate::acme::Recorded::default();
    };
    crate::acme::Recorded {
        certificate: status.certificate.clone(),
        reason: status::condition(Some(status), status::CERTIFICATE_READY)
            .map(|c| c.reason.clone()),
    }
}
