//! Whose object is it? The rule that keeps a stack from taking over objects it did not create.
//!
//! An object with a name the stack wants is the stack's only when it carries the stack's
//! controller owner reference (the stack's uid, `controller: true`). Labels prove nothing:
//! anyone can copy them. Any other object with that name is someone else's, and the operator
//! never writes, patches or deletes it; it reports a [`NameConflict`] instead. The one way to
//! hand such an object over is an annotation on the object itself,
//! `opsconductor.io/adopt: <stack name>`, which only someone allowed to change that object can
//! write. An object controlled by something else (another stack, a ReplicaSet's Deployment,
//! ...) cannot be adopted at all: an object has one controller.

use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// Annotation by which the owner of an existing object hands it over to a stack.
pub const ADOPT_ANNOTATION: &str = "opsconductor.io/adopt";

/// What the stack may do with an existing object of a name it wants.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The stack's own: it carries the stack's controller owner reference.
    Ours,
    /// Someone else's, handed over with [`ADOPT_ANNOTATION`]: the next apply makes it ours.
    Adopt,
    /// Someone else's: never written. Why, in plain words.
    Foreign(String),
}

/// Whose `meta` is, for the stack `stack_name` with uid `stack_uid` (None: the stack has no
/// uid yet, so nothing can be its own).
pub fn claim(meta: &ObjectMeta, stack_name: &str, stack_uid: Option<&str>) -> Claim {
    let refs = meta.owner_references.as_deref().unwrap_or_default();
    if let Some(uid) = stack_uid
        && refs
            .iter()
            .any(|r| r.controller == Some(true) && r.uid == uid)
    {
        return Claim::Ours;
    }
    if let Some(controller) = refs.iter().find(|r| r.controller == Some(true)) {
        return Claim::Foreign(format!(
            "it is controlled by {} {}",
            controller.kind, controller.name
        ));
    }
    let adopt = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(ADOPT_ANNOTATION));
    match adopt {
        Some(v) if v == stack_name => Claim::Adopt,
        Some(v) => Claim::Foreign(format!(
            "it exists and was not created by this stack (its {ADOPT_ANNOTATION} annotation names {v:?})"
        )),
        None => Claim::Foreign(format!(
            "it exists and was not created by this stack; to hand it over, annotate it with \
             {ADOPT_ANNOTATION}={stack_name}"
        )),
    }
}

/// An object the stack wants but may not write, because it is someone else's.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct NameConflict {
    pub kind: &'static str,
    pub name: String,
    pub why: String,
}

impl NameConflict {
    /// `Kind/name`, as Events and the status name objects.
    pub fn object(&self) -> String {
        format!("{}/{}", self.kind, self.name)
    }
}

impl fmt::Display for NameConflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}: {}", self.kind, self.name, self.why)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
    use std::collections::BTreeMap;

    fn owner(kind: &str, name: &str, uid: &str, controller: bool) -> OwnerReference {
        OwnerReference {
            api_version: "v1".into(),
            kind: kind.into(),
            name: name.into(),
            uid: uid.into(),
            controller: Some(controller),
            block_owner_deletion: None,
        }
    }

    fn meta(refs: Vec<OwnerReference>, adopt: Option<&str>) -> ObjectMeta {
        ObjectMeta {
            owner_references: Some(refs),
            annotations: adopt
                .map(|a| BTreeMap::from([(ADOPT_ANNOTATION.to_string(), a.to_string())])),
            ..ObjectMeta::default()
        }
    }

    #[test]
    fn only_the_stacks_controller_reference_makes_it_ours() {
        let ours = meta(vec![owner("OpsConductorStack", "shop", "u1", true)], None);
        assert_eq!(claim(&ours, "shop", Some("u1")), Claim::Ours);
        // Same name, another uid (a deleted and re-created stack, or a copied reference).
        assert!(matches!(
            claim(&ours, "shop", Some("u2")),
            Claim::Foreign(w) if w.contains("controlled by OpsConductorStack shop")
        ));
        // A reference that is not the controller's.
        let weak = meta(vec![owner("OpsConductorStack", "shop", "u1", false)], None);
        assert!(matches!(
            claim(&weak, "shop", Some("u1")),
            Claim::Foreign(_)
        ));
        // No uid yet: nothing can be ours.
        assert!(matches!(claim(&ours, "shop", None), Claim::Foreign(_)));
    }

    #[test]
    fn adoption_needs_the_annotation_naming_the_stack_and_no_other_controller() {
        assert_eq!(
            claim(&meta(vec![], Some("shop")), "shop", Some("u1")),
            Claim::Adopt
        );
        let other = claim(&meta(vec![], Some("other")), "shop", Some("u1"));
        assert!(
            matches!(&other, Claim::Foreign(w) if w.contains("\"other\"")),
            "{other:?}"
        );
        let none = claim(&ObjectMeta::default(), "shop", Some("u1"));
        assert!(
            matches!(&none, Claim::Foreign(w) if w.contains("opsconductor.io/adopt=shop")),
            "{none:?}"
        );
        let controlled = meta(vec![owner("ReplicaSet", "rs-1", "x", true)], Some("shop"));
        assert!(matches!(
            claim(&controlled, "shop", Some("u1")),
            Claim::Foreign(w) if w.contains("ReplicaSet rs-1")
        ));
    }
}
