//! The background jobs of the [`super::Manager`], at most one per stack: an order (account,
//! challenges, the written Secret) and a renewal-information (ARI) check. Each records its
//! outcome in the stack's [`State`] for the next reconcile to report.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use tracing::Instrument;

use super::config::Config;
use super::manager::CertEvent;
use super::policy::{self, Why, Window};
use super::state::{AriState, Good, State};
use super::timestamp::rfc3339;
use super::tls_secret::{SecretLedger, write_tls_secret};
use super::{Failure, FailureKind, account, ca_client, cert, dns01, http01, order, user_secrets};
use crate::metrics::Metrics;
use crate::model::{Acme, Stack};
use crate::names;
use crate::ownership::{self, Claim, NameConflict};

/// What a background job needs.
#[derive(Clone)]
pub(super) struct JobContext {
    pub(super) client: Client,
    pub(super) stack: Stack,
    pub(super) acme: Acme,
    pub(super) config: Config,
    pub(super) metrics: Arc<Metrics>,
    pub(super) state: Arc<Mutex<State>>,
}

async fn ca_client(ctx: &JobContext) -> Result<ca_client::CaClient, Failure> {
    let bundle = match &ctx.acme.ca_bundle {
        Some(r) => Some(
            user_secrets::secret_value(&ctx.client, &ctx.stack.namespace, r, "caBundleSecretRef")
                .await?,
        ),
        None => None,
    };
    ca_client::CaClient::new(bundle.as_deref(), ctx.config.allow_loopback_directory)
}

/// The span of a job on `stack`: every line the job logs (here and in `order`, `dns01` and
/// `account`) names the stack through it. (`stack`, not `name`: the JSON log format writes a
/// span's own name under `name`.) A root span: the job outlives the reconcile that started it.
fn span(job: &'static str, stack: &Stack) -> tracing::Span {
    tracing::info_span!(
        parent: None,
        "acme_job",
        job,
        namespace = %stack.namespace,
        stack = %stack.name
    )
}

/// One order, from account to written Secret; records the outcome in the state.
pub(super) fn order_job(
    ctx: JobContext,
    why: Why,
    replaces: Option<String>,
) -> impl Future<Output = ()> + Send + 'static {
    let span = span("order", &ctx.stack);
    order(ctx, why, replaces).instrument(span)
}

async fn order(ctx: JobContext, why: Why, replaces: Option<String>) {
    let started = Instant::now();
    let result = order_once(&ctx, replaces).await;
    let now = SystemTime::now();
    // Whatever the order waited for is over.
    let progress = ctx.state.lock().unwrap().progress.clone();
    *progress.lock().unwrap() = None;
    let outcome = if result.is_ok() { "ok" } else { "error" };
    ctx.metrics
        .observe_acme("order", outcome, started.elapsed());
    let mut st = ctx.state.lock().unwrap();
    match result {
        Ok((good, took)) => {
            tracing::info!(
                serial = %good.leaf.facts.serial,
                seconds = took.as_secs_f64(),
                "certificate issued and written"
            );
            st.events.push(CertEvent {
                warning: false,
                reason: "CertificateIssued",
                note: format!(
                    "issued certificate {} for {} valid until {} ({}); order to Secret in {:.1} s",
                    good.leaf.facts.serial,
                    good.leaf.facts.hosts.join(", "),
                    rfc3339(good.leaf.facts.not_after),
                    why.describe(),
                    took.as_secs_f64()
                ),
            });
            st.good = Some(good);
            st.failures = 0;
            st.failure = None;
            st.next_attempt = None;
            st.ari = None;
        }
        Err(failure) => {
            st.failures += 1;
            let next =
                policy::next_attempt(now, st.failures, &ctx.config.backoff, failure.retry_after);
            tracing::warn!(
                kind = failure.kind.reason(),
                error = %failure.message,
                failures = st.failures,
                next_attempt = %rfc3339(next),
                "ACME order failed"
            );
            let repeated = st
                .failure
                .as_ref()
                .is_some_and(|(f, _)| f.message == failure.message);
            if !repeated {
                st.events.push(CertEvent {
                    warning: true,
                    reason: failure.kind.reason(),
                    note: format!("{}; next attempt at {}", failure.message, rfc3339(next)),
                });
            }
            st.next_attempt = Some(next);
            st.failure = Some((failure, now));
        }
    }
}

