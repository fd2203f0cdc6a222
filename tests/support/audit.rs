//! Reads the control plane's audit log (`<state>/audit.log`, JSON lines) to count writes.
//!
//! The audit policy (see `scripts/controlplane`) records every create, update, patch, delete and
//! deletecollection once, at stage `ResponseComplete`, at Metadata level (user, verb, objectRef,
//! response code), and no reads. So "this controller made zero writes" is checkable:
//!
//! ```ignore
//! let audit = support::AuditLog::of(ns.control_plane);
//! let mark = audit.mark();
//! // ... run the thing ...
//! let writes = audit.writes_since(&mark, |e| e.user == "system:serviceaccount:x:y");
//! assert!(writes.is_empty(), "{writes:#?}");
//! ```

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::controlplane::ControlPlane;

/// Reads (get, list, watch) by members of this group are recorded too (scripts/controlplane).
pub const AUDIT_READS_GROUP: &str = "opsconductor:audit-reads";

/// One audited request: a write, or a read by a member of [`AUDIT_READS_GROUP`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    /// The authenticated user (with impersonation: the impersonated user).
    pub user: String,
    /// The user that made the request when it impersonated `user`.
    pub impersonated_by: Option<String>,
    /// create, update, patch, delete, deletecollection.
    pub verb: String,
    pub api_group: String,
    pub api_version: String,
    pub resource: String,
    pub subresource: String,
    /// Empty for cluster-scoped objects.
    pub namespace: String,
    pub name: String,
    /// HTTP status of the response (409 for a conflict, 403 for a denial, ...).
    pub code: u16,
    pub request_uri: String,
    pub user_agent: String,
    /// RFC 3339 with microseconds, as the apiserver writes it.
    pub stage_timestamp: String,
    /// True for `?dryRun=All` requests (they change nothing).
    pub dry_run: bool,
    /// ResponseStarted (a watch that is still open) or ResponseComplete.
    pub stage: String,
    /// The request's ID: a watch's ResponseStarted and ResponseComplete events share it.
    pub audit_id: String,
}

impl AuditEvent {
    fn from_json(v: &serde_json::Value) -> Option<AuditEvent> {
        let s = |p: &str| {
            v.pointer(p)
                .and_then(|x| x.as_str())
                .unwrap_or("")
                .to_string()
        };
        let stage = s("/stage");
        if stage != "ResponseComplete" && stage != "ResponseStarted" {
            return None;
        }
        let request_uri = s("/requestURI");
        // With impersonation the apiserver records the real caller in `user` and the identity
        // the request ran as in `impersonatedUser`; count writes by the latter.
        let (user, impersonated_by) = match v
            .pointer("/impersonatedUser/username")
            .and_then(|x| x.as_str())
        {
            Some(imp) => (imp.to_string(), Some(s("/user/username"))),
            None => (s("/user/username"), None),
        };
        Some(AuditEvent {
            user,
            impersonated_by,
            verb: s("/verb"),
            api_group: s("/objectRef/apiGroup"),
            api_version: s("/objectRef/apiVersion"),
            resource: s("/objectRef/resource"),
            subresource: s("/objectRef/subresource"),
            namespace: s("/objectRef/namespace"),
            name: s("/objectRef/name"),
            code: v
                .pointer("/responseStatus/code")
                .and_then(|x| x.as_u64())
                .unwrap_or(0) as u16,
            dry_run: request_uri.contains("dryRun=All"),
            request_uri,
            user_agent: s("/userAgent"),
            stage_timestamp: s("/stageTimestamp"),
            stage,
            audit_id: s("/auditID"),
        })
    }

    /// A write that succeeded and was not a dry run.
    pub fn succeeded(&self) -> bool {
        (200..300).contains(&self.code) && !self.dry_run
    }

    /// The verbs the audit policy records.
    pub fn is_write(&self) -> bool {
        matches!(
            self.verb.as_str(),
            "create" | "update" | "patch" | "delete" | "deletecollection"
        )
    }
}

/// A point in the audit log: events after it are "since".
#[derive(Debug, Clone, Copy)]
pub struct AuditMark {
    offset: u64,
}

/// The audit log of one control plane.
#[derive(Debug, Clone)]
pub struct AuditLog {
    pub path: PathBuf,
}

impl AuditLog {
    pub fn of(cp: &ControlPlane) -> AuditLog {
        AuditLog {
            path: cp.audit_log.clone(),
        }
    }

    fn len(&self) -> u64 {
        std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0)
    }

    /// Marks "now". Call it before the operation whose writes you want to count.
    pub fn mark(&self) -> AuditMark {
        self.settle();
        AuditMark { offset: self.len() }
    }

    /// Waits (at most 5 s) until the log has not grown for 300 ms: the apiserver writes an event
    /// right after the response, so a test that just got its answer may be a little ahead.
    pub fn settle(&self) {
        let start = Instant::now();
        let mut last = self.len();
        let mut stable_since = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(50));
            let now = self.len();
            if now != last {
                last = now;
                stable_since = Instant::now();
            } else if stable_since.elapsed() >= Duration::from_millis(300) {
                return;
            }
        }
    }

    /// Every audited request after `mark` that completed (after letting the log settle).
    pub fn events_since(&self, mark: &AuditMark) -> Vec<AuditEvent> {
        self.requests_since(mark)
            .into_iter()
            .filter(|e| e.stage == "ResponseComplete")
            .collect()
    }

    /// Every audited request after `mark`, also the ones still open (a watch is recorded at
    /// ResponseStarted when it starts, and again at ResponseComplete when it ends). Reads are
    /// recorded only for members of the group [`AUDIT_READS_GROUP`].
    pub fn requests_since(&self, mark: &AuditMark) -> Vec<AuditEvent> {
        self.settle();
        let mut f = match std::fs::File::open(&self.path) {
            Ok(f) => f,
            Err(_) => return Vec::new(),
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        // A restarted control plane starts a new log: then read it whole.
        let offset = if mark.offset <= len { mark.offset } else { 0 };
        let mut buf = String::new();
        if f.seek(SeekFrom::Start(offset)).is_err() || f.read_to_string(&mut buf).is_err() {
            return Vec::new();
        }
        buf.lines()
            .filter(|l| !l.trim().is_empty())
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| AuditEvent::from_json(&v))
            .collect()
    }

    /// Write events after `mark` that match `filter` (failed writes included: filter with
    /// [`AuditEvent::succeeded`] to leave them out).
    pub fn writes_since(
        &self,
        mark: &AuditMark,
        filter: impl Fn(&AuditEvent) -> bool,
    ) -> Vec<AuditEvent> {
        self.events_since(mark)
            .into_iter()
            .filter(|e| e.is_write() && filter(e))
            .collect()
    }

    /// Counts of write events after `mark`, keyed by (user, namespace); the namespace is empty
    /// for cluster-scoped objects.
    pub fn count_writes_by_user_and_namespace(
        &self,
        mark: &AuditMark,
    ) -> BTreeMap<(String, String), usize> {
        let mut counts = BTreeMap::new();
        for e in self.writes_since(mark, |_| true) {
            *counts.entry((e.user, e.namespace)).or_insert(0) += 1;
        }
        counts
    }

    /// Count of write events after `mark` by `user` in `namespace` (`None`: any namespace).
    pub fn count_writes(&self, mark: &AuditMark, user: &str, namespace: Option<&str>) -> usize {
        self.writes_since(mark, |e| {
            e.user == user && namespace.is_none_or(|n| e.namespace == n)
        })
        .len()
    }
}
