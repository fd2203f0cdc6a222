//! The [`Manager`] the controller asks once per reconcile: finds the stack's state, reads the
//! certificate in use, decides with [`super::policy`], starts a background job when one is due
//! and reports the status, the condition, Events and metrics. Talks to the API server, never to
//! the CA (the jobs do).

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use kube::Client;

use super::config::Config;
use super::failure::{Recorded, resume};
use super::jobs::{JobContext, order_job, renewal_info_job};
use super::policy::{self, Current};
use super::readiness::{self, Due, Failures, Running};
use super::state::{Job, Stacks, State};
use super::timestamp::{rfc3339, unix};
use super::tls_secret::{Examined, examine};
use super::{Error, account};
use crate::crd::{CertificateState, CertificateStatus};
use crate::metrics::Metrics;
use crate::model::{Acme, Stack};
use crate::ownership::NameConflict;

/// An Event to publish about the stack.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertEvent {
    pub warning: bool,
    pub reason: &'static str,
    pub note: String,
}

/// What one reconcile learns about the certificate.
#[derive(Clone, Debug)]
pub struct Report {
    pub status: CertificateStatus,
    /// CertificateReady: a valid certificate covering every host is in use.
    pub ok: bool,
    /// Bounded reason for the condition.
    pub reason: &'static str,
    /// Plain words for the condition.
    pub message: String,
    /// The ACME account's JWK thumbprint, once known: goes into the gateway configuration.
    pub thumbprint: Option<String>,
    /// Look again after this long (an order runs, a retry or a renewal is due).
    pub requeue_after: Option<Duration>,
    /// Events for changes since the last reconcile.
    pub events: Vec<CertEvent>,
    /// The certificate's Secrets that exist and are someone else's: neither read nor written,
    /// and no order is started while there are any.
    pub conflicts: Vec<NameConflict>,
}

/// The ACME engine of the controller: one state per stack, at most one job per stack.
pub struct Manager {
    config: Config,
    metrics: Arc<Metrics>,
    stacks: Mutex<Stacks>,
}

fn stack_key(stack: &Stack) -> String {
    format!("{}/{}", stack.namespace, stack.name)
}

fn fingerprint(stack: &Stack, acme: &Acme) -> String {
    let mut hosts: Vec<String> = stack
        .gateway
        .hosts
        .iter()
        .map(|h| h.to_ascii_lowercase())
        .collect();
    hosts.sort();
    format!(
        "{}|{:?}|{:?}|{:?}|{:?}|{:?}|{}",
        acme.directory_url,
        acme.profile,
        acme.key_algorithm,
        acme.external_account_binding,
        acme.ca_bundle,
        acme.dns01,
        hosts.join(",")
    )
}

impl Manager {
    pub fn new(config: Config, metrics: Arc<Metrics>) -> Manager {
        Manager {
            config,
            metrics,
            stacks: Mutex::default(),
        }
    }

    /// The state of the stack `key` with `uid`, made on first use; `None` when that stack
    /// was forgotten (a reconcile that began before the stack went).
    fn state(&self, key: &str, uid: Option<&str>) -> Option<Arc<Mutex<State>>> {
        let mut stacks = self.stacks.lock().unwrap();
        if let Some(uid) = uid
            && stacks.forgotten.iter().any(|u| u == uid)
        {
            return None;
        }
        // A stack deleted and created again under the same name between two looks of the
        // janitor: the new one inherits nothing (no job, no backoff, no certificate copy).
        let replaced = stacks.states.get(key).is_some_and(|state| {
            let st = state.lock().unwrap();
            st.uid.is_some() && uid.is_some() && st.uid.as_deref() != uid
        });
        if replaced {
            tracing::info!(stack = %key, "the stack was created again: forgetting the earlier one");
            stacks.drop_state(key);
        }
        let state = stacks.states.entry(key.to_string()).or_default().clone();
        let mut st = state.lock().unwrap();
        if st.uid.as_deref() != uid {
            st.uid = uid.map(str::to_string);
        }
        drop(st);
        Some(state)
    }

