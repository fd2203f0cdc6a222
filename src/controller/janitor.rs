//! Housekeeping that follows from what the caches hold, never from single watch events.
//!
//! A watch that relists after a gap (a timeout, an API server restart, an operator restart)
//! delivers no `Delete` for an object that vanished during the gap: the object is simply absent
//! from the new list. So nothing that must happen "when a stack is gone" may hang on a Delete
//! event. Once a second the janitor compares the stack cache with what the operator keeps for
//! stacks, and fixes the difference:
//!
//! - the admission marker of every namespace: the value [`crate::admission::marker_value`]
//!   derives from the namespace's stacks, or no label when none is left;
//! - per-stack state of stacks that are gone: the ACME job, the retry and violation
//!   bookkeeping, the `stack`-labelled metric series, the applied log of their namespace.
//!
//! A namespace whose marker could not be written is retried with a growing delay (1 s
//! doubling to 60 s), whatever the cause: a failed request, or a write that did not change
//! the label.
//!
//! The decisions are pure functions ([`marker_changes`], [`gone`]) over plain values, tested
//! without a cluster; [`run`] feeds them from the caches and does the writes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kube::ResourceExt;

use super::Context;
use crate::crd::PolicyMode;

/// How often the caches are compared with what the operator keeps.
const PERIOD: Duration = Duration::from_secs(1);
/// Longest wait before another attempt on a namespace whose marker did not converge.
const MAX_RETRY: Duration = Duration::from_secs(60);

/// A stack as the janitor sees it.
#[derive(Clone, Debug)]
pub struct StackFact {
    pub namespace: String,
    pub mode: PolicyMode,
    /// Being deleted (foreground deletion): it no longer counts for the marker.
    pub deleting: bool,
}

/// The marker changes that make `namespaces` (name -> current marker value) agree with
/// `stacks`: `(namespace, wanted value)`, `None` meaning "remove the label". Namespaces that
/// have no stack and no marker are none of the operator's business and never appear. A
/// namespace the cache does not know (just created, or already gone) is left to the next pass.
pub fn marker_changes(
    stacks: &[StackFact],
    namespaces: &BTreeMap<String, Option<String>>,
) -> Vec<(String, Option<&'static str>)> {
    let mut modes: BTreeMap<&str, Vec<PolicyMode>> = BTreeMap::new();
    for stack in stacks {
        let entry = modes.entry(stack.namespace.as_str()).or_default();
        if !stack.deleting {
            entry.push(stack.mode);
        }
    }
    let mut out = Vec::new();
    for (namespace, current) in namespaces {
        let wanted = crate::admission::marker_value(
            modes.get(namespace.as_str()).cloned().unwrap_or_default(),
        );
        if current.as_deref() != wanted {
            out.push((namespace.clone(), wanted));
        }
    }
    out
}

/// The keys of `known` that name no stack of `present` (both `namespace/name`).
pub fn gone<'a>(
    known: impl IntoIterator<Item = &'a String>,
    present: &BTreeSet<String>,
) -> Vec<String> {
    known
        .into_iter()
        .filter(|k| !present.contains(*k))
        .cloned()
        .collect()
}

/// Retry state of one namespace whose marker did not converge.
struct Retry {
    attempts: u32,
    next: Instant,
}

fn retry_delay(attempts: u32) -> Duration {
    Duration::from_secs(1u64 << attempts.saturating_sub(1).min(6)).min(MAX_RETRY)
}

/// Runs until the controller stops (it is one of the controller's tasks).
pub(super) async fn run(ctx: Arc<Context>) {
    ctx.stores.wait_ready().await;
    // A false means the controller is gone, and this task with it.
    if !ctx.stacks_listed().await {
        return;
    }
    let mut retries: HashMap<String, Retry> = HashMap::new();
    loop {
        pass(&ctx, &mut retries).await;
        tokio::time::sleep(PERIOD).await;
    }
}

/// One comparison of the caches with what the operator keeps.
async fn pass(ctx: &Context, retries: &mut HashMap<String, Retry>) {
    let stacks = ctx.stacks.state();
    let facts: Vec<StackFact> = stacks
        .iter()
        .filter_map(|s| {
            Some(StackFact {
                namespace: s.namespace()?,
                mode: s.spec.policy.mode,
                deleting: s.metadata.deletion_timestamp.is_some(),
            })
        })
        .collect();
    let present: BTreeSet<String> = stacks.iter().map(|s| super::stack_key(s)).collect();

    // Namespaces that hold a stack or carry the marker, with the marker as last known.
    let with_stacks: BTreeSet<&str> = facts.iter().map(|f| f.namespace.as_str()).collect();
    let mut namespaces = BTreeMap::new();
    for name in ctx.stores.audit.namespaces.names_in(None) {
        let current = super::marker::current_marker(ctx, &name);
        if current.is_some() || with_stacks.contains(name.as_str()) {
            namespaces.insert(name, current);
        }
    }
    let changes = marker_changes(&facts, &namespaces);
    let now = Instant::now();
    retries.retain(|ns, _| changes.iter().any(|(n, _)| n == ns));
    for (namespace, wanted) in changes {
        if retries.get(&namespace).is_some_and(|r| r.next > now) {
            continue;
        }
        let retry = retries.entry(namespace.clone()).or_insert(Retry {
            attempts: 0,
            next: now,
        });
        retry.attempts += 1;
        retry.next = now + retry_delay(retry.attempts);
        match super::marker::write_namespace_marker(ctx, &namespace, wanted).await {
            Ok(()) => {}
            Err(e) => tracing::warn!(
                namespace = %namespace,
                error = %e,
                attempts = retry.attempts,
                retry_in = ?retry_delay(retry.attempts),
                "cannot update the namespace marker"
            ),
        }
    }

    forget_gone_stacks(ctx, &present, &with_stacks);
}

