//! `jepactl`: the command-line client of the coordinator.
//!
//! Every command talks to the user API over gRPC; the address comes from
//! `--coordinator` or `JEPA_COORDINATOR`. Output is a table by default and
//! JSON with `--output json`. Errors print as one readable line, never a
//! stack of causes.

mod commands;
pub mod output;
pub mod plot;
pub mod submit;
pub mod sweep;
mod watch;

use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use jepa_common::proto::user_service_client::UserServiceClient;
use tonic::transport::{Channel, Endpoint};

pub use submit::SpecArgs;

/// Command-line client of the EC-IJEPA coordinator.
#[derive(Debug, Parser)]
#[command(name = "jepactl", version, about)]
pub struct Cli {
    /// Address of the coordinator, e.g. http://10.0.0.5:50051.
    #[arg(long, global = true, env = "JEPA_COORDINATOR", default_value = "http://127.0.0.1:50051")]
    pub coordinator: String,
    /// Output format.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns for people.
    Table,
    /// JSON for programs.
    Json,
}

/// Format of `jepactl metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MetricsFormat {
    /// Aligned columns (default with --output table).
    Table,
    /// Comma-separated values with a header line.
    Csv,
    /// JSON (default with --output json).
    Json,
}

/// The commands of `jepactl`.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Submits a run: a config file, flags on top of it, or a default run.
    Submit {
        /// The spec and its overrides.
        #[command(flatten)]
        spec: Box<SpecArgs>,
        /// Print the resulting spec as TOML and submit nothing.
        #[arg(long)]
        dry_run: bool,
        /// Watch the run after submitting it.
        #[arg(long)]
        watch: bool,
    },
    /// Shows one run with its attempts and history.
    Get {
        /// Run id, e.g. run-000042.
        run_id: String,
    },
    /// Lists runs, newest first.
    List {
        /// Only runs in this state (repeatable): pending, scheduled,
        /// running, succeeded, failed, cancelled.
        #[arg(long = "state")]
        states: Vec<String>,
        /// Only runs whose name starts with this.
        #[arg(long, default_value = "")]
        name: String,
        /// Only runs of this sweep.
        #[arg(long, default_value = "")]
        sweep: String,
        /// Most runs to show.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Continue after a previous page.
        #[arg(long, default_value = "")]
        page_token: String,
    },
    /// Follows a run live: progress bar with step, loss, throughput, ETA.
    Watch {
        /// Run id.
        run_id: String,
    },
    /// Prints a run's metric points.
    Metrics {
        /// Run id.
        run_id: String,
        /// Only these series (repeatable); all by default.
        #[arg(long)]
        series: Vec<String>,
        /// First step, inclusive.
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// Last step, inclusive.
        #[arg(long)]
        to: Option<u64>,
        /// Most points per series.
        #[arg(long, default_value_t = 10_000)]
        limit: u32,
        /// Table, csv or json; follows --output when absent.
        #[arg(long, value_enum)]
        format: Option<MetricsFormat>,
    },
    /// Cancels a run that has not finished.
    Cancel {
        /// Run id.
        run_id: String,
        /// Why, for the run's history.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Lists the workers with their resources and what runs on them.
    Workers {
        /// Include workers whose lease expired.
        #[arg(long)]
        all: bool,
    },
    /// Lists or downloads a run's checkpoints.
    Checkpoints {
        /// What to do.
        #[command(subcommand)]
        action: CheckpointAction,
    },
    /// Submits a sweep from flags, or shows, reports or cancels one:
    /// `jepactl sweep --context-scale 0.4:1.0,0.85:1.0 --conditioning none,ec
    /// --seeds 0,1`, `jepactl sweep status ID`, `jepactl sweep report ID`.
    Sweep(Box<sweep::SweepCommand>),
    /// Prints the versions of this client and of the coordinator.
    Version,
    /// Prints a shell completion script.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// Checkpoint subcommands.
#[derive(Debug, Subcommand)]
pub enum CheckpointAction {
    /// Lists committed checkpoints.
    List {
        /// Run id.
        run_id: String,
    },
    /// Downloads one checkpoint and verifies its SHA-256.
    Download {
        /// Run id.
        run_id: String,
        /// Step; the newest by default.
        #[arg(long)]
        step: Option<u64>,
        /// File to write; `<run>-<step>.ckpt` by default.
        #[arg(long, short = 'f')]
        file: Option<std::path::PathBuf>,
    },
}

/// Runs `jepactl` with the process arguments; returns the exit code.
pub async fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Completions { shell } = cli.command {
        clap_complete::generate(shell, &mut Cli::command(), "jepactl", &mut std::io::stdout());
        return ExitCode::SUCCESS;
    }
    match commands::run(cli).await {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {}", describe(&err));
            ExitCode::FAILURE
        }
    }
}

/// Connects to the coordinator's user API.
///
/// # Errors
///
/// A readable error naming the address when it cannot be reached.
pub async fn connect(address: &str) -> anyhow::Result<UserServiceClient<Channel>> {
    let channel = channel(address).await?;
    Ok(UserServiceClient::new(channel).max_decoding_message_size(64 << 20))
}

/// Opens a channel to the coordinator.
///
/// # Errors
///
/// A readable error naming the address when it cannot be reached.
pub async fn channel(address: &str) -> anyhow::Result<Channel> {
    let url =
        if address.contains("://") { address.to_string() } else { format!("http://{address}") };
    let endpoint = Endpoint::from_shared(url.clone())
        .map_err(|_| {
            anyhow::anyhow!(
                "{address:?} is not a coordinator address; write host:port or http://host:port"
            )
        })?
        .connect_timeout(Duration::from_secs(5));
    endpoint.connect().await.map_err(|err| {
        anyhow::anyhow!(
            "cannot reach the coordinator at {url} ({}); start it, or point --coordinator or \
             JEPA_COORDINATOR at it",
            root_cause(&err)
        )
    })
}

fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = err;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// Turns an error into one line a person can act on.
pub fn describe(err: &anyhow::Error) -> String {
    let Some(status) = err.downcast_ref::<tonic::Status>() else {
        return err.to_string();
    };
    use tonic::Code;
    let kind = match status.code() {
        Code::InvalidArgument => "invalid argument",
        Code::NotFound => "not found",
        Code::FailedPrecondition => "not allowed now",
        Code::Unavailable => "coordinator unavailable",
        Code::DeadlineExceeded => "timed out",
        Code::DataLoss => "data loss",
        _ => "coordinator error",
    };
    format!("{kind}: {}", status.message())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn statuses_read_as_one_line() {
        let err = anyhow::Error::new(tonic::Status::invalid_argument("mask.context_scale: bad"));
        assert_eq!(describe(&err), "invalid argument: mask.context_scale: bad");
    }

    #[tokio::test]
    async fn an_unreachable_coordinator_gets_a_readable_message() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let err = connect(&addr.to_string()).await.unwrap_err();
        let text = describe(&err);
        assert!(text.starts_with("cannot reach the coordinator at http://127.0.0.1:"), "{text}");
        assert!(!text.contains('\n'));
    }
}
