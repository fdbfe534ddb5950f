//! `slimserve`: serve image classifiers over gRPC (`serve`, the default), ask a server to
//! classify photos (`classify`), load-test it (`load`) or compare its models under load
//! (`compare`). Everything else lives in the library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use slimserve::client::{self, ClassifyArgs};
use slimserve::load::{self, compare::CompareArgs, soak::SoakArgs, LoadArgs};
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
    /// Load-test a running server: closed-loop or rate-paced requests, bounded by a request
    /// count and a time limit; prints throughput, gRPC status counts, latency percentiles and
    /// a histogram (and writes them as JSON with --json).
    Load(LoadArgs),
    /// Run the same load against each model (e.g. big, kd, kd-q8) in turn and mixed, at each
    /// concurrency level, and print one table: size, accuracy, throughput, p50/p99, and the
    /// server-side queue/compute split read from /metrics.
    Compare(CompareArgs),
    /// Soak a running server: mixed valid, oversize, malformed and cancelled requests on both
    /// APIs at high concurrency for a long time, its resident memory sampled; fails on a status
    /// a request's kind does not allow or on memory growth after the warm-up.
    Soak(SoakArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, None | Some(Command::Serve(_))) {
        // Before the runtime starts its threads: memory freed on any of them can then go back
        // to the system (see the function's notes).
        slimserve::backend::one_malloc_arena();
    }
    match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime.block_on(run(cli)),
        Err(e) => {
            eprintln!("slimserve: error: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Some(Command::Classify(args)) => classify(args).await,
        Some(Command::Serve(config)) => serve(config).await,
        Some(Command::Load(args)) => load::load(&args).await.map(|r| print!("{r}")),
        Some(Command::Compare(args)) => load::compare::compare(&args)
            .await
            .map(|rows| print!("{}", load::compare::markdown(&rows))),
        Some(Command::Soak(args)) => soak(args).await,
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

async fn soak(args: SoakArgs) -> anyhow::Result<()> {
    let report = load::soak::soak(&args).await?;
    print!("{report}");
    if !report.passed {
        anyhow::bail!(
            "soak failed: {} unexpected outcome(s), memory growth {:.1} MiB (limit {:.1}), {} swap failure(s)",
            report.unexpected,
            report.growth_mib,
            report.max_growth_mib,
            report.swaps.as_ref().map_or(0, |w| w.failures.len())
        );
    }
    Ok(())
}

/// Prints each answer as it comes and each image's own error on stderr, going on with the
/// rest; fails at the end if any image failed (at once for a connection or model error).
async fn classify(args: ClassifyArgs) -> anyhow::Result<()> {
    use std::io::Write;
    let mut failed = 0usize;
    client::classify_each(&args, |path, answer| {
        match answer {
            Ok(r) => {
                print!("{}", client::format_answer(path, &r));
                let _ = std::io::stdout().flush();
            }
            Err(e) => {
                failed += 1;
                eprintln!("slimserve: error: {e}");
            }
        }
        std::ops::ControlFlow::Continue(())
    })
    .await?;
    if failed > 0 {
        anyhow::bail!("{failed} of {} images failed", args.images.len());
    }
    Ok(())
}
