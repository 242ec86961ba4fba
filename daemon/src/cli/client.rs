//! `trellisd client <op>`: talk to a running daemon (docs/PROTOCOL.md). Results are printed as
//! JSON on stdout, progress on stderr.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use trellis_ipc_protocol::{
    AssetRef, BinaryBuilder, DType, DecodeParams, EditParams, Format, GenerateParams, HelloParams,
    ImageInput, JobInfo, JobRef, MeshInput, MultiImageMode, Op, RegionBox, RegionParams, Transport,
    VariantParams, PROTOCOL_VERSION,
};

use crate::client::Client;
use crate::pipelines::edit::Region;

#[derive(Debug, clap::Args)]
pub struct ClientArgs {
    /// Daemon address (default: $TRELLIS_RS_SOCKET, else the platform's).
    #[arg(long, global = true)]
    pub socket: Option<PathBuf>,
    #[command(subcommand)]
    pub op: ClientOp,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum TransportArg {
    Auto,
    Shm,
    Inline,
}

impl From<TransportArg> for Transport {
    fn from(t: TransportArg) -> Self {
        match t {
            TransportArg::Auto => Transport::Auto,
            TransportArg::Shm => Transport::Shm,
            TransportArg::Inline => Transport::Inline,
        }
    }
}

fn parse_format(s: &str) -> Result<Format, String> {
    match s.trim() {
        "mesh" => Ok(Format::Mesh),
        "gaussian" => Ok(Format::Gaussian),
        "radiance_field" => Ok(Format::RadianceField),
        o => Err(format!(
            "unknown format {o:?} (expected mesh, gaussian or radiance_field)"
        )),
    }
}

#[derive(Debug, clap::Args)]
pub struct JobOutputArgs {
    /// Output formats (default mesh,gaussian).
    #[arg(long, value_parser = parse_format, value_delimiter = ',')]
    pub formats: Vec<Format>,
    /// Return at once with the queued job instead of following it.
    #[arg(long)]
    pub no_wait: bool,
    /// Write the mesh (fetched as arrays) as GLB.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Copy the asset's Gaussian PLY here.
    #[arg(long)]
    pub ply: Option<PathBuf>,
    /// How the mesh arrays come over.
    #[arg(long, value_enum, default_value = "auto")]
    pub transport: TransportArg,
}

#[derive(Debug, clap::Subcommand)]
pub enum ClientOp {
    /// Versions, devices, models, limits.
    Hello,
    /// Image(s) or text → 3D on the daemon.
    Generate {
        #[arg(long)]
        model: Option<String>,
        #[arg(long, num_args = 1.., conflicts_with = "text")]
        image: Vec<PathBuf>,
        #[arg(long)]
        text: Option<String>,
        #[arg(long)]
        multidiffusion: bool,
        #[arg(long)]
        seed: Option<u64>,
        #[arg(long)]
        ss_steps: Option<u32>,
        #[arg(long)]
        ss_cfg: Option<f64>,
        #[arg(long)]
        slat_steps: Option<u32>,
        #[arg(long)]
        slat_cfg: Option<f64>,
        #[command(flatten)]
        output: JobOutputArgs,
    },
    /// A new appearance for a mesh file.
    Variant {
        #[arg(long)]
        model: Option<String>,
        #[arg(long)]
        mesh: PathBuf,
        #[arg(long)]
        text: Option<String>,
        #[arg(long, conflicts_with = "text")]
        image: Option<PathBuf>,
        #[arg(long)]
        voxel_resolution: Option<u32>,
        #[arg(long)]
        seed: Option<u64>,
        #[arg(long)]
        slat_steps: Option<u32>,
        #[command(flatten)]
        output: JobOutputArgs,
    },
    /// Regenerate a region of a stored asset (docs/EDIT.md); the result is a new asset.
    Edit {
        /// The stored asset's id.
        asset: String,
        /// The region as a box in the asset's normalised space: x0,y0,z0,x1,y1,z1.
        #[arg(
            long = "box",
            value_name = "X0,Y0,Z0,X1,Y1,Z1",
            required_unless_present = "mask",
            allow_hyphen_values = true
        )]
        region_box: Option<String>,
        /// The region as a voxel mask: an [R, R, R] .npy on the model's structure grid
        /// (non-zero = regenerate); with --box, their union.
        #[arg(long)]
        mask: Option<PathBuf>,
        #[arg(long)]
        model: Option<String>,
        #[arg(long, required_unless_present = "image")]
        text: Option<String>,
        #[arg(long, conflicts_with = "text")]
        image: Option<PathBuf>,
        #[arg(long)]
        seed: Option<u64>,
        #[arg(long)]
        ss_steps: Option<u32>,
        #[arg(long)]
        slat_steps: Option<u32>,
        /// RePaint resampling: jumps back per jump point.
        #[arg(long)]
        jumps: Option<u32>,
        /// RePaint resampling: a jump's length in sampler steps.
        #[arg(long)]
        jump_length: Option<u32>,
        #[command(flatten)]
        output: JobOutputArgs,
    },
    /// Decode a stored asset into more formats (no sampling).
    Decode {
        asset: String,
        #[arg(long, value_parser = parse_format, value_delimiter = ',', required = true)]
        formats: Vec<Format>,
    },
    /// One job's state.
    Status { job: u64 },
    /// Every job of this daemon run.
    Jobs,
    /// Cancel a job.
    Cancel { job: u64 },
    /// Fetch an asset's arrays; with --out write the mesh as GLB.
    Fetch {
        asset: String,
        #[arg(long, default_value = "mesh", value_parser = parse_format)]
        what: Format,
        #[arg(long, value_enum, default_value = "auto")]
        transport: TransportArg,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Stored assets: list, get ID, delete ID.
    Assets {
        #[command(subcommand)]
        action: Option<AssetsAction>,
    },
    /// Stop the daemon.
    Shutdown,
}

