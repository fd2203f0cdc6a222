//! nginx's worker processes follow the gateway pod's CPU limit (issue 14, item 6): with
//! `spec.gateway.resources.limits.cpu`, real nginx started with the configuration exactly as
//! the operator renders it runs that many workers (rounded up), not one per CPU of the machine
//! (`worker_processes auto`, still the setting without a CPU limit). The limits chosen differ
//! from this machine's CPU count where it matters: one worker, and one more than the CPUs.

mod gateway_support;

use gateway_support::{Gateway, Resolution, tools_present};
use opsconductor_operator::build::BuildOptions;

const HOST: &str = "workers.example.test";

fn stack_yaml(resources: &str) -> String {
    format!(
        r#"apiVersion: opsconductor.io/v1alpha1
kind: OpsConductorStack
metadata: {{name: edge, namespace: shop}}
spec:
  gateway:
    hosts: [{HOST}]
{resources}  tls:
    secretName: own
  services:
    - {{name: web, image: example/web:1, port: 9000, route: /}}
"#
    )
}

/// The worker processes of the nginx master whose pid file is `pid_file`.
fn workers(pid_file: &std::path::Path) -> usize {
    let master = std::fs::read_to_string(pid_file)
        .unwrap()
        .trim()
        .to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter(|stat| {
            // Field 4, after the command in parentheses, is the parent pid.
            stat.rsplit_once(") ")
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                == Some(master.as_str())
        })
        .count()
}

#[test]
fn nginx_runs_as_many_workers_as_the_cpu_limit_allows() {
    if !tools_present(false) {
        return;
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    for (resources, want) in [
        (
            "    resources: {limits: {cpu: \"1\", memory: 512Mi}}\n".to_string(),
            1,
        ),
        (
            format!(
                "    resources: {{limits: {{cpu: \"{}m\"}}}}\n",
                cpus * 1000 + 500
            ),
            cpus + 1,
        ),
        (String::new(), cpus),
    ] {
        let gw = Gateway::start(
            &stack_yaml(&resources),
            BuildOptions::default(),
            Resolution::Loopback,
            &[HOST],
        );
        let pid_file = gw.layout.path("tmp/nginx.pid");
        // nginx forks its workers right after it writes the pid file; a count that stays the
        // same over several looks is the final one (a hang guard, not a timing assertion).
        let mut seen = Vec::new();
        for _ in 0..200 {
            seen.push(workers(&pid_file));
            if seen.len() >= 5 && seen[seen.len() - 5..].iter().all(|n| *n == want) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let found = *seen.last().unwrap();
        eprintln!("gateway_workers: {resources:?} on {cpus} CPUs: {found} workers");
        assert_eq!(
            found,
            want,
            "workers for {resources:?} on {cpus} CPUs ({} looks, the first {:?}); error log:\n{}",
            seen.len(),
            &seen[..seen.len().min(5)],
            gw.error_log()
        );
    }
}