    /// The stacks (`namespace/name`) this manager keeps state for.
    pub fn known_stacks(&self) -> Vec<String> {
        self.stacks.lock().unwrap().states.keys().cloned().collect()
    }

    /// Forgets a deleted stack: stops its job (aborted at its next await, so no further
    /// request reaches the CA), drops its metrics, and makes sure no job starts for it again,
    /// also from a reconcile that is still under way.
    pub fn forget(&self, namespace: &str, name: &str) {
        let key = format!("{namespace}/{name}");
        self.stacks.lock().unwrap().drop_state(&key);
        self.metrics.forget_stack(&key);
    }

    /// One look at the certificate of an ACME stack. Talks to the API server (the two
    /// Secrets), never to the CA; starts a background job when one is due.
    /// `recorded` is what the stack's status says about earlier attempts: the backoff
    /// resumes from it when this manager has no state for the stack yet.
    pub async fn reconcile(
        &self,
        client: &Client,
        stack: &Stack,
        acme: &Acme,
        recorded: &Recorded,
        now: SystemTime,
    ) -> Result<Report, Error> {
        let key = stack_key(stack);
        let Some(state) = self.state(&key, stack.uid.as_deref()) else {
            return Ok(self.gone_report());
        };
        let fp = fingerprint(stack, acme);
        {
            let mut st = state.lock().unwrap();
            st.track_settings(&key, fp);
            if !st.resumed {
                st.resumed = true;
                if let Some(r) = resume(recorded, &self.config.backoff) {
                    tracing::info!(
                        stack = %key,
                        failures = r.failures,
                        last_failure = %rfc3339(r.failed_at),
                        next_attempt = %rfc3339(r.next_attempt),
                        "resuming the ACME backoff recorded in the status"
                    );
                    st.failures = r.failures;
                    st.next_attempt = Some(r.next_attempt);
                    st.failure = Some((r.failure, r.failed_at));
                }
            }
        }

        // The account's thumbprint, from the stored key (no CA request). With no account
        // Secret yet, the key is made now, so the gateway's first configuration answers with
        // its thumbprint (account::generate_ahead).
        let mut conflicts = Vec::new();
        let known = state.lock().unwrap().thumbprint.clone();
        let thumbprint = match known {
            Some(t) => Some(t),
            None => {
                let read = match account::read(client, stack).await {
                    Ok(None) if acme.external_account_binding.is_none() => {
                        account::generate_ahead(client, stack).await
                    }
                    read => read,
                };
                match read {
                    Ok(stored) => {
                        let t = stored
                            .as_ref()
                            .and_then(|s| s.thumbprint_for(acme))
                            .map(str::to_string);
                        state.lock().unwrap().thumbprint.clone_from(&t);
                        t
                    }
                    Err(account::ReadError::Kube(e)) => return Err(e.into()),
                    Err(account::ReadError::Conflict(c)) => {
                        conflicts.push(c);
                        None
                    }
                    // The order's registration makes a key then; the configuration follows.
                    Err(e @ account::ReadError::KeyGeneration(_)) => {
                        tracing::warn!(stack = %key, error = %e, "no account key ahead of registration");
                        None
                    }
                }
            }
        };

        // The certificate in use.
        let mut events = Vec::new();
        let current = examine(client, stack, &state, now, &mut events).await?;
        if let Examined::Conflict(c) = &current {
            conflicts.push(c.clone());
        }
        if !conflicts.is_empty() {
            return Ok(self.conflict_report(&key, conflicts));
        }
        let renew_before = stack.tls.renew_before;

        let mut st = state.lock().unwrap();
        let ari = match (&current, &st.ari) {
            (Examined::Issued(leaf), Some(a)) if a.serial == leaf.facts.serial => a.window,
            _ => None,
        };
        let policy_current = match &current {
            Examined::Temporary => Current::Temporary,
            Examined::Broken(reason, _) => Current::Broken(reason),
            Examined::Issued(leaf) => Current::Issued(&leaf.facts),
            // Returned above; never decided on.
            Examined::Conflict(c) => Current::Broken(&c.why),
        };
        let decision = policy::decide(
            policy_current,
            &stack.gateway.hosts,
            renew_before,
            ari.as_ref(),
            now,
        );
        let in_use = current.in_use();
        let ari_next_check = in_use
            .and_then(|leaf| st.ari.as_ref().filter(|a| a.serial == leaf.facts.serial))
            .map(|a| a.next_check);
        let progress = st.progress.lock().unwrap().clone();
        let input = readiness::Input {
            examined: &current,
            hosts: &stack.gateway.hosts,
            decision: &decision,
            running: st.running().map(|job| match job {
                Job::Order => Running::Order {
                    progress: progress.as_deref(),
                },
                Job::RenewalInfo => Running::RenewalInfo,
            }),
            failures: Failures {
                count: st.failures,
                last: st.failure.as_ref().map(|(f, _)| f),
                next_attempt: st.next_attempt,
            },
            ari_next_check,
            now,
            poll_interval: self.config.poll_interval,
            recheck: self.config.recheck,
        };
        let ready = readiness::readiness(&input);
        // The job that is due, which the report already describes as started.
        match readiness::due_job(&input) {
            Some(Due::Order { why, replaces }) => {
                let ctx = self.job_context(client, stack, acme, &state);
                tracing::info!(stack = %key, why = %why.describe(), "starting an ACME order");
                st.start(Job::Order, order_job(ctx, why, replaces));
            }
            Some(Due::RenewalInfo { serial, ari_id }) => {
                let ctx = self.job_context(client, stack, acme, &state);
                st.start(Job::RenewalInfo, renewal_info_job(ctx, serial, ari_id));
            }
            None => {}
        }
        let readiness::Readiness {
            state: state_now,
            ok,
            reason,
            message,
            renewal_time,
            requeue,
        } = ready;
        if st.thumbprint.is_none() {
            st.thumbprint.clone_from(&thumbprint);
        }
        let (failure, failure_time) = match &st.failure {
            Some((f, at)) => (Some(f.message.clone()), Some(rfc3339(*at))),
            None => (None, None),
        };
        let status = CertificateStatus {
            state: state_now,
            hosts: in_use.map(|l| l.facts.hosts.clone()).unwrap_or_default(),
            serial: in_use.map(|l| l.facts.serial.clone()),
            not_before: in_use.map(|l| rfc3339(l.facts.not_before)),
            not_after: in_use.map(|l| rfc3339(l.facts.not_after)),
            renewal_time: renewal_time.map(rfc3339),
            last_failure_reason: failure,
            last_failure_time: failure_time,
            failed_attempts: st.failures as i32,
        };

        // Events: what the jobs did, then the state when it changed.
        events.append(&mut st.events);
        if st.announced != Some((state_now, reason)) {
            let routine = matches!(
                (st.announced, state_now),
                (
                    Some((CertificateState::Renewing | CertificateState::Issuing, _)),
                    CertificateState::Valid
                )
            );
            // "Issued" after an order is announced by the job's CertificateIssued Event.
            if !routine && reason != "Ordering" {
                events.push(CertEvent {
                    warning: matches!(state_now, CertificateState::Failed)
                        || (state_now == CertificateState::Renewing && reason != "Ordering"),
                    reason: match state_now {
                        CertificateState::Valid => "CertificateValid",
                        CertificateState::Failed => "IssuanceFailing",
                        CertificateState::Renewing => "RenewalFailing",
                        CertificateState::Issuing => "Issuing",
                        CertificateState::Pending => "Pending",
                    },
                    note: message.clone(),
                });
            }
            st.announced = Some((state_now, reason));
        }
        drop(st);

        self.metrics.certificate(
            &key,
            ok,
            in_use.map(|leaf| unix(leaf.facts.not_after)),
            renewal_time.map(unix),
        );
        Ok(Report {
            status,
            ok,
            reason,
            message,
            thumbprint,
            requeue_after: Some(requeue),
            events,
            conflicts: Vec::new(),
        })
    }

