//! The Events a reconcile publishes about its stack: what apply wrote, name conflicts,
//! violations found and fixed, drift reported in Audit mode. Each is announced once, not on
//! every reconcile (an unchanged stack causes no write, Events included).

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::ResourceExt;
use kube::runtime::events::{Event, EventType};

use super::apply::{Cause, Report};
use super::status;
use super::{Context, reference, stack_key};
use crate::crd::{OpsConductorStack, OpsConductorStackStatus, Violation};
use crate::ownership::NameConflict;

/// Publishes the Events of one stack.
pub(super) struct Events<'a> {
    stack: &'a OpsConductorStack,
    ctx: &'a Context,
}

impl<'a> Events<'a> {
    pub fn new(stack: &'a OpsConductorStack, ctx: &'a Context) -> Self {
        Self { stack, ctx }
    }

    /// What apply wrote: one Event for everything created and one for everything updated;
    /// one per object adopted, reverted or pruned (Events with the same reason about the same
    /// objects are folded into one series, so a per-object `related` keeps each one visible).
    pub async fn report(&self, report: &Report) {
        for cause in [Cause::Created, Cause::Adopted, Cause::Updated, Cause::Drift] {
            let objects: Vec<(&str, &str)> = report
                .written
                .iter()
                .filter(|(c, _, _)| *c == cause)
                .map(|(_, kind, name)| (*kind, name.as_str()))
                .collect();
            match cause {
                Cause::Created | Cause::Updated => self.written(cause, &objects).await,
                Cause::Adopted | Cause::Drift => {
                    for &(kind, name) in &objects {
                        self.written_one(cause, kind, name).await;
                    }
                }
            }
        }
        for (kind, name) in &report.pruned {
            let note = format!("deleted {kind}/{name}: the stack no longer wants it");
            let about = Some((*kind, name.as_str()));
            self.send(EventType::Normal, "Pruned", "Delete", &note, about)
                .await;
        }
    }

    /// One Event naming every object created (or updated), when there is any.
    async fn written(&self, cause: Cause, objects: &[(&str, &str)]) {
        let (reason, verb) = match cause {
            Cause::Created => ("Created", "created"),
            _ => ("Updated", "updated"),
        };
        if !objects.is_empty() {
            let listed: Vec<String> = objects.iter().map(|(k, n)| format!("{k}/{n}")).collect();
            let note = format!("{verb} {}", listed.join(", "));
            self.send(EventType::Normal, reason, "Apply", &note, None)
                .await;
        }
    }

    /// The Event of one object adopted (or reverted after drift).
    async fn written_one(&self, cause: Cause, kind: &'static str, name: &str) {
        let (type_, reason, action, note) = if cause == Cause::Adopted {
            let note = format!(
                "adopted {kind}/{name}: its {} annotation hands it to this stack",
                crate::ownership::ADOPT_ANNOTATION
            );
            (EventType::Normal, "Adopted", "Apply", note)
        } else {
            self.ctx.metrics.drift(kind, "reverted");
            let note = format!("reverted changes made by others to {kind}/{name}");
            tracing::info!(%note, "drift reverted");
            (EventType::Warning, "DriftReverted", "Revert", note)
        };
        self.send(type_, reason, action, &note, Some((kind, name)))
            .await;
    }

    /// A Warning Event for each object that is newly found to be someone else's.
    pub async fn conflicts(&self, conflicts: &[NameConflict]) {
        let key = stack_key(self.stack);
        let now: BTreeSet<String> = conflicts.iter().map(NameConflict::object).collect();
        let before = {
            let mut announced = self.ctx.announced_conflicts.lock().unwrap();
            // After a restart, what the stored Ready message names was announced already.
            let before = announced.remove(&key).unwrap_or_else(|| {
                status::condition(self.stack.status.as_ref(), status::READY)
                    .filter(|c| c.reason == "NameConflict")
                    .map(|c| {
                        c.message
                            .split_whitespace()
                            .map(|w| w.trim_matches(|ch| ",;:()".contains(ch)).to_string())
                            .collect()
                    })
                    .unwrap_or_default()
            });
            if !now.is_empty() {
                announced.insert(key.clone(), now.clone());
            }
            before
        };
        for c in conflicts.iter().filter(|c| !before.contains(&c.object())) {
            let note = format!("left alone: {c}");
            tracing::warn!(%note, "name conflict");
            let about = Some((c.kind, c.name.as_str()));
            self.send(EventType::Warning, "NameConflict", "Apply", &note, about)
                .await;
        }
    }

