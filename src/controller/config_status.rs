//! `GatewayConfigLoaded`: whether every running gateway pod has loaded the nginx
//! configuration the operator wrote, and what nginx said when it refused one.
//!
//! A changed configuration reaches a running pod through the kubelet's update of the
//! ConfigMap volume (at its next sync of the pod, up to about a minute and a half), then the
//! pod's reload loop tests it with `nginx -t` and reloads nginx only if that passes
//! ([`crate::build::gateway::RELOAD_ON_CHANGE`]). A file that fails the test is never loaded:
//! nginx keeps serving the previous one. The loop writes its last result, `loaded <id>` or
//! `rejected <id>` with nginx's message, where `<id>` names the file
//! ([`crate::build::nginx::CONFIG_ID_PREFIX`]); nginx serves that result on
//! [`crate::build::nginx::CONFIG_STATUS_PORT`] (the gateway's NetworkPolicy admits the
//! operator's pods to it). The operator asks every Running gateway pod at each reconcile:
//!
//! | what the pods say | condition | reason |
//! |---|---|---|
//! | every pod loaded the file the operator wrote | True | `Loaded` |
//! | a pod refused it | False (and `Ready` False) | `Rejected` |
//! | some still run another file | Unknown (the stack is looked at again in 10 s) | `Pending` |
//! | no pod answered | Unknown | `Unreachable` |
//! | no gateway pod runs | Unknown | `NoPods` |

use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::core::v1::Pod;
use kube::Resource;

use super::Context;
use super::status::Verdict;
use crate::build::nginx::{CONFIG_STATUS_PORT, CONFIG_STATUS_URL_PATH};
use crate::model::Stack;
use crate::names::{self, Component};

/// How soon a stack whose pods still run another configuration is looked at again.
pub const PENDING_RECHECK: Duration = Duration::from_secs(10);

/// How soon a stack none of whose pods answered is looked at again (a pod that has just
/// started may not listen yet; its becoming Ready also brings a reconcile).
pub const UNREACHABLE_RECHECK: Duration = Duration::from_secs(30);

/// How long one pod may take to answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// Most pods asked per reconcile (a gateway rarely runs more; the verdict says when some were
/// not asked).
const MAX_PODS_ASKED: usize = 20;

/// Most characters of nginx's message in the condition.
const MAX_MESSAGE: usize = 300;

/// What one pod's reload loop reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    Loaded(String),
    Rejected {
        id: String,
        message: String,
    },
    /// No answer, or one that is not the loop's (the error).
    Unreadable(String),
}

impl Answer {
    /// The loop's file: `loaded <id>` or `rejected <id>` on the first line, nginx's message on
    /// the lines after a rejection.
    pub fn parse(body: &str) -> Answer {
        let mut lines = body.lines();
        let first = lines.next().unwrap_or_default();
        let rest: Vec<&str> = lines.map(str::trim).filter(|l| !l.is_empty()).collect();
        match first.split_once(' ') {
            Some(("loaded", id)) if !id.trim().is_empty() => Answer::Loaded(id.trim().into()),
            Some(("rejected", id)) if !id.trim().is_empty() => Answer::Rejected {
                id: id.trim().into(),
                message: shorten(&rest.join(" ")),
            },
            _ => Answer::Unreadable(format!("unexpected answer {:?}", shorten(first))),
        }
    }
}

fn shorten(text: &str) -> String {
    let mut out: String = text.chars().take(MAX_MESSAGE).collect();
    if text.chars().count() > MAX_MESSAGE {
        out.push_str("...");
    }
    out
}