async fn order_once(
    ctx: &JobContext,
    replaces: Option<String>,
) -> Result<(Good, Duration), Failure> {
    let http = ca_client(ctx).await?;
    let ready = account::load_or_register(&ctx.client, &ctx.stack, &ctx.acme, &http).await?;
    ctx.state.lock().unwrap().thumbprint = Some(ready.thumbprint.clone());
    let gateway = http01::GatewaySolver::new(
        ctx.config.gateway_url(&ctx.stack),
        ctx.config.self_check_patience,
        ctx.stack.gateway.proxy_protocol,
    );
    let request = order::Request {
        hosts: ctx.stack.gateway.hosts.clone(),
        profile: ctx.acme.profile.clone(),
        replaces,
        key_algorithm: match ctx.acme.key_algorithm {
            crate::crd::KeyAlgorithm::EcdsaP256 => cert::KeyAlgorithm::EcdsaP256,
            crate::crd::KeyAlgorithm::EcdsaP384 => cert::KeyAlgorithm::EcdsaP384,
            crate::crd::KeyAlgorithm::Rsa2048 => cert::KeyAlgorithm::Rsa2048,
        },
    };
    let started = Instant::now();
    let Some(dns01) = &ctx.acme.dns01 else {
        return issue_with(ctx, &http, ready, &gateway, &request, started).await;
    };
    let progress = ctx.state.lock().unwrap().progress.clone();
    let secret = user_secrets::secret_value(
        &ctx.client,
        &ctx.stack.namespace,
        &dns01.rfc2136.tsig_secret,
        "spec.tls.acme.dns01.rfc2136.tsigSecretRef",
    )
    .await?;
    let key_source = format!(
        "Secret {}, key {:?}",
        dns01.rfc2136.tsig_secret.name, dns01.rfc2136.tsig_secret.key
    );
    let secret = user_secrets::decode_hmac(&secret).map_err(|e| {
        Failure::config(format!(
            "spec.tls.acme.dns01.rfc2136.tsigSecretRef: the TSIG secret in {key_source} is {e}"
        ))
    })?;
    let provider = dns01::rfc2136::Rfc2136::new(
        &dns01.rfc2136,
        secret,
        key_source,
        ctx.config.dns01_ns_port,
        ctx.config.allow_loopback_directory,
    )?;
    let dns = dns01::Dns01Solver::new(
        provider,
        SecretLedger {
            client: ctx.client.clone(),
            stack: ctx.stack.clone(),
        },
        dns01.propagation_timeout,
        progress,
    );
    let solver = order::ByHost {
        first: dns,
        second: gateway,
        use_first: |host: &str| dns01.covers(host),
    };
    issue_with(ctx, &http, ready, &solver, &request, started).await
}

/// The order with `solver`, registering the account again when the CA forgot it; writes the
/// Secret.
async fn issue_with<S: order::Solver>(
    ctx: &JobContext,
    http: &ca_client::CaClient,
    mut ready: account::Ready,
    solver: &S,
    request: &order::Request,
    started: Instant,
) -> Result<(Good, Duration), Failure> {
    let http = http.clone();
    let request = request.clone();
    let mut registered_again = false;
    let issued = loop {
        let attempt = order::issue(
            &ready.account,
            &http,
            solver,
            &ready.thumbprint,
            &request,
            &ctx.metrics,
            SystemTime::now,
        )
        .await;
        match attempt {
            Err(f) if f.kind == FailureKind::AccountUnknown && !registered_again => {
                // The CA forgot the account (a CA reset): register again with the same key,
                // so the thumbprint, and with it the gateway's configuration, stays the same;
                // then order once more.
                tracing::warn!(error = %f.message, "registering the account again");
                let stored = account::read(&ctx.client, &ctx.stack).await?;
                ready =
                    account::register(&ctx.client, &ctx.stack, &ctx.acme, &http, stored.as_ref())
                        .await?;
                ctx.state.lock().unwrap().thumbprint = Some(ready.thumbprint.clone());
                registered_again = true;
            }
            attempt => break attempt?,
        }
    };
    // The Secret may have been replaced by someone else's while the order ran.
    let name = names::tls_secret(&ctx.stack.name);
    let existing = Api::<Secret>::namespaced(ctx.client.clone(), &ctx.stack.namespace)
        .get_opt(&name)
        .await
        .map_err(|e| Failure::kube(format!("reading Secret {name}: {e}")))?;
    if let Some(existing) = existing
        && let Claim::Foreign(why) = ownership::claim(
            &existing.metadata,
            ctx.stack.name.as_str(),
            ctx.stack.uid.as_deref(),
        )
    {
        let conflict = NameConflict {
            kind: "Secret",
            name,
            why,
        };
        return Err(Failure::new(
            FailureKind::NameConflict,
            conflict.to_string(),
        ));
    }
    write_tls_secret(
        &ctx.client,
        &ctx.stack,
        &issued.chain_pem,
        &issued.key_pem,
        false,
    )
    .await
    .map_err(|e| {
        Failure::kube(format!(
            "writing Secret {}: {e}",
            names::tls_secret(&ctx.stack.name)
        ))
    })?;
    Ok((
        Good {
            crt: issued.chain_pem,
            key: issued.key_pem,
            leaf: issued.leaf,
        },
        started.elapsed(),
    ))
}

