//! Typed requests and replies: the JSON section of every frame. `docs/PROTOCOL.md` describes the
//! same shapes for clients in other languages.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{ArrayDesc, ProtocolError, Result};

/// Default seed of `generate` / `variant` (the command line's default).
pub const DEFAULT_SEED: u64 = 42;
/// At most this many images condition one generation.
pub const MAX_IMAGES: usize = 16;
/// Longest side of an uploaded image, in pixels.
pub const MAX_IMAGE_SIDE: u64 = 8192;
/// Encoded (PNG/JPEG/WebP) image files larger than this are refused.
pub const MAX_ENCODED_IMAGE_BYTES: u64 = 256 << 20;
/// Longest text prompt, in bytes of UTF-8.
pub const MAX_TEXT_BYTES: usize = 4096;
/// Largest sampler step count.
pub const MAX_STEPS: u32 = 1000;
/// Largest absolute classifier-free guidance strength.
pub const MAX_CFG: f64 = 100.0;
/// Largest mesh uploaded to `variant`.
pub const MAX_MESH_VERTICES: u64 = 10_000_000;
pub const MAX_MESH_FACES: u64 = 20_000_000;
/// Largest voxel resolution of `variant`.
pub const MAX_VOXEL_RESOLUTION: u32 = 1024;
/// Longest string field (model names, paths, client names) other than the text prompt.
pub const MAX_NAME_BYTES: usize = 4096;
/// `fetch` with `transport: auto` answers inline up to this many bytes, through shared memory above.
pub const INLINE_AUTO_MAX: u64 = 4 << 20;

/// Every operation, as spelt in the `op` field.
pub const OPS: &[&str] = &[
    "hello",
    "ping",
    "generate",
    "variant",
    "edit",
    "decode",
    "status",
    "jobs",
    "cancel",
    "fetch",
    "release",
    "assets_list",
    "assets_get",
    "assets_delete",
    "shutdown",
];

/// A request frame's JSON: `{"id": N, "op": "...", ...op fields, "arrays": [...]}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// Chosen by the client; every reply to this request carries it.
    pub id: u64,
    #[serde(flatten)]
    pub op: Op,
    /// Arrays of the binary section (uploaded images, meshes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub arrays: Vec<ArrayDesc>,
}

impl Request {
    /// The descriptor of the uploaded array `name`.
    pub fn array(&self, name: &str) -> Result<&ArrayDesc> {
        self.arrays
            .iter()
            .find(|a| a.name == name)
            .ok_or_else(|| ProtocolError::BadArray {
                name: name.to_string(),
                reason: "no array of this name in the request's \"arrays\"".into(),
            })
    }
}

/// What a client asks for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Handshake: versions, capabilities, devices, models, limits.
    Hello(HelloParams),
    /// Liveness check.
    Ping {},
    /// Image(s) or text → 3D: a job.
    Generate(GenerateParams),
    /// A new appearance for an existing mesh: a job.
    Variant(VariantParams),
    /// Regenerate a region of a stored asset under a new prompt, the rest kept: a job.
    Edit(EditParams),
    /// Decode a stored asset again (other formats), never re-sampling: a job.
    Decode(DecodeParams),
    /// One job's state.
    Status(JobRef),
    /// Every job the daemon knows of this run (queued, running, finished).
    Jobs {},
    /// Cancel a queued or running job.
    Cancel(JobRef),
    /// Arrays of a stored asset (mesh or Gaussians), through shared memory or inline.
    Fetch(FetchParams),
    /// Delete a shared-memory buffer made by `fetch`.
    Release(ReleaseParams),
    /// Every stored asset.
    AssetsList {},
    /// One stored asset.
    AssetsGet(AssetRef),
    /// Delete one stored asset (its folder).
    AssetsDelete(AssetRef),
    /// Stop the daemon: running jobs are cancelled, buffers deleted.
    Shutdown {},
}

