//! `trellisd bench NAME [--threads N] [--device D] [--precision P] [--weights W --inputs I]` (`--list`
//! shows the names; `pipeline` also takes `--vram-tier`, `--vram-budget`, `--vram-ballast`): see
//! [`crate::bench`].

use anyhow::{bail, Context, Result};

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Benchmark to run (see --list).
    pub name: Option<String>,
    /// Worker threads for the CPU kernels (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Device: cpu, cuda[:N] or auto (no fallback: a GPU that cannot be used is an error).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// auto, full (float32, TF32 off), half or bf16.
    #[arg(long, default_value = "auto")]
    pub precision: String,
    /// Weights file (TRELLIS key names, or a Hugging Face folder for dinov2-large): run one
    /// forward from files, as tools/bench/side_by_side.py does (needs --inputs).
    #[arg(long, requires = "inputs")]
    pub weights: Option<std::path::PathBuf>,
    /// Inputs `.safetensors` for --weights.
    #[arg(long, requires = "weights")]
    pub inputs: Option<std::path::PathBuf>,
    /// `pipeline`: which one (image-large, text-base, text-large, text-xlarge).
    #[arg(long, default_value = "image-large")]
    pub pipeline: String,
    /// `pipeline`: voxels of the SLat stage's shell at 64^3.
    #[arg(long, default_value_t = 20_000)]
    pub voxels: usize,
    /// `pipeline`: sampler steps of both flows (default: the pipeline's, 25).
    #[arg(long)]
    pub steps: Option<usize>,
    /// `pipeline`: timed runs after one warm-up.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// `pipeline`: decoders to run (mesh,gaussian,radiance_field).
    #[arg(long, default_value = "mesh,gaussian,radiance_field")]
    pub formats: String,
    /// `pipeline`: also write the figures as JSON here.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub memory: super::memory_args::MemoryArgs,
    /// List the benchmarks and exit.
    #[arg(long)]
    pub list: bool,
}

pub fn run(args: &BenchArgs) -> Result<i32> {
    let mut stdout = std::io::stdout();
    if args.list {
        for b in crate::bench::BENCHES {
            println!("{:<16} {}", b.name, b.about);
        }
        return Ok(0);
    }
    let Some(name) = &args.name else {
        bail!("bench: give a benchmark name (see `trellisd bench --list`)");
    };
    if let Some(n) = args.threads {
        if n == 0 {
            bail!("bench: --threads must be at least 1");
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("bench: setting up the thread pool")?;
    }
    let device = crate::runtime::select(
        &args.device,
        &args.precision,
        crate::runtime::device::Fallback::Fail,
    )?;
    if let (Some(weights), Some(inputs)) = (&args.weights, &args.inputs) {
        let files = crate::bench::side_by_side::Files { weights, inputs };
        crate::bench::side_by_side::run(name, Some(files), &device, &mut stdout)?;
    } else if name == "pipeline" {
        let opts = crate::bench::pipeline::PipelineOptions {
            pipeline: args.pipeline.clone(),
            voxels: args.voxels,
            steps: args.steps,
            runs: args.runs,
            formats: crate::pipelines::loader::Formats::parse(&args.formats)?,
            json: args.json.clone(),
            memory: args.memory.options()?,
        };
        crate::bench::pipeline::run(&device, &opts, &mut stdout)?;
    } else {
        crate::bench::run(name, &device, &mut stdout)?;
    }
    Ok(0)
}
