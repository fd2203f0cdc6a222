#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use opsconductor_operator::build::{self, BuildOptions};
use opsconductor_operator::controller::{self, RunOptions};
use opsconductor_operator::leader;
use opsconductor_operator::metrics::Metrics;
use opsconductor_operator::render::{self, Format};
use opsconductor_operator::server::{self, Health};

/// Edge TLS, internal HTTP, enforced: a Kubernetes operator for OpsConductorStack.
#[derive(Parser)]
#[command(name = "opsconductor-operator", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the OpsConductorStack CustomResourceDefinition as YAML.
    Crd,
    /// The gateway's `requests` sidecar (spec.gateway.metrics): counts the line nginx sends
    /// per request by route and status class, with latency histograms, and serves /metrics.
    GatewayRequests {
        /// UDP address where nginx sends one line per request.
        #[arg(long, default_value = "127.0.0.1:8083")]
        udp: String,
        /// Address of /metrics.
        #[arg(long, default_value = "0.0.0.0:9114")]
        listen: String,
    },
    /// Print, offline, every object the operator would create for the stack in FILE.
    Render {
        /// The OpsConductorStack manifest (YAML or JSON).
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Output format.
        #[arg(short = 'o', long = "output", value_enum, default_value = "yaml")]
        output: Format,
        /// Namespace to assume when the manifest has none.
        #[arg(short = 'n', long = "namespace", default_value = "default")]
        namespace: String,
        /// The cluster's DNS domain, used in the gateway's upstream addresses.
        #[arg(long, env = "OPSC_CLUSTER_DOMAIN", default_value = build::DEFAULT_CLUSTER_DOMAIN,
              value_parser = opsconductor_operator::validate::check_cluster_domain)]
        cluster_domain: String,
        /// The cluster's own address ranges (pod, Service and node CIDRs), comma-separated.
        /// Services' egress CIDRs never reach into them: a wider CIDR has them cut out, a
        /// CIDR inside one is refused (pods and Services are reached by identity instead).
        #[arg(long, env = "OPSC_CLUSTER_CIDRS", value_delimiter = ',',
              value_parser = opsconductor_operator::validate::check_cluster_cidr)]
        cluster_cidrs: Vec<ipnet::IpNet>,
    },
    /// Run the operator against the cluster of the current kubeconfig (or in-cluster config).
    Run {
        /// Address of /healthz, /readyz and /metrics.
        #[arg(long, env = "OPSC_METRICS_ADDR", default_value = "0.0.0.0:8080")]
        metrics_addr: String,
        /// Log format.
        #[arg(long, env = "OPSC_LOG_FORMAT", value_enum, default_value = "text")]
        log_format: LogFormat,
        /// The cluster's DNS domain, used in the gateway's upstream addresses.
        #[arg(long, env = "OPSC_CLUSTER_DOMAIN", default_value = build::DEFAULT_CLUSTER_DOMAIN,
              value_parser = opsconductor_operator::validate::check_cluster_domain)]
        cluster_domain: String,
        /// Seconds between periodic re-checks of every stack (watches catch changes sooner).
        #[arg(long, env = "OPSC_RESYNC_SECONDS", default_value_t = 300)]
        resync_seconds: u64,
        /// The image of the gateways' `requests` metrics sidecar (spec.gateway.metrics): this
        /// operator's own image, which the chart passes (a mirrored registry's name included).
        #[arg(long, env = "OPSC_GATEWAY_REQUESTS_IMAGE",
              default_value = opsconductor_operator::crd::DEFAULT_OPERATOR_IMAGE)]
        gateway_requests_image: String,
        /// Stacks reconciled at the same time (at least 1). Bounds the operator's memory and
        /// its burst of requests when many stacks change at once, e.g. at start.
        #[arg(long, env = "OPSC_MAX_CONCURRENT_RECONCILES", default_value_t = 8)]
        max_concurrent_reconciles: u16,
        /// Apply every object on every reconcile instead of only what differs from the
        /// watch caches. For benchmarks only: it multiplies the writes to the API server.
        #[arg(long, hide = true, env = "OPSC_APPLY_ALWAYS")]
        apply_always: bool,
        /// No longer used: the gateway reaches services by their ClusterIP, which the operator
        /// writes into its configuration (docs/gateway.md). Accepted, and ignored with a
        /// warning, so that existing installations keep starting.
        #[arg(long, hide = true, env = "OPSC_DNS_RESOLVER")]
        dns_resolver: Option<String>,
        /// Shut down cleanly when standard input reaches end of file: for a supervisor (or a
        /// test harness) that wants the operator to stop when it goes away.
        #[arg(long, hide = true)]
        exit_on_stdin_eof: bool,
        /// `require`: report PolicyEnforced=True only while the admission guardrails
        /// (ValidatingAdmissionPolicies and bindings, manifests/admission/) are installed and
        /// bound; `ignore`: do not check them (they are deliberately not installed).
        #[arg(
            long,
            env = "OPSC_ADMISSION_GUARDRAILS",
            value_enum,
            default_value = "require"
        )]
        admission_guardrails: GuardrailCheck,
        /// Accept `spec.tls.acme.directoryUrl` on a loopback address (127.0.0.0/8, ::1,
        /// localhost), i.e. a CA on the operator's own machine: for tests and demos only.
        /// Link-local and metadata addresses are refused always.
        #[arg(long, env = "OPSC_ALLOW_LOOPBACK_ACME_DIRECTORY")]
        allow_loopback_acme_directory: bool,
        /// Gateway images stacks may use, comma-separated: a repository (any tag or digest of
        /// it) or a prefix ending in `/`. Empty: any image. The gateway runs with the stack's
        /// TLS key mounted.
        #[arg(long, env = "OPSC_ALLOWED_GATEWAY_IMAGES", value_delimiter = ',')]
        allowed_gateway_images: Vec<String>,
        /// The cluster's own address ranges (pod, Service and node CIDRs), comma-separated.
        /// Services' egress CIDRs never reach into them: a wider CIDR has them cut out, a
        /// CIDR inside one is refused (pods and Services are reached by identity instead).
        #[arg(long, env = "OPSC_CLUSTER_CIDRS", value_delimiter = ',',
              value_parser = opsconductor_operator::validate::check_cluster_cidr)]
        cluster_cidrs: Vec<ipnet::IpNet>,
        /// Serve only these namespaces, comma-separated: every watch is then one per listed
        /// namespace, and nothing outside them is read or written (one release per tenant;
        /// docs/operations.md). Empty: every namespace, through cluster-wide watches.
        #[arg(long, env = "OPSC_WATCH_NAMESPACES", value_delimiter = ',')]
        watch_namespaces: Vec<String>,
        /// Serve only the namespaces whose labels match this label selector (e.g.
        /// `tenant=a`, `tenant in (a,b),!frozen`): Namespaces are watched with it, and every
        /// other watch is one per selected namespace, started and stopped as namespaces enter
        /// and leave the selection. Not together with --watch-namespaces.
        #[arg(long, env = "OPSC_NAMESPACE_SELECTOR")]
        namespace_selector: Option<String>,
        /// Where the violation audit watches Pods, Services, NetworkPolicies, Ingresses and
        /// Gateway API routes: `scope`, everywhere the operator serves (cluster-wide watches
        /// when it serves every namespace); `with-stacks`, one watch per kind and namespace
        /// that holds a stack (objects elsewhere cost nothing; each such namespace costs a
        /// connection per kind; docs/operations.md).
        #[arg(
            long,
            env = "OPSC_AUDIT_NAMESPACES",
            value_enum,
            default_value = "scope"
        )]
        audit_namespaces: controller::scope::AuditNamespaces,
        #[command(flatten)]
        election: leader::ElectionArgs,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum GuardrailCheck {
    Require,
    Ignore,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run {
            metrics_addr,
            log_format,
            cluster_domain,
            gateway_requests_image,
            resync_seconds,
            max_concurrent_reconciles,
            apply_always,
            dns_resolver,
            exit_on_stdin_eof,
            admission_guardrails,
            allow_loopback_acme_directory,
            allowed_gateway_images,
            cluster_cidrs,
            watch_namespaces,
            namespace_selector,
            audit_namespaces,
            election,
        } => {
            init_logging(log_format);
            let scope = match controller::scope::Scope::from_flags(
                &watch_namespaces,
                namespace_selector.as_deref(),
            ) {
                Ok(scope) => scope,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            let options = RunOptions {
                build: BuildOptions {
                    cluster_domain,
                    operator_namespace: std::env::var("POD_NAMESPACE")
                        .ok()
                        .filter(|n| !n.is_empty()),
                    cluster_cidrs,
                    requests_exporter_image: gateway_requests_image,
                    ..BuildOptions::default()
                },
                compare_before_apply: !apply_always,
                resync: Duration::from_secs(resync_seconds.max(10)),
                max_concurrent_reconciles: max_concurrent_reconciles.max(1),
                require_guardrails: admission_guardrails == GuardrailCheck::Require,
                allow_loopback_acme_directory,
                allowed_gateway_images: allowed_gateway_images
                    .into_iter()
                    .map(|i| i.trim().to_string())
                    .filter(|i| !i.is_empty())
                    .collect(),
                scope,
                audit_namespaces,
            };
            // Before the runtime starts its threads (see the function).
            opsconductor_operator::memory::tune_allocator();
            let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime starts");
            match runtime.block_on(run(
                metrics_addr,
                options,
                dns_resolver,
                exit_on_stdin_eof,
                election,
            )) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::GatewayRequests { udp, listen } => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a tokio runtime");
            match runtime.block_on(opsconductor_operator::gateway_requests::run(&udp, &listen)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("opsconductor-operator gateway-requests: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Crd => {
            print!("{}", opsconductor_operator::crd_yaml());
            ExitCode::SUCCESS
        }
        Command::Render {
            file,
            output,
            namespace,
            cluster_domain,
            cluster_cidrs,
        } => {
            let options = BuildOptions {
                cluster_domain,
                cluster_cidrs,
                ..BuildOptions::default()
            };
            match render::render_file(&file, &namespace, &options, output) {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
            }
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn"));
    let builder = tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn run(
    metrics_addr: String,
    options: RunOptions,
    dns_resolver: Option<String>,
    exit_on_stdin_eof: bool,
    election: leader::ElectionArgs,
) -> anyhow::Result<()> {
    let client = kube::Client::try_default().await.context(
        "cannot build a Kubernetes client from the kubeconfig or the in-cluster configuration",
    )?;
    if let Some(value) = dns_resolver {
        tracing::warn!(
            dns_resolver = %value,
            "--dns-resolver is no longer used and is ignored: the gateway reaches services by \
             their ClusterIP, which the operator writes into its configuration"
        );
    }
    tracing::info!(namespaces = %options.scope.describe(), "watch scope");
    let listener = tokio::net::TcpListener::bind(&metrics_addr)
        .await
        .with_context(|| format!("cannot listen on --metrics-addr {metrics_addr}"))?;
    tracing::info!(address = %listener.local_addr()?, "serving /healthz, /readyz and /metrics");
    let health = Arc::new(Health {
        ready: AtomicBool::new(false),
        metrics: Arc::new(Metrics::default()),
    });
    let server = tokio::spawn(server::serve(listener, health.clone()));
    // Only the holder of the leader Lease runs the controller (without --leader-election: this
    // process, at once); a standby serves the endpoint above meanwhile.
    let election = leader::Config::from_args(&election, &client)?;
    let result = leader::run_elected(
        &client.clone(),
        election,
        &health.clone(),
        shutdown_signal(exit_on_stdin_eof),
        |stop| controller::run(client, options, health, stop),
    )
    .await;
    server.abort();
    Ok(result?)
}

/// Resolves on SIGTERM (the kubelet stopping the pod), Ctrl-C, or, when asked, the end of
/// standard input.
async fn shutdown_signal(exit_on_stdin_eof: bool) {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("a SIGTERM handler installs");
    let stdin_closed = async move {
        if !exit_on_stdin_eof {
            return std::future::pending().await;
        }
        // A plain thread, not `tokio::io::stdin()`: tokio reads stdin on a blocking-pool
        // thread, and the runtime waits for its blocking threads when it is dropped, so a
        // SIGTERM would leave the process hanging until stdin closed. This thread does not
        // keep the process alive once `main` returns.
        let (closed, on_closed) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            use std::io::Read;
            let mut stdin = std::io::stdin().lock();
            let mut buf = [0u8; 64];
            while stdin.read(&mut buf).is_ok_and(|n| n > 0) {}
            let _ = closed.send(());
        });
        let _ = on_closed.await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupt received, shutting down"),
        _ = stdin_closed => tracing::info!("standard input closed, shutting down"),
    }
}