impl Op {
    /// The `op` string of this operation.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Hello(_) => "hello",
            Op::Ping {} => "ping",
            Op::Generate(_) => "generate",
            Op::Variant(_) => "variant",
            Op::Edit(_) => "edit",
            Op::Decode(_) => "decode",
            Op::Status(_) => "status",
            Op::Jobs {} => "jobs",
            Op::Cancel(_) => "cancel",
            Op::Fetch(_) => "fetch",
            Op::Release(_) => "release",
            Op::AssetsList {} => "assets_list",
            Op::AssetsGet(_) => "assets_get",
            Op::AssetsDelete(_) => "assets_delete",
            Op::Shutdown {} => "shutdown",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HelloParams {
    /// The client's protocol version; another than [`crate::PROTOCOL_VERSION`] is refused.
    pub protocol: u16,
    /// Free text naming the client (logs only).
    #[serde(default)]
    pub client: String,
}

/// Representations a job decodes and `fetch` returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    Mesh,
    Gaussian,
    RadianceField,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Mesh => "mesh",
            Format::Gaussian => "gaussian",
            Format::RadianceField => "radiance_field",
        }
    }
}

/// How several images condition one generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MultiImageMode {
    #[default]
    Stochastic,
    Multidiffusion,
}

/// An input image: `{"path": "/abs/file.png"}` (a file the daemon reads), `{"array": "name"}` (a
/// `u8` `[H, W, 4]` RGBA or `[H, W, 3]` RGB array of the binary section) or `{"encoded": "name"}`
/// (a `u8` `[N]` array holding a PNG, JPEG or WebP file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ImageInput {
    Path(String),
    Array(String),
    Encoded(String),
}

/// Sampler overrides; every unset field takes the pipeline's value (pipeline.json).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sampling {
    pub seed: Option<u64>,
    pub ss_steps: Option<u32>,
    pub ss_cfg: Option<f64>,
    pub slat_steps: Option<u32>,
    pub slat_cfg: Option<f64>,
}

/// How a job's GLB (`mesh.glb`) and its fetched mesh are made. Absent (the default): the decoded
/// mesh with vertex colours, every triangle kept. With `bake: true`, as `trellisd generate
/// --out`: hidden faces removed, decimated, UV-unwrapped and a base-colour texture baked from the
/// Gaussians (the job must decode `gaussian`); `fetch` of `mesh` then also returns `uvs` and
/// `texture`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GlbParams {
    /// Bake a texture (default `false`: vertex colours, no decimation).
    #[serde(default)]
    pub bake: bool,
    /// Square texture size, 512 to 4096 (default 1024).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub texture_size: Option<u32>,
    /// Decimate to this many triangles (default: decided by `simplify`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_faces: Option<u64>,
    /// Fraction of the triangles to remove, in [0, 1) (default 0.95).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub simplify: Option<f64>,
    /// Keep every triangle (the texture is still baked).
    #[serde(default)]
    pub keep_high_poly: bool,
}

/// Parameters of `generate`. Exactly one of `text` and `images`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateParams {
    /// A model the daemon serves (its `--model` value or the `name` `hello` lists); default: the
    /// first served model of the prompt's kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<ImageInput>,
    #[serde(default)]
    pub multi_image_mode: MultiImageMode,
    /// Random seed (default [`DEFAULT_SEED`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ss_steps: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ss_cfg: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slat_steps: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slat_cfg: Option<f64>,
    /// Default `["mesh", "gaussian"]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub formats: Vec<Format>,
    /// How the GLB is made (default: vertex colours, no baking).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub glb: Option<GlbParams>,
    /// `true`: an image without transparency is an error instead of having its background
    /// removed (U²-Net).
    #[serde(default, skip_serializing_if = "is_false")]
    pub no_background_removal: bool,
    /// `true`: the matte of each background-removed image is stored with the asset (`mask.png`,
    /// `mask_<i>.png` for several).
    #[serde(default, skip_serializing_if = "is_false")]
    pub save_mask: bool,
    /// `false` (default): the reply comes at once with the queued job. `true`: progress replies
    /// follow until the job ends, then the final reply.
    #[serde(default)]
    pub wait: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl GenerateParams {
    pub fn sampling(&self) -> Sampling {
        Sampling {
            seed: self.seed,
            ss_steps: self.ss_steps,
            ss_cfg: self.ss_cfg,
            slat_steps: self.slat_steps,
            slat_cfg: self.slat_cfg,
        }
    }
}