/// The condition from the pods' answers (pod name, answer) for the configuration `want`,
/// `not_asked` pods beyond [`MAX_PODS_ASKED`]; and how soon the stack should be looked at
/// again: [`PENDING_RECHECK`] while pods are on their way to it, [`UNREACHABLE_RECHECK`] when
/// none answered (the others change with a pod's start, readiness or end, which the pod watch
/// brings).
pub fn verdict(
    want: &str,
    answers: &[(String, Answer)],
    not_asked: usize,
) -> (Verdict, Option<Duration>) {
    if answers.is_empty() {
        return (
            Verdict::unknown("NoPods", "no gateway pod is running yet"),
            None,
        );
    }
    let rejected: Vec<(&str, &str)> = answers
        .iter()
        .filter_map(|(pod, a)| match a {
            Answer::Rejected { id, message } if id == want => {
                Some((pod.as_str(), message.as_str()))
            }
            _ => None,
        })
        .collect();
    if let Some((_, message)) = rejected.first() {
        let pods: Vec<&str> = rejected.iter().map(|(p, _)| *p).collect();
        return (
            Verdict::not(
                "Rejected",
                format!(
                    "gateway pod(s) {} refused configuration {want} and keep serving the one \
                     they loaded before; nginx -t said: {message}",
                    pods.join(", ")
                ),
            ),
            None,
        );
    }
    let loaded = answers
        .iter()
        .filter(|(_, a)| matches!(a, Answer::Loaded(id) if id == want))
        .count();
    let unreadable: Vec<(&str, &str)> = answers
        .iter()
        .filter_map(|(pod, a)| match a {
            Answer::Unreadable(e) => Some((pod.as_str(), e.as_str())),
            _ => None,
        })
        .collect();
    let asked = answers.len();
    if loaded == asked && not_asked == 0 {
        return (
            Verdict::ok(
                "Loaded",
                format!("every gateway pod ({asked}) runs configuration {want}"),
            ),
            None,
        );
    }
    if unreadable.len() == asked {
        let (pod, error) = unreadable[0];
        return (
            Verdict::unknown(
                "Unreachable",
                format!(
                    "no gateway pod told which configuration it runs (pod {pod}: {error}); the \
                     operator asks each pod on port {CONFIG_STATUS_PORT}, which the gateway's \
                     NetworkPolicy opens to the operator's pods when the operator knows its \
                     namespace (POD_NAMESPACE, set by the chart)"
                ),
            ),
            Some(UNREACHABLE_RECHECK),
        );
    }
    let mut message = format!(
        "{loaded} of {} gateway pods run configuration {want}; the kubelet brings a changed \
         ConfigMap to each pod at its next sync of it (within about a minute and a half)",
        asked + not_asked
    );
    if let Some((pod, error)) = unreadable.first() {
        message.push_str(&format!("; pod {pod} did not answer: {error}"));
    }
    (Verdict::unknown("Pending", message), Some(PENDING_RECHECK))
}

/// The condition for `model`, whose gateway configuration is `want`: asks each Running gateway
/// pod of the watch cache. The second value: when to look again (see [`verdict`]).
pub async fn check(ctx: &Context, model: &Stack, want: &str) -> (Verdict, Option<Duration>) {
    let selector = names::selector(&model.name, Component::Gateway);
    let mut pods: Vec<(String, String)> = ctx
        .stores
        .audit
        .pods
        .in_namespace(Some(&model.namespace))
        .iter()
        // What the cache keeps decoded first (deletion, the stack label): only this stack's
        // pods are decoded.
        .filter(|p| {
            p.meta().deletion_timestamp.is_none()
                && p.label(names::STACK_LABEL) == Some(model.name.as_str())
        })
        .map(|p| p.decode())
        .filter(|p: &Pod| {
            p.metadata
                .labels
                .as_ref()
                .is_some_and(|l| selector.iter().all(|(k, v)| l.get(k) == Some(v)))
        })
        .filter_map(|p| {
            let status = p.status?;
            (status.phase.as_deref() == Some("Running"))
                .then_some(())
                .and(status.pod_ip)
                .map(|ip| (p.metadata.name.unwrap_or_default(), ip))
        })
        .collect();
    pods.sort();
    let not_asked = pods.len().saturating_sub(MAX_PODS_ASKED);
    pods.truncate(MAX_PODS_ASKED);
    let answers = futures::future::join_all(pods.into_iter().map(|(pod, ip)| async move {
        let answer = ask(&ip).await;
        (pod, answer)
    }))
    .await;
    verdict(want, &answers, not_asked)
}

fn client() -> &'static HyperClient<HttpConnector, Empty<Bytes>> {
    static CLIENT: OnceLock<HyperClient<HttpConnector, Empty<Bytes>>> = OnceLock::new();
    CLIENT.get_or_init(|| {
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(ANSWER_TIMEOUT));
        HyperClient::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build(http)
    })
}

