//! The errors that stop one look at a stack's certificate ([`super::Manager::reconcile`]); the
//! controller retries the reconcile with its backoff. A failed order or renewal-information
//! check is no error here: the job records it as a [`super::Failure`] and reports it in the
//! status.

use super::cert::CertError;

/// An error of [`super::Manager::reconcile`], with a bounded [`Error::reason`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request for the certificate's Secrets failed.
    #[error("Kubernetes API request failed: {0}")]
    Kube(#[from] kube::Error),
    /// The temporary self-signed certificate for `<stack>-tls` could not be made.
    #[error("cannot make the temporary certificate for Secret {secret}: {source}")]
    Bootstrap { secret: String, source: CertError },
}

impl Error {
    /// A bounded word for metrics and Events.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube(_) => "KubernetesError",
            Error::Bootstrap { .. } => "BootstrapCertificate",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The controller reports a certificate's API error as any other API error, and the
    /// bootstrap certificate's error under its own reason, naming the Secret.
    #[test]
    fn certificate_errors_reach_the_controller_with_bounded_reasons() {
        let conflict: kube::core::Status = serde_json::from_value(serde_json::json!({
            "status": "Failure", "message": "the object has been modified",
            "reason": "Conflict", "code": 409
        }))
        .unwrap();
        let api = crate::controller::Error::from(Error::Kube(kube::Error::Api(Box::new(conflict))));
        assert_eq!(api.reason(), "Conflict");
        assert!(matches!(
            api,
            crate::controller::Error::Certificate(crate::controller::Request::Kube(_))
        ));

        let bootstrap = Error::Bootstrap {
            secret: "shop-tls".into(),
            source: CertError::Generate("no randomness".into()),
        };
        assert_eq!(bootstrap.reason(), "BootstrapCertificate");
        let reconcile = crate::controller::Error::from(bootstrap);
        assert_eq!(reconcile.reason(), "BootstrapCertificate");
        assert_eq!(
            reconcile.to_string(),
            "cannot make the temporary certificate for Secret shop-tls: cannot make a key or \
             certificate: no randomness"
        );
    }
}