/// The base mesh of a variant: `{"path": "/abs/mesh.obj"}` (.obj, .ply, .glb, .gltf) or
/// `{"arrays": {"vertices": "v", "faces": "f"}}` (`f32` `[V, 3]`, `u32` or `i32` `[F, 3]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum MeshInput {
    Path(String),
    Arrays { vertices: String, faces: String },
}

/// Parameters of `variant`. Exactly one of `text` and `image`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VariantParams {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    pub mesh: MeshInput,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageInput>,
    /// Default: the structure decoder's resolution (64 for the official models).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub voxel_resolution: Option<u32>,
    /// Random seed (default [`DEFAULT_SEED`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slat_steps: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slat_cfg: Option<f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub formats: Vec<Format>,
    /// How the GLB is made (default: vertex colours, no baking).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub glb: Option<GlbParams>,
    /// As in `generate`.
    #[serde(default, skip_serializing_if = "is_false")]
    pub no_background_removal: bool,
    /// As in `generate`.
    #[serde(default, skip_serializing_if = "is_false")]
    pub save_mask: bool,
    #[serde(default)]
    pub wait: bool,
}

impl VariantParams {
    pub fn sampling(&self) -> Sampling {
        Sampling {
            seed: self.seed,
            ss_steps: None,
            ss_cfg: None,
            slat_steps: self.slat_steps,
            slat_cfg: self.slat_cfg,
        }
    }
}

/// An axis-aligned box in the asset's normalised space: the cube `[-0.5, 0.5]^3` on TRELLIS'
/// axes (z up), `min < max` on every axis.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionBox {
    pub min: [f64; 3],
    pub max: [f64; 3],
}

/// The region an `edit` regenerates: a `box`, a voxel `mask` (the name of an uploaded `u8` array `[R, R, R]` on the model's structure grid, non-zero = regenerate), or both (their
/// union).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionParams {
    #[serde(rename = "box", default, skip_serializing_if = "Option::is_none")]
    pub region_box: Option<RegionBox>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<String>,
}

/// Parameters of `edit`: regenerate `region` of the stored `asset` under `text` or `image` and
/// keep the rest (`docs/EDIT.md`). Exactly one of `text` and `image`. The result is a new asset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EditParams {
    /// The stored asset to edit (its id).
    pub asset: String,
    pub region: RegionParams,
    /// A served model; default: the asset's model when it is served and takes this kind of
    /// prompt, else the first served model of the prompt's kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageInput>,
    /// Random seed (default [`DEFAULT_SEED`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ss_steps: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ss_cfg: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slat_steps: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slat_cfg: Option<f64>,
    /// RePaint resampling: jumps back per jump point (default 0: none), at most 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jumps: Option<u32>,
    /// RePaint resampling: the length of a jump in sampler steps (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jump_length: Option<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub formats: Vec<Format>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub glb: Option<GlbParams>,
    /// As in `generate`.
    #[serde(default, skip_serializing_if = "is_false")]
    pub no_background_removal: bool,
    /// As in `generate`.
    #[serde(default, skip_serializing_if = "is_false")]
    pub save_mask: bool,
    #[serde(default)]
    pub wait: bool,
}

impl EditParams {
    pub fn sampling(&self) -> Sampling {
        Sampling {
            seed: self.seed,
            ss_steps: self.ss_steps,
            ss_cfg: self.ss_cfg,
            slat_steps: self.slat_steps,
            slat_cfg: self.slat_cfg,
        }
    }
}

/// Parameters of `decode`: decode the stored latent of `asset` into `formats` (added to it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecodeParams {
    pub asset: String,
    pub formats: Vec<Format>,
    /// How the GLB is made (default: vertex colours, no baking).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub glb: Option<GlbParams>,
    #[serde(default)]
    pub wait: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobRef {
    pub job: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AssetRef {
    pub asset: String,
}

/// How `fetch` hands over arrays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// Inline up to [`INLINE_AUTO_MAX`] bytes, shared memory above.
    #[default]
    Auto,
    /// A file in the daemon's shared-memory folder.
    Shm,
    /// The reply's binary section.
    Inline,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FetchParams {
    pub asset: String,
    /// `mesh` or `gaussian`.
    pub what: Format,
    #[serde(default)]
    pub transport: Transport,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseParams {
    pub buffer: String,
}

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Done,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Done | JobState::Failed | JobState::Cancelled
        )
    }
}

