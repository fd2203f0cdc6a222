//! What the engine remembers per stack (failures, the last good certificate, renewal
//! information, the running job) and how a gone stack's state is dropped. Memory only: what
//! must survive a restart is in the stack's status (see [`super::failure::Recorded`]).

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use super::manager::CertEvent;
use super::policy::Window;
use super::{Failure, cert};
use crate::crd::CertificateState;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Job {
    Order,
    RenewalInfo,
}

/// A certificate the operator wrote and checked.
#[derive(Clone)]
pub(super) struct Good {
    pub(super) crt: String,
    pub(super) key: String,
    pub(super) leaf: cert::Leaf,
}

pub(super) struct AriState {
    pub(super) serial: String,
    pub(super) window: Option<Window>,
    pub(super) next_check: SystemTime,
}

#[derive(Default)]
pub(super) struct State {
    /// The stack is gone and this state was dropped by [`super::Manager::forget`]: no job may start
    /// on it (a reconcile that began before the stack went may still hold it).
    pub(super) forgotten: bool,
    /// The failures recorded in the status were looked at (once, when the state is new).
    pub(super) resumed: bool,
    /// The stack's UID, to refuse a reconcile of a stack already forgotten.
    pub(super) uid: Option<String>,
    /// What the orders depend on; a change resets the backoff and cancels a running order.
    pub(super) fingerprint: String,
    pub(super) task: Option<(Job, tokio::task::JoinHandle<()>)>,
    pub(super) thumbprint: Option<String>,
    pub(super) failures: u32,
    pub(super) failure: Option<(Failure, SystemTime)>,
    pub(super) next_attempt: Option<SystemTime>,
    pub(super) good: Option<Good>,
    pub(super) ari: Option<AriState>,
    pub(super) events: Vec<CertEvent>,
    /// (state, reason) last reported, for Events on changes only.
    pub(super) announced: Option<(CertificateState, &'static str)>,
    /// What a running order waits for (a DNS record not yet served by some server).
    pub(super) progress: Arc<Mutex<Option<String>>>,
}

impl State {
    pub(super) fn running(&self) -> Option<Job> {
        self.task
            .as_ref()
            .filter(|(_, handle)| !handle.is_finished())
            .map(|(job, _)| *job)
    }

    /// Takes note of what the orders depend on (`fingerprint`): when it changed, the running
    /// job is cancelled, its progress dropped, and the backoff starts over.
    pub(super) fn track_settings(&mut self, key: &str, fingerprint: String) {
        if self.fingerprint == fingerprint {
            return;
        }
        if !self.fingerprint.is_empty() {
            if let Some((job, handle)) = self.task.take() {
                tracing::info!(stack = %key, ?job, "ACME settings or hosts changed; cancelling the running job");
                handle.abort();
            }
            self.failures = 0;
            self.failure = None;
            self.next_attempt = None;
            self.thumbprint = None;
            // What the cancelled order waited for is over. A new slot rather than a cleared
            // one: the aborted job stops only at its next await, and may still write to its own.
            self.progress = Arc::default();
        }
        self.fingerprint = fingerprint;
    }

    /// Starts `job` in the background, unless the stack is gone.
    pub(super) fn start(&mut self, job: Job, work: impl Future<Output = ()> + Send + 'static) {
        if self.forgotten {
            return;
        }
        self.task = Some((job, tokio::spawn(work)));
    }
}

/// How many UIDs of forgotten stacks are remembered (a reconcile that started before its
/// stack went finishes within seconds; this only has to outlast it).
const FORGOTTEN_UIDS: usize = 1024;

#[derive(Default)]
pub(super) struct Stacks {
    pub(super) states: HashMap<String, Arc<Mutex<State>>>,
    /// UIDs of stacks forgotten, newest last: never brought back by a late reconcile.
    pub(super) forgotten: VecDeque<String>,
}

impl Stacks {
    /// Drops the state of `key`: its job is aborted (at its next await, so no further request
    /// reaches the CA), no job starts on the state again, and its UID is remembered.
    pub(super) fn drop_state(&mut self, key: &str) {
        let Some(state) = self.states.remove(key) else {
            return;
        };
        let mut st = state.lock().unwrap();
        st.forgotten = true;
        if let Some((job, handle)) = st.task.take() {
            if !handle.is_finished() {
                tracing::info!(stack = %key, ?job, "stack is gone: stopping its ACME job");
            }
            handle.abort();
        }
        if let Some(uid) = st.uid.clone() {
            if self.forgotten.len() == FORGOTTEN_UIDS {
                self.forgotten.pop_front();
            }
            self.forgotten.push_back(uid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An order cancelled by a change of settings or hosts leaves no progress behind: the next
    /// order (an HTTP-01 one, say) must not show the cancelled one's "waiting for ...". Nor can
    /// the cancelled job, which stops only at its next await, write into the next order's.
    #[tokio::test]
    async fn a_cancelled_order_leaves_no_progress_behind() {
        let mut st = State::default();
        st.track_settings("ns/shop", "dns-01".into());
        let progress = st.progress.clone();
        let (written, was_written) = tokio::sync::oneshot::channel();
        st.start(Job::Order, async move {
            *progress.lock().unwrap() = Some("waiting for ns1 to serve the record".into());
            let _ = written.send(progress);
            std::future::pending::<()>().await;
        });
        let cancelled_jobs_progress = was_written.await.unwrap();
        assert_eq!(st.running(), Some(Job::Order));

        st.track_settings("ns/shop", "http-01".into());
        assert_eq!(st.running(), None);
        assert_eq!(*st.progress.lock().unwrap(), None);
        // A late write of the cancelled job lands where nobody reads it.
        *cancelled_jobs_progress.lock().unwrap() = Some("waiting for ns2".into());
        assert_eq!(*st.progress.lock().unwrap(), None);

        // The same settings again change nothing: a running order keeps its progress.
        *st.progress.lock().unwrap() = Some("waiting for ns1".into());
        st.track_settings("ns/shop", "http-01".into());
        assert_eq!(
            st.progress.lock().unwrap().as_deref(),
            Some("waiting for ns1")
        );
    }
}