/// One pod's answer at `ip`.
async fn ask(ip: &str) -> Answer {
    let host = match ip.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(v6)) => format!("[{v6}]"),
        Ok(v4) => v4.to_string(),
        Err(_) => return Answer::Unreadable(format!("not an address: {ip:?}")),
    };
    let url = format!("http://{host}:{CONFIG_STATUS_PORT}{CONFIG_STATUS_URL_PATH}");
    let request = match http::Request::get(&url).body(Empty::new()) {
        Ok(r) => r,
        Err(e) => return Answer::Unreadable(format!("GET {url}: {e}")),
    };
    let fetched = tokio::time::timeout(ANSWER_TIMEOUT, async {
        let response = client().request(request).await.map_err(|e| {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                text.push_str(&format!(": {s}"));
                source = s.source();
            }
            text
        })?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok::<_, String>((status, body))
    })
    .await;
    match fetched {
        Err(_) => Answer::Unreadable(format!("GET {url}: no answer within {ANSWER_TIMEOUT:?}")),
        Ok(Err(e)) => Answer::Unreadable(format!("GET {url}: {e}")),
        Ok(Ok((status, _))) if !status.is_success() => {
            Answer::Unreadable(format!("GET {url}: HTTP {}", status.as_u16()))
        }
        Ok(Ok((_, body))) => Answer::parse(&String::from_utf8_lossy(&body)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loaded(pod: &str, id: &str) -> (String, Answer) {
        (pod.into(), Answer::Loaded(id.into()))
    }

    #[test]
    fn the_loops_file_is_read() {
        assert_eq!(
            Answer::parse("loaded abc\n\n"),
            Answer::Loaded("abc".into())
        );
        assert_eq!(
            Answer::parse("rejected abc\nnginx: [emerg] unknown directive \"x\"\n  in line 3\n"),
            Answer::Rejected {
                id: "abc".into(),
                message: "nginx: [emerg] unknown directive \"x\" in line 3".into()
            }
        );
        assert!(matches!(Answer::parse(""), Answer::Unreadable(_)));
        assert!(matches!(Answer::parse("loaded \n"), Answer::Unreadable(_)));
        assert!(matches!(Answer::parse("<html>"), Answer::Unreadable(_)));
        let Answer::Rejected { message, .. } =
            Answer::parse(&format!("rejected a\n{}", "x".repeat(1000)))
        else {
            panic!()
        };
        assert_eq!(message.len(), MAX_MESSAGE + 3);
    }

    #[test]
    fn every_pod_with_the_file_is_loaded_a_refusal_is_false_the_rest_unknown() {
        let (v, soon) = verdict("new", &[loaded("a", "new"), loaded("b", "new")], 0);
        assert!(
            v.ok && !v.unknown && v.reason == "Loaded" && soon.is_none(),
            "{v:?}"
        );
        assert!(v.message.contains("(2)"), "{v:?}");

        let (v, soon) = verdict("new", &[loaded("a", "new"), loaded("b", "old")], 0);
        assert!(
            v.unknown && v.reason == "Pending" && soon == Some(PENDING_RECHECK),
            "{v:?}"
        );
        assert!(v.message.starts_with("1 of 2 gateway pods"), "{v:?}");

        let refused = (
            "b".to_string(),
            Answer::Rejected {
                id: "new".into(),
                message: "nginx: [emerg] bad".into(),
            },
        );
        let (v, soon) = verdict("new", &[loaded("a", "new"), refused.clone()], 0);
        assert!(
            !v.ok && !v.unknown && v.reason == "Rejected" && soon.is_none(),
            "{v:?}"
        );
        assert!(
            v.message.contains("pod(s) b refused configuration new")
                && v.message.ends_with("nginx -t said: nginx: [emerg] bad"),
            "{v:?}"
        );
        // A refusal of an older file says nothing about this one.
        let old_refusal = (
            "b".to_string(),
            Answer::Rejected {
                id: "old".into(),
                message: "x".into(),
            },
        );
        let (v, _) = verdict("new", &[loaded("a", "new"), old_refusal], 0);
        assert_eq!(v.reason, "Pending");

        let down = (
            "a".to_string(),
            Answer::Unreadable("connection refused".into()),
        );
        let (v, soon) = verdict("new", std::slice::from_ref(&down), 0);
        assert!(
            v.unknown && v.reason == "Unreachable" && soon == Some(UNREACHABLE_RECHECK),
            "{v:?}"
        );
        assert!(v.message.contains("connection refused"), "{v:?}");
        let (v, soon) = verdict("new", &[loaded("b", "new"), down], 0);
        assert!(
            v.reason == "Pending" && soon.is_some() && v.message.contains("pod a did not answer")
        );

        let (v, soon) = verdict("new", &[], 0);
        assert!(v.unknown && v.reason == "NoPods" && soon.is_none(), "{v:?}");
        // Pods not asked are not known to run it.
        let (v, _) = verdict("new", &[loaded("a", "new")], 1);
        assert!(
            v.reason == "Pending" && v.message.starts_with("1 of 2"),
            "{v:?}"
        );
    }
}
