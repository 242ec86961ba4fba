//! `trellisd serve`: start the resident daemon (docs/PROTOCOL.md).

use anyhow::Result;

use crate::jobs::ConditionerOverrides;
use crate::server::{serve, ServeOptions};

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// A pipeline to serve (hub id or folder); repeat for several (image and text models).
    /// Default: microsoft/TRELLIS-image-large.
    #[arg(long)]
    pub model: Vec<String>,
    /// Image conditioner (hub id or folder) for every image model; default: pipeline.json's.
    #[arg(long)]
    pub image_cond_model: Option<String>,
    /// Text conditioner (hub id or folder) for every text model; default: pipeline.json's.
    #[arg(long)]
    pub text_cond_model: Option<String>,
    /// Devices, one worker each: `auto`, `cpu`, `cuda:0,cuda:1`, `cpu,cpu`. A CUDA device that
    /// cannot be used falls back to the CPU with one warning line (`hello` reports the device used).
    #[arg(long, value_delimiter = ',', default_value = "cpu")]
    pub devices: Vec<String>,
    /// auto, full (float32, TF32 off), half (float16 torsos as the original) or bf16.
    #[arg(long, default_value = "auto")]
    pub precision: String,
    /// Pipelines each worker keeps loaded at once (least recently used goes first).
    #[arg(long, default_value_t = 2)]
    pub max_resident: usize,
    /// U²-Net weights for removing the background of input images without transparency: a hub
    /// id (default leonelhs/u2net) or a local folder holding u2net.pth or model.safetensors.
    #[arg(long, value_name = "ID|DIR")]
    pub background_model: Option<String>,
    #[command(flatten)]
    pub memory: super::memory_args::MemoryArgs,
}

pub fn run(args: &ServeArgs) -> Result<i32> {
    let models = if args.model.is_empty() {
        vec![crate::jobs::models::DEFAULT_IMAGE_MODEL.to_string()]
    } else {
        args.model.clone()
    };
    serve(ServeOptions {
        models,
        conditioners: ConditionerOverrides {
            image: args.image_cond_model.clone(),
            text: args.text_cond_model.clone(),
        },
        devices: args.devices.clone(),
        precision: args.precision.parse()?,
        max_resident: args.max_resident,
        background_model: args.background_model.clone(),
        memory: args.memory.options()?,
    })
}
