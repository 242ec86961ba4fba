//! `trellisd parity DIR [--device auto|cpu|cuda:N] [--precision full|half|bf16|auto] [--only SUBSTR]
//! [--verbose]`.

use std::path::PathBuf;

use anyhow::Result;

#[derive(Debug, clap::Args)]
pub struct ParityArgs {
    /// Fixture directory (format: shared/reference/README.md); default $TRELLIS_REFERENCE_DIR or ../shared/reference.
    pub dir: Option<PathBuf>,
    /// Device to run on: cpu, cuda[:N] or auto (no fallback: a GPU that cannot be used is an error).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// full (float32, TF32 off: the fp32 fixtures' tolerances), half, bf16 or auto: the torso dtype
    /// of `use_fp16` checkpoints in the pipeline fixtures (the `*_fp16` model fixtures always run
    /// their own precision).
    #[arg(long, default_value = "full")]
    pub precision: String,
    /// Only fixtures whose path contains this text.
    #[arg(long)]
    pub only: Option<String>,
    /// Print every check of every fixture (name, error, tolerance), not only failing ones.
    #[arg(long, short)]
    pub verbose: bool,
}

/// Returns the process exit code: 0 only when something was checked and every fixture passed
/// (none failed, none skipped).
pub fn run(args: &ParityArgs) -> Result<i32> {
    let device = crate::runtime::select(
        &args.device,
        &args.precision,
        crate::runtime::device::Fallback::Fail,
    )?;
    println!(
        "device {} precision {}",
        crate::runtime::device::device_name(&device),
        args.precision
    );
    let dir = args.dir.clone().unwrap_or_else(crate::reference_dir);
    let mut stdout = std::io::stdout();
    let opts = crate::parity::RunOptions {
        only: args.only.as_deref(),
        verbose: args.verbose,
    };
    let s = crate::parity::run_with(&dir, &device, &opts, &mut stdout)?;
    Ok(if s.ok() { 0 } else { 1 })
}
