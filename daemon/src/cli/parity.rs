//! `trellisd parity DIR [--device cpu|cuda:N] [--only SUBSTR] [--verbose]`.

use std::path::PathBuf;

use anyhow::Result;

#[derive(Debug, clap::Args)]
pub struct ParityArgs {
    /// Fixture directory (format: shared/reference/README.md); default $TRELLIS_REFERENCE_DIR or ../shared/reference.
    pub dir: Option<PathBuf>,
    /// Device to run on: cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
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
    let device = crate::runtime::parse_device(&args.device)?;
    let dir = args.dir.clone().unwrap_or_else(crate::reference_dir);
    let mut stdout = std::io::stdout();
    let opts = crate::parity::RunOptions {
        only: args.only.as_deref(),
        verbose: args.verbose,
    };
    let s = crate::parity::run_with(&dir, &device, &opts, &mut stdout)?;
    Ok(if s.ok() { 0 } else { 1 })
}