/// A job as `status`, `jobs` and the job-making ops report it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobInfo {
    pub job: u64,
    /// `generate`, `variant`, `edit` or `decode`.
    pub kind: String,
    pub state: JobState,
    /// Model of the job.
    #[serde(default)]
    pub model: String,
    /// Stage of a running job (`loading`, `conditioning`, `voxelizing`, `sparse_structure`,
    /// `structured_latent`, `decoding`, `writing`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    /// `step` of `total` done in `stage`.
    #[serde(default)]
    pub step: u32,
    #[serde(default)]
    pub total: u32,
    /// Estimated seconds left in the sampling stages (after the first sampler step).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_s: Option<f64>,
    /// Jobs ahead of this one in the queue (queued jobs only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_position: Option<u32>,
    /// Device of the worker running it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Detail of the last event, or the error of a failed job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The stored asset, once done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub asset: Option<String>,
    /// Done jobs whose asset has a mesh: the path of its `preview.png` thumbnail (four views,
    /// the mesh above the Gaussians), the asset's `files.preview`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview: Option<String>,
    /// Seconds since the job was queued.
    #[serde(default)]
    pub elapsed_s: f64,
    /// Seconds from the job's start on its worker to its first sampler step (weights resident:
    /// no loading in between).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_step_s: Option<f64>,
    /// Set when the job has run: whether it found every model it needed resident (read no
    /// weights).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models_resident: Option<bool>,
}

/// A stored asset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AssetInfo {
    pub asset: String,
    /// `image_to_3d`, `text_to_3d`, `variant` or `edit`.
    pub task: String,
    pub model: String,
    /// Seconds since the Unix epoch.
    pub created: u64,
    /// Representations `fetch` can return.
    pub formats: Vec<Format>,
    /// Files in the asset folder: `trellis` (the bundle), `glb`, `ply` → absolute path.
    pub files: BTreeMap<String, String>,
    /// The generation's parameters (the bundle's metadata).
    #[serde(default)]
    pub meta: serde_json::Value,
}

/// The reply to `hello`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HelloResult {
    pub protocol: u16,
    /// `trellis-rs X.Y.Z`.
    pub daemon: String,
    pub pid: u32,
    pub address: String,
    /// The `op` strings this daemon answers (other than with `unsupported`).
    pub capabilities: Vec<String>,
    /// One worker per device.
    pub devices: Vec<String>,
    /// Memory tier of the daemon's devices.
    pub tier: String,
    pub models: Vec<ModelInfo>,
    pub limits: LimitsInfo,
    /// The daemon's shared-memory folder.
    pub shm_dir: String,
    pub asset_dir: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// What `generate.model` names it by (the `--model` value).
    pub name: String,
    /// `image_to_3d` or `text_to_3d`.
    pub class: String,
    /// Whether some worker holds its weights now.
    pub resident: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LimitsInfo {
    pub max_json: u64,
    pub max_binary: u64,
    pub max_images: u64,
    pub max_image_side: u64,
    pub max_text_bytes: u64,
    pub max_steps: u32,
    pub max_mesh_vertices: u64,
    pub max_mesh_faces: u64,
    pub inline_auto_max: u64,
}

/// A shared-memory buffer made by `fetch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShmBuffer {
    /// What `release` names it by.
    pub buffer: String,
    /// Absolute path of the file (map it read-only).
    pub path: String,
    /// File size in bytes.
    pub size: u64,
}

/// The reply to `fetch` (its arrays are in the reply's `arrays`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FetchResult {
    pub asset: String,
    pub what: Format,
    /// `shm` or `inline` (never `auto`).
    pub transport: Transport,
    /// The buffer file (`shm` only): array offsets are into this file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buffer: Option<ShmBuffer>,
}