#[derive(Debug, clap::Subcommand)]
pub enum AssetsAction {
    List,
    Get { asset: String },
    Delete { asset: String },
}

fn print(v: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
    );
}

fn image_upload(paths: &[PathBuf], b: &mut BinaryBuilder) -> Result<Vec<ImageInput>> {
    paths
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let bytes = std::fs::read(p).with_context(|| format!("image {}", p.display()))?;
            let name = format!("image{i}");
            b.push(&name, DType::U8, &[bytes.len() as u64], &bytes)?;
            Ok(ImageInput::Encoded(name))
        })
        .collect()
}

/// An edit's region from `--box` and/or `--mask` (uploaded as `u8 [R, R, R]`).
fn edit_region(
    region_box: Option<&str>,
    mask: Option<&Path>,
    b: &mut BinaryBuilder,
) -> Result<RegionParams> {
    let mut r = RegionParams::default();
    if let Some(spec) = region_box {
        let Region::Box { min, max } = Region::parse_box(spec).context("--box")? else {
            bail!("--box: not a box");
        };
        r.region_box = Some(RegionBox { min, max });
    }
    if let Some(p) = mask {
        let spec = format!("mask:{}", p.display());
        let Region::Mask { dims, voxels } = Region::parse(&spec).context("--mask")? else {
            bail!("--mask: not a mask");
        };
        let bytes: Vec<u8> = voxels.iter().map(|&v| u8::from(v)).collect();
        let shape: Vec<u64> = dims.iter().map(|&d| d as u64).collect();
        b.push("region_mask", DType::U8, &shape, &bytes)?;
        r.mask = Some("region_mask".into());
    }
    Ok(r)
}

fn absolute(p: &Path) -> Result<String> {
    Ok(std::path::absolute(p)
        .with_context(|| format!("{}", p.display()))?
        .display()
        .to_string())
}

