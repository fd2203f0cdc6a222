//! ACME certificates for the gateway: renewal policy, certificate checks, account, orders,
//! and the [`Manager`] the controller asks once per reconcile.
//!
//! Reconcile never waits for the CA: [`Manager::reconcile`] reads the Secrets, decides with
//! [`policy`], starts at most one background job per stack (an order, or an ARI check) and
//! reports what it knows. The job writes the Secret `<stack>-tls` when it succeeds, and
//! records its failure and the next attempt otherwise. See `docs/acme.md`.
//!
//! The pipeline, in the order one reconcile meets it:
//! - [`manager`]: the [`Manager`]: the per-stack state, one look per reconcile, the report
//!   (status, condition, Events, metrics); talks to the API server, never to the CA;
//! - [`tls_secret`]: the certificate in use, read from and written to `<stack>-tls` (the
//!   bootstrap certificate, the repair after a change by someone else, the DNS-01 ledger);
//! - [`policy`]: when to order and when to retry (pure, clock passed in);
//! - `readiness`: from what was found, the status and condition to report and the job that is
//!   due (pure, clock passed in);
//! - `jobs`: the background jobs, an order or a renewal-information check;
//! - [`account`]: the account Secret, registration, the thumbprint;
//! - [`ca_client`]: the CA's HTTP client (CA bundle, no internal addresses, `Retry-After`);
//! - [`order`]: one order behind the [`order::Solver`] interface;
//! - [`http01`]: HTTP-01 through the gateway;
//! - [`dns01`]: DNS-01 through a [`dns01::DnsProvider`] ([`dns01::rfc2136`]: RFC 2136 with TSIG);
//! - [`cert`]: inspecting a `kubernetes.io/tls` Secret's contents, keys, CSRs, the bootstrap
//!   certificate.
//!
//! Beside it: [`error`] (what stops a reconcile), [`failure`] (what went wrong in a job, and
//! the backoff resumed from the status), `state` (what is remembered per stack), [`config`]
//! (the settings), [`user_secrets`] (the Secrets the user supplies) and [`timestamp`].

pub mod account;
pub mod ca_client;
pub mod cert;
pub mod config;
pub mod dns01;
pub mod error;
pub mod failure;
pub mod http01;
mod jobs;
pub mod manager;
pub mod order;
pub mod policy;
mod readiness;
mod state;
pub mod timestamp;
pub mod tls_secret;
pub mod user_secrets;

pub use config::Config;
pub use error::Error;
pub use failure::{Failure, FailureKind, Recorded};
pub use manager::{CertEvent, Manager, Report};
pub use timestamp::rfc3339;
pub use tls_secret::{DIGEST_ANNOTATION, DNS01_RECORDS_ANNOTATION, SOURCE_ANNOTATION};
pub use user_secrets::user_secret_status;
