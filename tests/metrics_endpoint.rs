//! The operator's `/healthz`, `/readyz`, `/metrics` endpoint (src/server.rs) under abuse
//! (issue 14, item 8), on the real binary running against the real control plane:
//! - it holds at most `server::MAX_CONNECTIONS` connections, however many clients open;
//! - out of file descriptors (a low `RLIMIT_NOFILE` set with prlimit), it does not spin a
//!   core retrying `accept`, and answers again once descriptors are free;
//! - a client that dribbles its request a byte at a time is dropped.
//!
//! Figures (file descriptors, CPU time from /proc) are printed. The CPU bound is a ratio of CPU
//! time to the wall time of a hold, far above what an idle operator uses (well under 1 %) and
//! far below what a spinning accept loop takes even on a loaded machine (a runnable thread
//! that never sleeps gets its fair share of a core: 20 % or more with ten runnable threads
//! on two cores).

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use opsconductor_operator::server::MAX_CONNECTIONS;
use support::operator::{http_get, install_crd};
use support::process::spawn_as_operator;
use support::{TestNamespace, eventually};

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Connections the process holds on local port `port` (accepted clients of the endpoint; its
/// listener not counted). Unlike the count of every descriptor, the operator's own connections
/// to the API server (which come and go with what the control plane holds: stacks that other
/// tests left in terminating namespaces) do not move it.
fn connections_on_port(pid: u32, port: u16) -> usize {
    let sockets: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter_map(|target| {
            let t = target.to_string_lossy();
            Some(t.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    // Counted by inode: the kernel's table is read in pieces, and a socket that moves while it
    // is read can show up twice.
    let mut on_port = std::collections::HashSet::new();
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            let f: Vec<&str> = line.split_whitespace().collect();
            let local_port = f
                .get(1)
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            let listening = f.get(3) == Some(&"0A");
            if let Some(inode) = f.get(9)
                && local_port == Some(port)
                && !listening
                && sockets.contains(*inode)
            {
                on_port.insert(inode.to_string());
            }
        }
    }
    on_port.len()
}

/// User plus system CPU time of the process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces): state is field 3, utime 14,
    // stime 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    let hz = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse::<f64>().ok())
        .unwrap_or(100.0);
    ticks / hz
}

fn prlimit_nofile(pid: u32, soft: &str) {
    let out = Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &format!("--nofile={soft}:")])
        .output()
        .expect("prlimit (util-linux) runs");
    assert!(
        out.status.success(),
        "prlimit: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn soft_nofile(pid: u32) -> String {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    line.split_whitespace().nth(3).unwrap().to_string()
}

fn connect_many(addr: &str, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|_| TcpStream::connect(addr).expect("the kernel queues the connection"))
        .collect()
}

#[tokio::test]
async fn the_metrics_endpoint_caps_connections_survives_fd_exhaustion_and_drops_slow_clients() {
    let Some(ns) = TestNamespace::new("metrics-endpoint").await else {
        return;
    };
    let cp = ns.control_plane;
    install_crd(cp).await;
    let op = spawn_as_operator(cp, "metrics-endpoint", &[], &[]);
    let pid = op.child.id();
    let addr = op.metrics_addr.clone();
    eventually(
        "the operator's caches to sync",
        Duration::from_secs(60),
        async || op.ready().then_some(()),
    )
    .await;

    // 1. Many silent clients: the endpoint holds a bounded number of connections for them.
    let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
    let base = open_fds(pid);
    let clients = 300;
    let held = connect_many(&addr, clients);
    eventually(
        "the endpoint to accept connections",
        Duration::from_secs(30),
        async || (connections_on_port(pid, port) >= MAX_CONNECTIONS / 2).then_some(()),
    )
    .await;
    // Whatever it would accept beyond the cap it accepts at once; settle, then count.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let accepted = connections_on_port(pid, port);
    let grown = open_fds(pid).saturating_sub(base);
    eprintln!(
        "metrics_endpoint: {clients} silent clients: the operator holds {accepted} of their \
         connections, {grown} more descriptors in all ({base} before)"
    );
    drop(held);
    assert!(
        accepted <= MAX_CONNECTIONS,
        "{clients} silent clients hold {accepted} connections of the operator (cap {MAX_CONNECTIONS})"
    );
    eventually(
        "/healthz to answer after the silent clients left",
        Duration::from_secs(30),
        async || http_get(&addr, "/healthz"),
    )
    .await;

    eventually(
        "the descriptors of the silent clients to be closed",
        Duration::from_secs(30),
        async || (connections_on_port(pid, port) == 0).then_some(()),
    )
    .await;

    // 2. Out of descriptors: a few above what the process holds now, then more clients than
    // that. Accepting fails with EMFILE while they wait.
    let soft = soft_nofile(pid);
    let in_use = open_fds(pid);
    prlimit_nofile(pid, &(in_use + 4).to_string());
    let held = connect_many(&addr, 40);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (cpu0, wall0) = (cpu_seconds(pid), Instant::now());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (cpu, wall) = (cpu_seconds(pid) - cpu0, wall0.elapsed().as_secs_f64());
    let exhausted_fds = open_fds(pid);
    prlimit_nofile(pid, &soft);
    drop(held);
    eprintln!(
        "metrics_endpoint: out of descriptors ({exhausted_fds} open, limit {}): {cpu:.3} s of CPU \
         in {wall:.2} s ({:.1} % of a core)",
        in_use + 4,
        100.0 * cpu / wall
    );
    assert!(
        exhausted_fds >= in_use + 4,
        "premise: the process should be at its descriptor limit ({exhausted_fds} open)"
    );
    assert!(
        cpu < 0.1 * wall,
        "the operator used {cpu:.3} s of CPU in {wall:.2} s while out of file descriptors: \
         the accept loop spins"
    );
    let body = eventually(
        "/metrics to answer once descriptors are free",
        Duration::from_secs(30),
        async || http_get(&addr, "/metrics"),
    )
    .await;
    // A family that is always there: counters with labels show up only once counted (a
    // reconcile), and whether one happened by now depends on what else the control plane
    // holds (a full run once had no stack at that moment).
    assert!(body.contains("\nopsconductor_leader 1\n"), "{body}");

    // 3. A client that sends a byte every 200 ms and never ends its request head is dropped
    // (the deadline counts from the connection, not from the last byte). The limit below is
    // a hang guard, twelve times the endpoint's deadline.
    let mut slow = TcpStream::connect(&addr).unwrap();
    slow.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let started = Instant::now();
    let mut sent = 0usize;
    loop {
        if slow.write_all(b"x").is_err() {
            break;
        }
        sent += 1;
        let mut buf = [0u8; 64];
        match slow.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => panic!("the endpoint answered an unfinished request head"),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "a client sending a byte every 200 ms was still connected after {sent} bytes"
        );
    }
    eprintln!(
        "metrics_endpoint: a client dribbling a byte every 200 ms was dropped after {sent} bytes \
         ({:.1} s)",
        started.elapsed().as_secs_f64()
    );
    assert!(
        http_get(&addr, "/healthz").is_some(),
        "/healthz answers afterwards"
    );
}