pub fn run(args: &ClientArgs) -> Result<i32> {
    let address = args
        .socket
        .clone()
        .unwrap_or_else(crate::server::paths::socket_address);
    let mut c = Client::connect(&address)?;
    match &args.op {
        ClientOp::Hello => print(&c.call(Op::Hello(HelloParams {
            protocol: PROTOCOL_VERSION,
            client: "trellisd client".into(),
        }))?),
        ClientOp::Generate {
            model,
            image,
            text,
            multidiffusion,
            seed,
            ss_steps,
            ss_cfg,
            slat_steps,
            slat_cfg,
            output,
        } => {
            let mut b = BinaryBuilder::default();
            let images = image_upload(image, &mut b)?;
            if images.is_empty() && text.is_none() {
                bail!("give --image PATH... or --text PROMPT");
            }
            let op = Op::Generate(GenerateParams {
                model: model.clone(),
                text: text.clone(),
                images,
                multi_image_mode: if *multidiffusion {
                    MultiImageMode::Multidiffusion
                } else {
                    MultiImageMode::Stochastic
                },
                seed: *seed,
                ss_steps: *ss_steps,
                ss_cfg: *ss_cfg,
                slat_steps: *slat_steps,
                slat_cfg: *slat_cfg,
                formats: output.formats.clone(),
                glb: None,
                no_background_removal: false,
                save_mask: false,
                wait: !output.no_wait,
            });
            run_job(&mut c, op, b, output)?;
        }
        ClientOp::Variant {
            model,
            mesh,
            text,
            image,
            voxel_resolution,
            seed,
            slat_steps,
            output,
        } => {
            let mut b = BinaryBuilder::default();
            let image = match image {
                Some(p) => image_upload(std::slice::from_ref(p), &mut b)?.pop(),
                None => None,
            };
            let op = Op::Variant(VariantParams {
                model: model.clone(),
                mesh: MeshInput::Path(absolute(mesh)?),
                text: text.clone(),
                image,
                voxel_resolution: *voxel_resolution,
                seed: *seed,
                slat_steps: *slat_steps,
                slat_cfg: None,
                formats: output.formats.clone(),
                glb: None,
                no_background_removal: false,
                save_mask: false,
                wait: !output.no_wait,
            });
            run_job(&mut c, op, b, output)?;
        }
        ClientOp::Edit {
            asset,
            region_box,
            mask,
            model,
            text,
            image,
            seed,
            ss_steps,
            slat_steps,
            jumps,
            jump_length,
            output,
        } => {
            let mut b = BinaryBuilder::default();
            let image = match image {
                Some(p) => image_upload(std::slice::from_ref(p), &mut b)?.pop(),
                None => None,
            };
            let region = edit_region(region_box.as_deref(), mask.as_deref(), &mut b)?;
            let op = Op::Edit(EditParams {
                asset: asset.clone(),
                region,
                model: model.clone(),
                text: text.clone(),
                image,
                seed: *seed,
                ss_steps: *ss_steps,
                ss_cfg: None,
                slat_steps: *slat_steps,
                slat_cfg: None,
                jumps: *jumps,
                jump_length: *jump_length,
                formats: output.formats.clone(),
                glb: None,
                no_background_removal: false,
                save_mask: false,
                wait: !output.no_wait,
            });
            run_job(&mut c, op, b, output)?;
        }
        ClientOp::Decode { asset, formats } => {
            let a = c.call_with(
                Op::Decode(DecodeParams {
                    asset: asset.clone(),
                    formats: formats.clone(),
                    glb: None,
                    wait: true,
                }),
                Vec::new(),
                Vec::new(),
                progress_line,
            )?;
            print(&a.result);
        }
        ClientOp::Status { job } => print(&c.call(Op::Status(JobRef { job: *job }))?),
        ClientOp::Jobs => print(&c.call(Op::Jobs {})?),
        ClientOp::Cancel { job } => print(&c.call(Op::Cancel(JobRef { job: *job }))?),
        ClientOp::Fetch {
            asset,
            what,
            transport,
            out,
        } => {
            let what = *what;
            let t = Instant::now();
            let arrays = c.fetch(asset, what, (*transport).into())?;
            eprintln!(
                "fetched {} arrays ({} bytes) via {:?} in {:.3} s",
                arrays.arrays.len(),
                arrays.data.len(),
                arrays.transport,
                t.elapsed().as_secs_f64()
            );
            print(&serde_json::to_value(&arrays.arrays)?);
            if let Some(p) = out {
                arrays.write_glb(p)?;
                eprintln!("wrote {}", p.display());
            }
        }
        ClientOp::Assets { action } => match action {
            None | Some(AssetsAction::List) => print(&c.call(Op::AssetsList {})?),
            Some(AssetsAction::Get { asset }) => print(&c.call(Op::AssetsGet(AssetRef {
                asset: asset.clone(),
            }))?),
            Some(AssetsAction::Delete { asset }) => print(&c.call(Op::AssetsDelete(AssetRef {
                asset: asset.clone(),
            }))?),
        },
        ClientOp::Shutdown => print(&c.call(Op::Shutdown {})?),
    }
    Ok(0)
}

fn progress_line(p: &trellis_ipc_protocol::ProgressInfo) {
    let eta = p.eta_s.map(|e| format!(" eta {e:.1}s")).unwrap_or_default();
    eprintln!("job {} {} {}/{}{eta}", p.job, p.stage, p.step, p.total);
}

fn run_job(c: &mut Client, op: Op, b: BinaryBuilder, output: &JobOutputArgs) -> Result<()> {
    let t0 = Instant::now();
    let a = c.call_with(op, b.arrays, b.binary, progress_line)?;
    if output.no_wait {
        print(&a.result);
        return Ok(());
    }
    let info: JobInfo = serde_json::from_value(a.result.clone())?;
    eprintln!(
        "job {} done in {:.2} s (first sampler step {:.2} s after the job started, models {}); asset {}",
        info.job,
        t0.elapsed().as_secs_f64(),
        info.first_step_s.unwrap_or(f64::NAN),
        match info.models_resident {
            Some(true) => "resident",
            Some(false) => "loaded",
            None => "?",
        },
        info.asset.as_deref().unwrap_or("-")
    );
    print(&a.result);
    let asset = info
        .asset
        .ok_or_else(|| anyhow::anyhow!("the job finished without an asset"))?;
    if let Some(p) = &output.out {
        let arrays = c.fetch(&asset, Format::Mesh, output.transport.into())?;
        arrays.write_glb(p)?;
        eprintln!("wrote {} (arrays via {:?})", p.display(), arrays.transport);
    }
    if let Some(p) = &output.ply {
        let info = c.call(Op::AssetsGet(AssetRef { asset }))?;
        let src = info["files"]["ply"].as_str().ok_or_else(|| {
            anyhow::anyhow!("the asset has no Gaussians (add gaussian to --formats)")
        })?;
        std::fs::copy(src, p).with_context(|| format!("copying {src} to {}", p.display()))?;
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}
