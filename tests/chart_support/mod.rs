//! The chart under test and the pinned helm that renders it, for the helm-only tests
//! (`chart_template.rs`) and the tests against the real control plane (`packaging.rs`).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::support::tools_bin_dir;

pub const CHART: &str = "charts/opsconductor-operator";

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Parses multi-document YAML into JSON values, skipping empty documents.
pub fn documents(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| serde::Deserialize::deserialize(d).expect("valid YAML"))
        .filter(|v: &Value| !v.is_null())
        .collect()
}

pub fn find<'a>(docs: &'a [Value], kind: &str, name_suffix: &str) -> &'a Value {
    docs.iter()
        .find(|d| {
            d["kind"] == kind
                && d["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.ends_with(name_suffix))
        })
        .unwrap_or_else(|| panic!("no {kind} named *{name_suffix} in the rendered chart"))
}

// ---------------------------------------------------------------------------------------------
// helm
// ---------------------------------------------------------------------------------------------

pub fn helm_path() -> Option<PathBuf> {
    Some(tools_bin_dir()?.join("helm"))
}

/// `helm <args>` (with the chart path relative to the repository root); stdout, or a panic with
/// stderr.
pub fn helm(args: &[&str], kubeconfig: Option<&Path>) -> String {
    // helm's caches and config in a directory of its own (removed with `_home`).
    let (mut cmd, _home) = crate::support::controlplane::helm_command();
    cmd.current_dir(root()).args(args);
    if let Some(kc) = kubeconfig {
        cmd.env("KUBECONFIG", kc);
    }
    let out = cmd.output().expect("helm runs");
    assert!(
        out.status.success(),
        "helm {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `helm template` of the chart with `extra` arguments; None when helm is explicitly skipped.
pub fn template(release: &str, namespace: &str, extra: &[&str]) -> Option<String> {
    helm_path()?;
    let mut args = vec!["template", release, CHART, "--namespace", namespace];
    args.extend_from_slice(extra);
    Some(helm(&args, None))
}

/// `helm template` that is expected to fail; its error message.
pub fn template_error(extra: &[&str]) -> Option<String> {
    let helm = helm_path()?;
    let mut args = vec!["template", "t", CHART];
    args.extend_from_slice(extra);
    let out = Command::new(helm)
        .current_dir(root())
        .args(&args)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "helm template {extra:?} was expected to fail"
    );
    Some(String::from_utf8_lossy(&out.stderr).into_owned())
}

pub fn yaml_has(docs: &[Value], needle: &str) -> bool {
    docs.iter().any(|d| d.to_string().contains(needle))
}
