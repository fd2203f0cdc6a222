//! The errors of one reconcile: one variant per pipeline stage, each with a bounded
//! `reason()` (a metric label and a log field) and the `stage()` it failed in.

/// A request to the API server that failed, or an object that could not be serialized for it.
#[derive(Debug, thiserror::Error)]
pub enum Request {
    #[error("Kubernetes API request failed: {0}")]
    Kube(#[from] kube::Error),
    #[error("cannot serialize an object: {0}")]
    Json(#[from] serde_json::Error),
}

impl Request {
    pub fn reason(&self) -> &'static str {
        match self {
            Request::Kube(kube::Error::Api(e)) if e.code == 409 => "Conflict",
            Request::Kube(kube::Error::Api(e)) if e.code == 403 => "Forbidden",
            Request::Kube(kube::Error::Api(e)) if e.code == 422 => "Invalid",
            Request::Kube(kube::Error::Api(e)) if e.code == 429 => "Throttled",
            Request::Kube(kube::Error::Api(e)) if e.code >= 500 => "ServerError",
            Request::Kube(_) => "ApiUnavailable",
            Request::Json(_) => "Serialization",
        }
    }
}

/// Errors of one reconcile, by the stage that failed (see [`super::reconcile`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// gather: a stack without a namespace cannot be reconciled.
    #[error("the stack has no namespace")]
    NoNamespace,
    /// validate: the spec is invalid, and writing that into the status failed.
    #[error("cannot report the invalid spec: {0}")]
    Invalid(#[source] Request),
    /// dereference: the certificate (the user's TLS Secret, or the ACME engine's Secrets).
    #[error("cannot resolve the certificate: {0}")]
    Certificate(#[source] Request),
    /// dereference: the ACME engine could not make the temporary self-signed certificate.
    #[error("{0}")]
    Bootstrap(#[source] crate::acme::Error),
    /// apply: a write or read of one of the stack's objects.
    #[error("cannot apply the stack's objects: {0}")]
    Apply(#[source] Request),
    /// apply: the namespace's admission marker label.
    #[error("cannot set the admission marker of namespace {namespace}: {source}")]
    Marker { namespace: String, source: Request },
    /// apply: our marker write did not stick.
    #[error(
        "the admission marker of namespace {namespace} is still {found:?} after our write (is it held by another field manager?)"
    )]
    MarkerNotApplied {
        namespace: String,
        found: Option<String>,
    },
    /// status: the status write.
    #[error("cannot write the status: {0}")]
    Status(#[source] Request),
}

impl Error {
    /// Why, in one word from a fixed set: the class of the failed request, or what went wrong
    /// where no request failed. The values of `opsconductor_reconcile_errors_total{reason}`.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::NoNamespace => "NoNamespace",
            Error::MarkerNotApplied { .. } => "MarkerNotApplied",
            Error::Bootstrap(e) => e.reason(),
            Error::Invalid(r)
            | Error::Certificate(r)
            | Error::Apply(r)
            | Error::Marker { source: r, .. }
            | Error::Status(r) => r.reason(),
        }
    }

    /// The pipeline stage that failed.
    pub fn stage(&self) -> &'static str {
        match self {
            Error::NoNamespace => "gather",
            Error::Invalid(_) => "validate",
            Error::Certificate(_) | Error::Bootstrap(_) => "dereference",
            Error::Apply(_) | Error::Marker { .. } | Error::MarkerNotApplied { .. } => "apply",
            Error::Status(_) => "status",
        }
    }
}

/// A Kubernetes API error of the certificate's is one like any other (the same reasons).
impl From<crate::acme::Error> for Error {
    fn from(e: crate::acme::Error) -> Error {
        match e {
            crate::acme::Error::Kube(e) => Error::Certificate(Request::Kube(e)),
            e => Error::Bootstrap(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(code: u16) -> Request {
        Request::Kube(kube::Error::Api(
            kube::core::Status::failure("x", "y")
                .with_code(code)
                .boxed(),
        ))
    }

    #[test]
    fn reasons_are_the_request_class_whatever_the_stage() {
        let cases = [
            (Error::Apply(api(409)), "Conflict", "apply"),
            (Error::Status(api(403)), "Forbidden", "status"),
            (Error::Certificate(api(503)), "ServerError", "dereference"),
            (Error::Invalid(api(422)), "Invalid", "validate"),
            (Error::NoNamespace, "NoNamespace", "gather"),
            (
                Error::MarkerNotApplied {
                    namespace: "a".into(),
                    found: None,
                },
                "MarkerNotApplied",
                "apply",
            ),
        ];
        for (error, reason, stage) in cases {
            assert_eq!((error.reason(), error.stage()), (reason, stage), "{error}");
        }
    }
}
