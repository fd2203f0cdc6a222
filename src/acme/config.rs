//! The settings of the ACME engine: defaults, and the `OPSC_ACME_*` environment variables.

use std::time::Duration;

use super::policy::Backoff;
use crate::model::Stack;
use crate::names;

/// Settings of the ACME engine.
#[derive(Clone, Debug)]
pub struct Config {
    pub cluster_domain: String,
    /// Where the operator reaches the gateway's port 80 for the self-check. Default:
    /// `http://<stack>-gateway.<namespace>.svc.<cluster domain>`. `{stack}` and `{namespace}`
    /// are replaced. Env `OPSC_ACME_GATEWAY_URL`.
    pub gateway_url: Option<String>,
    /// Env `OPSC_ACME_BACKOFF_FIRST_SECONDS`, `OPSC_ACME_BACKOFF_CAP_SECONDS`.
    pub backoff: Backoff,
    /// How long the self-check waits for the gateway to answer (a gateway that is still
    /// rolling out the configuration with the thumbprint). Env `OPSC_ACME_SELF_CHECK_SECONDS`.
    pub self_check_patience: Duration,
    /// Bounds on how often renewal information is fetched again. Env
    /// `OPSC_ACME_ARI_MIN_SECONDS`, `OPSC_ACME_ARI_MAX_SECONDS`.
    pub ari_min: Duration,
    pub ari_max: Duration,
    /// How soon reconcile looks again while a job runs.
    pub poll_interval: Duration,
    /// The longest a stack goes without a look at its certificate Secret (which the operator
    /// does not watch): bounds how long a change by someone else goes unnoticed. Env
    /// `OPSC_ACME_RECHECK_SECONDS`.
    pub recheck: Duration,
    /// Whether the CA may be on a loopback address (`--allow-loopback-acme-directory`).
    pub allow_loopback_directory: bool,
    /// The port on which the zone's NS servers are asked whether they serve a DNS-01 record
    /// (53; a test's servers on loopback listen elsewhere). Env `OPSC_ACME_DNS01_NS_PORT`.
    pub dns01_ns_port: u16,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            cluster_domain: crate::build::DEFAULT_CLUSTER_DOMAIN.into(),
            gateway_url: None,
            backoff: Backoff::DEFAULT,
            self_check_patience: Duration::from_secs(180),
            ari_min: Duration::from_secs(60),
            ari_max: Duration::from_secs(6 * 3600),
            poll_interval: Duration::from_secs(2),
            recheck: Duration::from_secs(60),
            allow_loopback_directory: false,
            dns01_ns_port: 53,
        }
    }
}

impl Config {
    /// The defaults, with the `OPSC_ACME_*` environment variables applied.
    pub fn from_env(cluster_domain: &str) -> Config {
        let secs = |var: &str| -> Option<Duration> {
            std::env::var(var)
                .ok()?
                .parse::<f64>()
                .ok()
                .filter(|v| *v >= 0.0)
                .map(Duration::from_secs_f64)
        };
        let d = Config::default();
        Config {
            cluster_domain: cluster_domain.to_string(),
            gateway_url: std::env::var("OPSC_ACME_GATEWAY_URL")
                .ok()
                .filter(|s| !s.is_empty()),
            backoff: Backoff {
                first: secs("OPSC_ACME_BACKOFF_FIRST_SECONDS").unwrap_or(d.backoff.first),
                cap: secs("OPSC_ACME_BACKOFF_CAP_SECONDS").unwrap_or(d.backoff.cap),
            },
            self_check_patience: secs("OPSC_ACME_SELF_CHECK_SECONDS")
                .unwrap_or(d.self_check_patience),
            ari_min: secs("OPSC_ACME_ARI_MIN_SECONDS").unwrap_or(d.ari_min),
            ari_max: secs("OPSC_ACME_ARI_MAX_SECONDS").unwrap_or(d.ari_max),
            poll_interval: d.poll_interval,
            recheck: secs("OPSC_ACME_RECHECK_SECONDS").unwrap_or(d.recheck),
            allow_loopback_directory: d.allow_loopback_directory,
            dns01_ns_port: std::env::var("OPSC_ACME_DNS01_NS_PORT")
                .ok()
                .and_then(|p| p.parse().ok())
                .filter(|p| *p > 0)
                .unwrap_or(d.dns01_ns_port),
        }
    }

    pub(super) fn gateway_url(&self, stack: &Stack) -> String {
        match &self.gateway_url {
            Some(template) => template
                .replace("{stack}", stack.name.as_str())
                .replace("{namespace}", &stack.namespace),
            None => format!(
                "http://{}.{}.svc.{}",
                names::gateway(&stack.name),
                stack.namespace,
                self.cluster_domain
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gateway_url_defaults_to_the_service_and_can_be_templated() {
        let stack = crate::validate::validate(
            &serde_yaml::from_str(
                "apiVersion: opsconductor.io/v1alpha1\nkind: OpsConductorStack\nmetadata: {name: prod, namespace: ops}\nspec:\n  gateway: {hosts: [a.example]}\n  tls: {acme: {directoryUrl: 'https://ca.test/dir', acceptTermsOfService: true}}\n  services: [{name: web, image: web:1, route: /}]\n",
            )
            .unwrap(),
            "ops",
        )
        .unwrap();
        let config = Config::default();
        assert_eq!(
            config.gateway_url(&stack),
            "http://prod-gateway.ops.svc.cluster.local"
        );
        let templated = Config {
            gateway_url: Some("http://127.0.0.1:8080/{namespace}/{stack}".into()),
            ..Config::default()
        };
        assert_eq!(
            templated.gateway_url(&stack),
            "http://127.0.0.1:8080/ops/prod"
        );
    }
}
