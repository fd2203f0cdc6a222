//! One way to run the real operator binary from a test: [`OperatorProcess`].
//!
//! Every process it starts runs `run --metrics-addr <free loopback port> --exit-on-stdin-eof
//! --log-format json` plus the test's own arguments, with its standard input a pipe held by the
//! test. So an operator never outlives the test binary that started it, even when that binary is
//! killed and no `Drop` runs (a stray operator would reconcile, and fight over, the stacks of
//! later runs). Its log goes to a file the test can read and a failing test prints.

use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::operator::{free_loopback_addr, http_get};

/// A running operator process, killed (SIGKILL) when dropped.
pub struct OperatorProcess {
    pub name: String,
    pub child: Child,
    pub metrics_addr: String,
    pub log: PathBuf,
    /// Held open: the operator exits when it is closed (`--exit-on-stdin-eof`).
    _stdin: ChildStdin,
}

/// What to start: `args` come after the fixed ones, `env` is added to the test's environment.
pub struct Spawn<'a> {
    /// Names the process in messages and in its log file's name.
    pub name: &'a str,
    pub kubeconfig: &'a Path,
    /// The directory of the log file (created if missing).
    pub log_dir: &'a Path,
    pub args: &'a [&'a str],
    pub env: &'a [(&'a str, &'a str)],
}

/// The operator binary cargo built for this test binary, or `OPSC_TEST_OPERATOR_BIN` when set: a
/// copy of it, for a target directory shared with builds of other branches (any of which
/// replaces cargo's binary at any time).
pub fn operator_binary() -> PathBuf {
    std::env::var_os("OPSC_TEST_OPERATOR_BIN")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_opsconductor-operator")))
}

impl OperatorProcess {
    pub fn spawn(s: Spawn<'_>) -> Self {
        Self::spawn_under(s, &[])
    }

