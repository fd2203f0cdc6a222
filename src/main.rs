#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use opsconductor_operator::build::BuildOptions;
use opsconductor_operator::render::{self, Format};

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
        #[arg(long, env = "OPSC_CLUSTER_DOMAIN", default_value = "cluster.local")]
        cluster_domain: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => {
            print!("{}", opsconductor_operator::crd_yaml());
            ExitCode::SUCCESS
        }
        Command::Render {
            file,
            output,
            namespace,
            cluster_domain,
        } => {
            let options = BuildOptions {
                cluster_domain,
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