/// Fetches the CA's renewal window for the certificate `serial`; records it in the state.
pub(super) fn renewal_info_job(
    ctx: JobContext,
    serial: String,
    ari_id: String,
) -> impl Future<Output = ()> + Send + 'static {
    let span = span("renewalInfo", &ctx.stack);
    renewal_info(ctx, serial, ari_id).instrument(span)
}

async fn renewal_info(ctx: JobContext, serial: String, ari_id: String) {
    let now = SystemTime::now();
    let result = async {
        let http = ca_client(&ctx).await?;
        let Some(stored) = account::read(&ctx.client, &ctx.stack).await? else {
            return Err(Failure::config("no ACME account yet"));
        };
        let account = instant_acme::Account::builder_with_http(Box::new(http.clone()))
            .from_credentials(stored.credentials()?)
            .await
            .map_err(|e| Failure::from_acme("reading the CA's directory", e, &http))?;
        let (aki, serial_b64) = ari_id.split_once('.').unwrap_or_default();
        let id = instant_acme::CertificateIdentifier {
            authority_key_identifier: aki.to_string().into(),
            serial: serial_b64.to_string().into(),
        };
        order::timed(&ctx.metrics, "renewalInfo", account.renewal_info(&id))
            .await
            .map_err(|e| Failure::from_acme("fetching renewal information", e, &http))
    }
    .await;
    let mut st = ctx.state.lock().unwrap();
    let (window, retry) = match result {
        Ok((info, retry)) => {
            let at = |t: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(t.max(0) as u64);
            let window = Window {
                start: at(info.suggested_window.start.unix_timestamp()),
                end: at(info.suggested_window.end.unix_timestamp()),
            };
            tracing::info!(
                %serial,
                start = %rfc3339(window.start),
                end = %rfc3339(window.end),
                "renewal information"
            );
            (Some(window), Some(retry))
        }
        // No ARI at this CA, or it failed: the default schedule applies; ask again later.
        Err(f) => {
            tracing::debug!(error = %f.message, "no renewal information");
            (
                st.ari
                    .as_ref()
                    .filter(|a| a.serial == serial)
                    .and_then(|a| a.window),
                None,
            )
        }
    };
    let wait = policy::ari_recheck(retry, ctx.config.ari_min, ctx.config.ari_max);
    st.ari = Some(AriState {
        serial,
        window,
        next_check: now + wait,
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::CertificateSource;

    /// An io::Write into a shared buffer, for the log lines of one test.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The lines a job logs name its stack through the job's span, also those logged by the
    /// modules it calls (here kube's client), and carry no `stack` field of their own; the
    /// span is a root, not a child of the reconcile that started the job (which ends long
    /// before the job). The order here fails at its first request (an API server on a closed
    /// port), which it logs.
    #[tokio::test]
    async fn a_job_logs_inside_a_span_naming_its_stack() {
        let stack = crate::validate::validate(
            &serde_yaml::from_str(
                "apiVersion: opsconductor.io/v1alpha1\nkind: OpsConductorStack\nmetadata: {name: shop, namespace: ops}\nspec:\n  gateway: {hosts: [a.example]}\n  tls: {acme: {directoryUrl: 'https://ca.test/dir', acceptTermsOfService: true}}\n  services: [{name: web, image: web:1, route: /}]\n",
            )
            .unwrap(),
            "ops",
        )
        .unwrap();
        let CertificateSource::Acme(acme) = stack.tls.source.clone() else {
            panic!("an ACME stack");
        };
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", closed.local_addr().unwrap());
        drop(closed);
        let client = Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap();
        let ctx = JobContext {
            client,
            stack,
            acme,
            config: Config::default(),
            metrics: Arc::default(),
            state: Arc::default(),
        };
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || writer.clone())
            .finish();
        let _default = tracing::subscriber::set_default(subscriber);
        let job = {
            let _reconcile = tracing::info_span!("reconciling object").entered();
            order_job(ctx.clone(), Why::NoCertificate, None)
        };
        job.await;

        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        let logged: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let failed = logged
            .iter()
            .find(|v| v["fields"]["message"] == "ACME order failed")
            .unwrap_or_else(|| panic!("no failure logged: {text}"));
        assert_eq!(failed["span"]["name"], "acme_job", "{text}");
        assert_eq!(failed["span"]["job"], "order", "{text}");
        assert_eq!(failed["span"]["namespace"], "ops", "{text}");
        assert_eq!(failed["span"]["stack"], "shop", "{text}");
        assert_eq!(failed["spans"].as_array().map(Vec::len), Some(1), "{text}");
        assert!(failed["fields"].get("stack").is_none(), "{text}");
        // The failure under its own field: a field named `message` would overwrite the
        // line's message in the JSON format.
        assert!(
            failed["fields"]["error"]
                .as_str()
                .is_some_and(|e| e.starts_with("reading the ACME account Secret")),
            "{text}"
        );
        assert_eq!(ctx.state.lock().unwrap().failures, 1);
    }
}
