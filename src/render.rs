//! `render`: the objects the operator would create for a stack file, offline.

use std::path::Path;

use kube::Resource;

use crate::build::{self, BuildOptions, Bundle};
use crate::crd::OpsConductorStack;
use crate::validate::{self, ValidationErrors};

/// Output format of `render`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A multi-document YAML stream.
    Yaml,
    /// One JSON array.
    Json,
}

/// Why a stack file cannot be rendered. Each variant prints as one clear message.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not valid YAML: {message}")]
    Yaml { path: String, message: String },
    #[error("{path}: contains no document")]
    Empty { path: String },
    #[error("{path}: contains {count} documents; render takes exactly one OpsConductorStack")]
    Several { path: String, count: usize },
    #[error(
        "{path}: not an OpsConductorStack: found apiVersion {api_version:?}, kind {kind:?}; expected apiVersion \"opsconductor.io/v1alpha1\", kind \"OpsConductorStack\""
    )]
    WrongKind {
        path: String,
        api_version: String,
        kind: String,
    },
    #[error("{path}: {field}: {message}")]
    Schema {
        path: String,
        field: String,
        message: String,
    },
    #[error("{0}")]
    Invalid(#[from] ValidationErrors),
}

/// Reads one OpsConductorStack from YAML (or JSON) text. `path` only labels messages.
pub fn parse_stack(path: &str, text: &str) -> Result<OpsConductorStack, InputError> {
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(text) {
        let value = serde_yaml::Value::deserialize(doc).map_err(|e| InputError::Yaml {
            path: path.into(),
            message: e.to_string(),
        })?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    let value = match docs.len() {
        0 => return Err(InputError::Empty { path: path.into() }),
        1 => docs.remove(0),
        count => {
            return Err(InputError::Several {
                path: path.into(),
                count,
            });
        }
    };
    let field = |name: &str| {
        value
            .get(name)
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string()
    };
    let (api_version, kind) = (field("apiVersion"), field("kind"));
    if api_version != OpsConductorStack::api_version(&()) || kind != OpsConductorStack::kind(&()) {
        return Err(InputError::WrongKind {
            path: path.into(),
            api_version,
            kind,
        });
    }
    serde_path_to_error::deserialize(value).map_err(|e| InputError::Schema {
        path: path.into(),
        field: e.path().to_string(),
        message: e.inner().to_string(),
    })
}

use serde::Deserialize as _;

/// Parses, validates and builds the stack in `text`.
pub fn bundle_for(
    path: &str,
    text: &str,
    namespace: &str,
    options: &BuildOptions,
) -> Result<Bundle, InputError> {
    let stack = parse_stack(path, text)?;
    let cluster = validate::egress_cluster_problems(&stack, &options.cluster_cidrs);
    match validate::validate(&stack, namespace) {
        Ok(model) if cluster.is_empty() => Ok(build::build(&model, options)),
        result => {
            let mut errors = result.err().map(|e| e.0).unwrap_or_default();
            errors.extend(
                cluster
                    .into_iter()
                    .filter(|c| !errors.contains(c))
                    .collect::<Vec<_>>(),
            );
            Err(ValidationErrors(errors).into())
        }
    }
}

/// Serializes the bundle in `format`. Deterministic: the same bundle gives the same bytes.
pub fn format_bundle(bundle: &Bundle, format: Format) -> String {
    let values = bundle.to_values();
    match format {
        Format::Json => {
            let mut s = serde_json::to_string_pretty(&values).expect("JSON values serialize");
            s.push('\n');
            s
        }
        Format::Yaml => values
            .iter()
            .map(|v| {
                format!(
                    "---\n{}",
                    serde_yaml::to_string(v).expect("JSON values serialize as YAML")
                )
            })
            .collect(),
    }
}

/// Reads `file` and renders it.
pub fn render_file(
    file: &Path,
    namespace: &str,
    options: &BuildOptions,
    format: Format,
) -> Result<String, InputError> {
    let path = file.display().to_string();
    let text = std::fs::read_to_string(file).map_err(|source| InputError::Read {
        path: path.clone(),
        source,
    })?;
    Ok(format_bundle(
        &bundle_for(&path, &text, namespace, options)?,
        format,
    ))
}