    /// The report for a stack that is gone (a reconcile that began before it went): nothing
    /// is read, written or ordered.
    fn gone_report(&self) -> Report {
        Report {
            status: CertificateStatus::pending(),
            ok: false,
            reason: "StackGone",
            message: "the stack is gone".into(),
            thumbprint: None,
            requeue_after: None,
            events: Vec::new(),
            conflicts: Vec::new(),
        }
    }

    /// The report while a Secret of the certificate is someone else's: nothing is ordered
    /// or written until it is gone or handed over.
    fn conflict_report(&self, key: &str, conflicts: Vec<NameConflict>) -> Report {
        let objects: Vec<String> = conflicts.iter().map(NameConflict::object).collect();
        self.metrics.certificate(key, false, None, None);
        Report {
            status: CertificateStatus {
                state: CertificateState::Failed,
                ..CertificateStatus::pending()
            },
            ok: false,
            reason: "NameConflict",
            message: format!(
                "{} exist(s) and belong(s) to someone else: not used, not written, and no \
                 certificate is ordered until it is removed or handed over",
                objects.join(", ")
            ),
            thumbprint: None,
            requeue_after: Some(self.config.recheck),
            events: Vec::new(),
            conflicts,
        }
    }

    fn job_context(
        &self,
        client: &Client,
        stack: &Stack,
        acme: &Acme,
        state: &Arc<Mutex<State>>,
    ) -> JobContext {
        JobContext {
            client: client.clone(),
            stack: stack.clone(),
            acme: acme.clone(),
            config: self.config.clone(),
            metrics: self.metrics.clone(),
            state: state.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reconcile that began before its stack went and goes on after the stack was
    /// forgotten gets no state (it looked after the forget) or cannot start a job on the one
    /// it holds (it looked before): either way no job runs for a gone stack.
    #[tokio::test]
    async fn a_forgotten_stack_gets_no_job_whenever_its_reconcile_looks() {
        let manager = Manager::new(Config::default(), Arc::new(Metrics::default()));
        let held = manager.state("ns/shop", Some("uid-1")).unwrap();
        assert_eq!(manager.known_stacks(), vec!["ns/shop".to_string()]);
        let running = manager.state("ns/other", Some("uid-2")).unwrap();
        running
            .lock()
            .unwrap()
            .start(Job::Order, std::future::pending());
        let handle_running = running
            .lock()
            .unwrap()
            .task
            .as_ref()
            .map(|(_, h)| h.abort_handle());

        manager.forget("ns", "shop");
        manager.forget("ns", "other");
        assert!(manager.known_stacks().is_empty());
        // Looked before the forget: the state it holds refuses to start a job.
        held.lock().unwrap().start(Job::Order, async {});
        assert!(held.lock().unwrap().task.is_none());
        // Looks after the forget: no state at all.
        assert!(manager.state("ns/shop", Some("uid-1")).is_none());
        assert!(manager.known_stacks().is_empty());
        // The running job was aborted.
        let aborted = handle_running.unwrap();
        for _ in 0..100 {
            if aborted.is_finished() {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(aborted.is_finished());
        // A new stack of the same name (another UID) is a stack like any other.
        let new = manager.state("ns/shop", Some("uid-3")).unwrap();
        new.lock()
            .unwrap()
            .start(Job::Order, std::future::pending());
        assert!(new.lock().unwrap().task.is_some());
        new.lock().unwrap().failures = 3;

        // Deleted and created again between two looks of the janitor: the new stack (another
        // UID) inherits neither the job nor the backoff, and the old one's job stops.
        let old_job = new
            .lock()
            .unwrap()
            .task
            .as_ref()
            .map(|(_, h)| h.abort_handle())
            .unwrap();
        let again = manager.state("ns/shop", Some("uid-4")).unwrap();
        assert!(!Arc::ptr_eq(&new, &again));
        assert!(again.lock().unwrap().task.is_none());
        assert_eq!(again.lock().unwrap().failures, 0);
        assert!(new.lock().unwrap().forgotten);
        for _ in 0..100 {
            if old_job.is_finished() {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(old_job.is_finished());
        assert!(manager.state("ns/shop", Some("uid-3")).is_none());
        // The same stack looked at again keeps its state.
        let same = manager.state("ns/shop", Some("uid-4")).unwrap();
        assert!(Arc::ptr_eq(&again, &same));
    }
}