/// Drops everything kept for stacks that no longer exist.
fn forget_gone_stacks(ctx: &Context, present: &BTreeSet<String>, namespaces: &BTreeSet<&str>) {
    for key in gone(&ctx.acme.known_stacks(), present) {
        let (namespace, name) = key.split_once('/').unwrap_or(("", key.as_str()));
        tracing::info!(stack = %key, "stack is gone: forgetting its certificate job and metrics");
        ctx.acme.forget(namespace, name);
    }
    for key in gone(&ctx.metrics.stack_keys(), present) {
        ctx.metrics.forget_stack(&key);
    }
    fn keep_present<V>(map: &Mutex<HashMap<String, V>>, present: &BTreeSet<String>) {
        map.lock().unwrap().retain(|k, _| present.contains(k));
    }
    keep_present(&ctx.failures, present);
    keep_present(&ctx.announced_conflicts, present);
    keep_present(&ctx.announced_violations, present);
    keep_present(&ctx.applied_generations, present);
    ctx.applied.retain_namespaces(namespaces);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fact(namespace: &str, mode: PolicyMode, deleting: bool) -> StackFact {
        StackFact {
            namespace: namespace.into(),
            mode,
            deleting,
        }
    }

    fn namespaces(entries: &[(&str, Option<&str>)]) -> BTreeMap<String, Option<String>> {
        entries
            .iter()
            .map(|(n, v)| (n.to_string(), v.map(str::to_string)))
            .collect()
    }

    #[test]
    fn a_marker_without_stacks_is_removed_whatever_event_was_missed() {
        // No stack left in "a": the marker goes, with or without a Delete event ever seen.
        let changes = marker_changes(&[], &namespaces(&[("a", Some("enforce"))]));
        assert_eq!(changes, vec![("a".to_string(), None)]);
    }

    #[test]
    fn markers_follow_the_modes_of_the_remaining_stacks() {
        use PolicyMode::*;
        let cases: &[(&[StackFact], Option<&'static str>, Option<&'static str>)] = &[
            // (stacks in "a", current marker, wanted marker)
            (&[], None, None),
            (&[], Some("audit"), None),
            (&[fact("a", Enforce, false)], None, Some("enforce")),
            (&[fact("a", Audit, false)], Some("enforce"), Some("audit")),
            (
                &[fact("a", Audit, false), fact("a", Enforce, false)],
                Some("audit"),
                Some("enforce"),
            ),
            // A stack being deleted no longer protects its namespace.
            (
                &[fact("a", Enforce, true), fact("a", Audit, false)],
                Some("enforce"),
                Some("audit"),
            ),
            (&[fact("a", Enforce, true)], Some("enforce"), None),
            // Another namespace's stacks do not count.
            (&[fact("b", Enforce, false)], Some("enforce"), None),
        ];
        for (stacks, current, wanted) in cases {
            let changes = marker_changes(stacks, &namespaces(&[("a", *current)]));
            let expected: Vec<(String, Option<&'static str>)> = if current == wanted {
                vec![]
            } else {
                vec![("a".into(), *wanted)]
            };
            assert_eq!(changes, expected, "stacks {stacks:?}, marker {current:?}");
        }
    }

    #[test]
    fn only_namespaces_in_the_map_are_touched() {
        // A stack whose namespace the cache does not know yet waits for the next pass.
        let changes = marker_changes(&[fact("new", PolicyMode::Enforce, false)], &namespaces(&[]));
        assert!(changes.is_empty());
    }

    #[test]
    fn gone_lists_what_the_cache_no_longer_holds() {
        let present: BTreeSet<String> = ["a/x".to_string()].into();
        let known = ["a/x".to_string(), "a/y".to_string(), "b/x".to_string()];
        assert_eq!(
            gone(&known, &present),
            vec!["a/y".to_string(), "b/x".to_string()]
        );
    }

    #[test]
    fn retries_back_off_to_a_minute() {
        let delays: Vec<u64> = (1..=9).map(|n| retry_delay(n).as_secs()).collect();
        assert_eq!(delays, vec![1, 2, 4, 8, 16, 32, 60, 60, 60]);
    }
}