    /// An Event for each violation that appeared, and for each that was fixed.
    pub async fn violations(&self, new_status: &OpsConductorStackStatus) {
        // What this process last announced for the stack; the stack's own status is only the
        // starting point after a restart, as the cached stack can lag our last status write.
        let before: Vec<Violation> = {
            let mut announced = self.ctx.announced_violations.lock().unwrap();
            let key = stack_key(self.stack);
            let before = announced.get(&key).cloned().unwrap_or_else(|| {
                self.stack
                    .status
                    .as_ref()
                    .map(|s| s.violations.clone())
                    .unwrap_or_default()
            });
            announced.insert(key, new_status.violations.clone());
            before
        };
        let now = &new_status.violations;
        for v in now.iter().filter(|v| !before.contains(v)) {
            let note = format!("{} {}: {}", v.kind, v.name, v.reason);
            let about = Some((v.kind.as_str(), v.name.as_str()));
            self.send(EventType::Warning, "PolicyViolation", "Audit", &note, about)
                .await;
        }
        let fixed = |v: &&Violation| !now.iter().any(|n| n.kind == v.kind && n.name == v.name);
        for v in before.iter().filter(fixed) {
            let note = format!("{} {} no longer breaks the policy", v.kind, v.name);
            let about = Some((v.kind.as_str(), v.name.as_str()));
            self.send(
                EventType::Normal,
                "ViolationResolved",
                "Audit",
                &note,
                about,
            )
            .await;
        }
    }

    /// In Audit mode, drift is reported: an Event when the set of drifted objects changes.
    pub async fn audit_drift(&self, new_status: &OpsConductorStackStatus) {
        let before = status::condition(self.stack.status.as_ref(), status::POLICY_ENFORCED);
        let after = status::condition(Some(new_status), status::POLICY_ENFORCED);
        if let Some(after) = after
            && after.reason == "DriftDetected"
            && before.is_none_or(|b| b.message != after.message)
        {
            self.ctx.metrics.drift("any", "reported");
            self.send(
                EventType::Warning,
                "DriftDetected",
                "Audit",
                &after.message,
                None,
            )
            .await;
        }
    }

    /// Publishes one Event about the stack, `about` (kind, name) one of its namespace's
    /// objects. A note longer than the API server accepts is cut.
    pub async fn send(
        &self,
        type_: EventType,
        reason: &str,
        action: &str,
        note: &str,
        about: Option<(&str, &str)>,
    ) {
        let mut note = note.to_string();
        if note.len() > 1000 {
            let mut cut = 997;
            while !note.is_char_boundary(cut) {
                cut -= 1;
            }
            note.truncate(cut);
            note.push_str("...");
        }
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: about.map(|(kind, name)| related(self.stack, kind, name)),
        };
        if let Err(e) = self
            .ctx
            .recorder
            .publish(&event, &reference(self.stack))
            .await
        {
            tracing::warn!(error = %e, reason, "cannot publish event");
        }
    }
}

/// A reference to `kind/name` in the stack's namespace.
fn related(stack: &OpsConductorStack, kind: &str, name: &str) -> ObjectReference {
    let api_version = match kind {
        "Deployment" => "apps/v1",
        "NetworkPolicy" | "Ingress" => "networking.k8s.io/v1",
        "HTTPRoute" | "GRPCRoute" | "TLSRoute" | "TCPRoute" | "UDPRoute" => {
            "gateway.networking.k8s.io/v1"
        }
        "PodDisruptionBudget" => "policy/v1",
        _ => "v1",
    };
    ObjectReference {
        api_version: Some(api_version.into()),
        kind: Some(kind.into()),
        name: Some(name.into()),
        namespace: stack.namespace(),
        ..ObjectReference::default()
    }
}
