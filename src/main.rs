//! `slimserve`: serve image classifiers over gRPC (`serve`, the default), or ask a server to
//! classify photos (`classify`). Everything else lives in the library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use slimserve::client::{self, ClassifyArgs};
use slimserve::server::{self, shutdown, Config};

#[derive(Debug, Parser)]
#[command(
    name = "slimserve",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// With no subcommand, `slimserve` serves with these flags.
    #[command(flatten)]
    serve: Config,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve every model under --models over gRPC, with Prometheus metrics (the default).
    Serve(Config),
    /// Classify images with a running server and print the top labels.
    Classify(ClassifyArgs),
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Classify(args)) => classify(args).await,
        Some(Command::Serve(config)) => serve(config).await,
        None => serve(cli.serve).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("slimserve: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    server::run(config, shutdown::signal()).await?;
    Ok(())
}

async fn classify(args: ClassifyArgs) -> anyhow::Result<()> {
    for (path, answer) in client::classify(&args).await? {
        print!("{}", client::format_answer(&path, &answer));
    }
    Ok(())
}
