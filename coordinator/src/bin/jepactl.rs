//! `jepactl`: the command-line client of the coordinator; see
//! [`jepa_coordinator::cli`].

#[tokio::main]
async fn main() -> std::process::ExitCode {
    jepa_coordinator::cli::main().await
}
