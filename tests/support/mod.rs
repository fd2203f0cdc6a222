//! Test support for integration tests that need a real Kubernetes control plane.
//!
//! Use from an integration test file with `mod support;`. See `docs/controlplane.md`.
//!
//! ```ignore
//! mod support;
//!
//! #[tokio::test]
//! async fn my_test() {
//!     let Some(ns) = support::TestNamespace::new("my-test").await else { return };
//!     let client = ns.client.clone();
//!     // ... use ns.name; the namespace is deleted when `ns` drops, also on panic.
//! }
//! ```
#![allow(dead_code, unused_imports)]

pub mod audit;
pub mod controlplane;
pub mod identity;
pub mod measured;
pub mod netpol;
pub mod node;
pub mod operator;
pub mod process;

pub use audit::{AuditEvent, AuditLog, AuditMark};
pub use controlplane::{
    ControlPlane, TestNamespace, admin_client, client_as, control_plane, eventually, tools_bin_dir,
    unique_name,
};
pub use measured::measured;