/// Machine-readable error classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The JSON was malformed, or a field missing, of the wrong type or out of range.
    BadRequest,
    /// The `op` is not one of this protocol's.
    UnknownOp,
    /// The peer speaks another protocol version.
    VersionMismatch,
    /// A frame, image, mesh or text exceeds a limit.
    TooLarge,
    /// No such job, asset or buffer.
    NotFound,
    /// An operation or combination this daemon does not do (yet).
    Unsupported,
    /// The model (pipeline, conditioner) could not be found or downloaded.
    ModelUnavailable,
    /// The device ran out of memory.
    OutOfMemory,
    /// The job was cancelled.
    Cancelled,
    /// The job failed; the message says why.
    JobFailed,
    /// Another connection's peer is not this user (never sent to a peer of this user).
    Forbidden,
    /// The daemon is stopping.
    ShuttingDown,
    /// Anything else; the message says what.
    Internal,
}

/// An error reply's payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorInfo {
    pub code: ErrorCode,
    pub message: String,
    /// The job this error ends (a `wait` that ended in failure or cancel).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<u64>,
}

/// Progress of a job a `wait: true` request follows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProgressInfo {
    pub job: u64,
    pub stage: String,
    pub step: u32,
    pub total: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// What a reply carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome {
    /// Work in progress (zero or more, before the final reply).
    Progress(ProgressInfo),
    /// Success; `result` is op-specific JSON, `arrays` describe the binary section (or the
    /// shared-memory file of a `fetch`).
    Ok {
        #[serde(default)]
        result: serde_json::Value,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        arrays: Vec<ArrayDesc>,
    },
    Error(ErrorInfo),
}

/// A reply frame's JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// The id of the request this answers (0 when the request's id could not be read).
    pub id: u64,
    #[serde(flatten)]
    pub outcome: Outcome,
}

impl Reply {
    pub fn ok(id: u64, result: serde_json::Value) -> Self {
        Self {
            id,
            outcome: Outcome::Ok {
                result,
                arrays: Vec::new(),
            },
        }
    }

    pub fn error(id: u64, code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            id,
            outcome: Outcome::Error(ErrorInfo {
                code,
                message: message.into(),
                job: None,
            }),
        }
    }

    /// Whether this is the last reply to its request (`ok` or `error`).
    pub fn is_final(&self) -> bool {
        !matches!(self.outcome, Outcome::Progress(_))
    }

    /// Checks that this reply answers `request`.
    pub fn check_answers(&self, request: &Request) -> Result<()> {
        if self.id == request.id {
            Ok(())
        } else {
            Err(ProtocolError::IdMismatch {
                expected: request.id,
                got: self.id,
            })
        }
    }
}

/// Reads a request's JSON in two steps so that a bad request still gets an answer to its id:
/// `Err((id, code, message))` with the id when one could be read (else 0).
pub fn parse_request(json: &[u8]) -> std::result::Result<Request, (u64, ErrorCode, String)> {
    let v: serde_json::Value = serde_json::from_slice(json)
        .map_err(|e| (0, ErrorCode::BadRequest, format!("malformed JSON: {e}")))?;
    let obj = v.as_object().ok_or((
        0,
        ErrorCode::BadRequest,
        "a request is a JSON object".into(),
    ))?;
    let id = match obj.get("id") {
        Some(i) => i.as_u64().ok_or((
            0,
            ErrorCode::BadRequest,
            "\"id\" must be a whole number from 0 to 2^64-1".into(),
        ))?,
        None => return Err((0, ErrorCode::BadRequest, "the request has no \"id\"".into())),
    };
    let op = match obj.get("op") {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(_) => return Err((id, ErrorCode::BadRequest, "\"op\" must be a string".into())),
        None => {
            return Err((
                id,
                ErrorCode::BadRequest,
                "the request has no \"op\"".into(),
            ))
        }
    };
    if !OPS.contains(&op.as_str()) {
        return Err((
            id,
            ErrorCode::UnknownOp,
            format!("unknown op {op:?}; the ops are {}", OPS.join(", ")),
        ));
    }
    serde_json::from_value(v).map_err(|e| (id, ErrorCode::BadRequest, format!("{op}: {e}")))
}
