//! The settings of an election: the flags of `run`, their checks, the timing, and the errors.

use kube::Client;
use std::time::Duration;

/// The command-line flags of `run` for leader election.
#[derive(Clone, Debug, clap::Args)]
pub struct ElectionArgs {
    /// Reconcile only while holding a coordination.k8s.io Lease, so that one of several
    /// replicas works at a time (the chart turns this on). Off by default: a single process,
    /// e.g. on a developer's machine, needs no Lease and no RBAC for one.
    #[arg(long, env = "OPSC_LEADER_ELECTION")]
    pub leader_election: bool,
    /// Namespace of the Lease. Default: $POD_NAMESPACE, else the namespace of the kubeconfig
    /// context (in a pod: the service account's namespace).
    #[arg(long, env = "OPSC_LEADER_ELECTION_NAMESPACE")]
    pub leader_election_namespace: Option<String>,
    /// Name of the Lease.
    #[arg(
        long,
        env = "OPSC_LEADER_ELECTION_ID",
        default_value = "opsconductor-operator"
    )]
    pub leader_election_id: String,
    /// Seconds a standby waits after the Lease's last change before it takes the Lease over.
    #[arg(long, default_value_t = 15)]
    pub leader_election_lease_seconds: u64,
    /// Seconds the leader keeps working without a successful renewal before it steps down;
    /// less than the lease duration.
    #[arg(long, default_value_t = 10)]
    pub leader_election_renew_seconds: u64,
    /// Seconds between renewals by the leader and attempts by a standby.
    #[arg(long, default_value_t = 2)]
    pub leader_election_retry_seconds: u64,
}

/// Errors of leader election. Each has a bounded `reason()`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid leader election settings: {0}")]
    Config(String),
    #[error("leader election: Kubernetes API request on Lease {lease} failed: {source}")]
    Kube {
        lease: String,
        #[source]
        source: kube::Error,
    },
    #[error("lost the leader Lease {lease}: {why}; stopped reconciling")]
    Lost { lease: String, why: String },
}

impl Error {
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Config(_) => "InvalidConfig",
            Error::Kube { .. } => "ApiError",
            Error::Lost { .. } => "LeaseLost",
        }
    }
}

/// The timing of an election. `renew_deadline < lease_duration`, `retry_period <
/// renew_deadline`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

impl Default for Timing {
    /// client-go's defaults: 15 s, 10 s, 2 s.
    fn default() -> Self {
        Self {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

impl Timing {
    pub fn new(
        lease_duration: Duration,
        renew_deadline: Duration,
        retry_period: Duration,
    ) -> Result<Self, Error> {
        if retry_period.is_zero() {
            return Err(Error::Config("the retry period must be positive".into()));
        }
        if renew_deadline <= retry_period {
            return Err(Error::Config(format!(
                "the renew deadline ({renew_deadline:?}) must be longer than the retry period \
                 ({retry_period:?}): the leader needs more than one attempt to renew"
            )));
        }
        if lease_duration <= renew_deadline {
            return Err(Error::Config(format!(
                "the renew deadline ({renew_deadline:?}) must be shorter than the lease duration \
                 ({lease_duration:?}): the leader must stop before a standby may take over"
            )));
        }
        Ok(Self {
            lease_duration,
            renew_deadline,
            retry_period,
        })
    }
}

/// Everything an election needs.
#[derive(Clone, Debug)]
pub struct Config {
    pub namespace: String,
    pub name: String,
    /// This process's holder identity: unique per process.
    pub identity: String,
    pub timing: Timing,
}

impl Config {
    /// From the flags; `None` when leader election is off.
    pub fn from_args(args: &ElectionArgs, client: &Client) -> Result<Option<Self>, Error> {
        if !args.leader_election {
            return Ok(None);
        }
        let namespace = args
            .leader_election_namespace
            .clone()
            .or_else(|| std::env::var("POD_NAMESPACE").ok())
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| client.default_namespace().to_string());
        let timing = Timing::new(
            Duration::from_secs(args.leader_election_lease_seconds),
            Duration::from_secs(args.leader_election_renew_seconds),
            Duration::from_secs(args.leader_election_retry_seconds),
        )?;
        Ok(Some(Self {
            namespace,
            name: args.leader_election_id.clone(),
            identity: default_identity(),
            timing,
        }))
    }

    pub(super) fn lease(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// `$POD_NAME` (else the host name) and a random suffix: a restarted container must not take
/// its predecessor's Lease for its own.
pub fn default_identity() -> String {
    use std::hash::{BuildHasher, Hasher};
    let base = std::env::var("POD_NAME")
        .ok()
        .filter(|n| !n.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "opsconductor-operator".into());
    // RandomState is seeded from the OS's randomness.
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    format!("{base}_{:08x}", hasher.finish() as u32)
}