    /// As [`OperatorProcess::spawn`], with the operator started by `wrapper` (a command that
    /// ends by exec'ing the arguments after it, so the child's pid stays the operator's).
    pub fn spawn_under(s: Spawn<'_>, wrapper: &[&str]) -> Self {
        std::fs::create_dir_all(s.log_dir).unwrap();
        let metrics_addr = free_loopback_addr();
        let port = metrics_addr.rsplit(':').next().unwrap_or_default();
        let log = s.log_dir.join(format!(
            "operator-{}-{}-{port}.log",
            s.name,
            std::process::id()
        ));
        let binary = operator_binary();
        let mut cmd = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(binary);
                c
            }
            None => Command::new(binary),
        };
        cmd.args([
            "run",
            "--metrics-addr",
            &metrics_addr,
            "--exit-on-stdin-eof",
            "--log-format",
            "json",
        ])
        .args(s.args)
        .env("KUBECONFIG", s.kubeconfig)
        .env("RUST_LOG", "info,opsconductor_operator=debug")
        // The test control planes have no admission guardrails installed (cluster-wide
        // policies would guard every other test's namespaces), and the tests' pebble listens on
        // 127.0.0.1: the two defaults of the released binary that tests must relax. Set here,
        // not only in .cargo/config.toml, so that a test binary run directly (scripts/test
        // --repeat) starts the same operator; a test's own `env` overrides them
        // (tests/guardrails_real.rs, tests/acme_directory_real.rs).
        .env("OPSC_ADMISSION_GUARDRAILS", "ignore")
        .env("OPSC_ALLOW_LOOPBACK_ACME_DIRECTORY", "true");
        for (k, v) in s.env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("the operator binary starts");
        let stdin = child.stdin.take().expect("piped stdin");
        eprintln!(
            "support: operator {} started (pid {}), log {}",
            s.name,
            child.id(),
            log.display()
        );
        OperatorProcess {
            name: s.name.to_string(),
            child,
            metrics_addr,
            log,
            _stdin: stdin,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `/readyz` answers `ok`: the caches are synced (and, with leader election, whatever the
    /// operator reports there).
    pub fn ready(&self) -> bool {
        http_get(&self.metrics_addr, "/readyz").is_some_and(|b| b.starts_with("ok"))
    }

    /// `/metrics`, or empty when nothing answers.
    pub fn metrics(&self) -> String {
        http_get(&self.metrics_addr, "/metrics").unwrap_or_default()
    }

    /// The sum of the samples whose line starts with `prefix` (a metric name, optionally with
    /// labels); 0 when there is none.
    pub fn metric(&self, prefix: &str) -> f64 {
        self.metrics()
            .lines()
            .filter(|l| !l.starts_with('#') && l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Sends `signal` (as `kill` takes it, e.g. `-TERM`).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal} {}", self.child.id());
    }

    /// Waits for the process to exit; a hang guard, not a timing assertion.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                start.elapsed() < timeout,
                "operator {} did not exit within {timeout:?}; log:\n{}",
                self.name,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: no graceful shutdown, nothing written on the way out.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, as a kubelet stops a pod: the operator ends its work and exits; SIGKILL if it
    /// has not within `grace`.
    pub fn terminate(&mut self, grace: Duration) {
        terminate(&mut self.child, grace);
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

/// SIGTERM to `child`, then SIGKILL if it has not exited within `grace`; reaped either way.
pub fn terminate(child: &mut Child, grace: Duration) {
    if let Ok(None) = child.try_wait() {
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "--- operator {} log (last 80 lines, {}) ---\n{}",
                self.name,
                self.log.display(),
                self.log_tail(80)
            );
        }
    }
}

/// An operator process of a test's own on `cp`, as the chart's service account
/// ([`super::operator::OPERATOR_USER`] with `system:masters`, so the audit log tells its writes
/// apart), with `args`. Its kubeconfig and log go to
/// `<state>/<name>-tests/`.
pub fn spawn_as_operator(
    cp: &super::ControlPlane,
    name: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> OperatorProcess {
    spawn_as_operator_under(cp, name, args, env, &[])
}

/// [`spawn_as_operator`], started by `wrapper` ([`OperatorProcess::spawn_under`]).
pub fn spawn_as_operator_under(
    cp: &super::ControlPlane,
    name: &str,
    args: &[&str],
    env: &[(&str, &str)],
    wrapper: &[&str],
) -> OperatorProcess {
    let dir = cp.state_dir.join(format!("{name}-tests"));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join(format!("kubeconfig-{name}-{}", std::process::id()));
    super::operator::write_impersonating_kubeconfig(
        cp,
        &kubeconfig,
        super::operator::OPERATOR_USER,
        &["system:masters", "system:authenticated"],
    );
    OperatorProcess::spawn_under(
        Spawn {
            name,
            kubeconfig: &kubeconfig,
            log_dir: &dir,
            args,
            env,
        },
        wrapper,
    )
}

/// The `wrapper` for [`spawn_as_operator_under`] that runs the operator in a mount namespace of
/// its own whose `/etc/hosts` is `hosts` (written to `<state>/<name>-hosts-<pid>`), so that the
/// system resolver itself answers the operator's lookups with the test's addresses, loopback
/// and link-local ones included (root, and `unshare` from util-linux, as the node tier needs).
pub fn private_hosts_wrapper(cp: &super::ControlPlane, name: &str, hosts: &str) -> Vec<String> {
    let path = cp
        .state_dir
        .join(format!("{name}-hosts-{}", std::process::id()));
    std::fs::write(&path, hosts).unwrap();
    [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        r#"mount --bind "$0" /etc/hosts && exec "$@""#,
        path.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec()
}

/// A TCP listener on 127.0.0.1 (what listens on the node's loopback, where the operator must not
/// connect; a connection to 0.0.0.0 lands there too): its port, and the number of connections
/// made to it so far. The thread ends with the test binary.
pub fn counting_listener() -> (u16, Arc<AtomicUsize>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let connections = Arc::new(AtomicUsize::new(0));
    let counted = connections.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            counted.fetch_add(1, Ordering::SeqCst);
            drop(stream);
        }
    });
    (port, connections)
}
