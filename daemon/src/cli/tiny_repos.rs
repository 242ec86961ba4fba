//! `trellisd tiny-repos --out DIR [--seed N]` (hidden): writes TRELLIS-image-tiny,
//! TRELLIS-text-tiny, dinov2_reg_tiny and clip_text_tiny from seeded random weights
//! ([`crate::tiny_repos`]).

use std::path::PathBuf;

use anyhow::Result;

#[derive(Debug, clap::Args)]
pub struct TinyReposArgs {
    /// Folder to write the four repositories into (created if needed).
    #[arg(long)]
    pub out: PathBuf,
    /// Seed of every random weight (the same seed gives the same files).
    #[arg(long, default_value_t = crate::tiny_repos::DEFAULT_SEED)]
    pub seed: u64,
}

pub fn run(args: &TinyReposArgs) -> Result<i32> {
    let r = crate::tiny_repos::write(&args.out, args.seed)?;
    for p in [&r.image, &r.text, &r.dinov2, &r.clip] {
        println!("{}", p.display());
    }
    Ok(0)
}
