//! Turning a request's parameters into a [`Job`]: every field checked against the protocol's
//! limits, uploads read out of the binary section, then [`Job::validate`].

use std::path::PathBuf;
use std::sync::Arc;

use trellis_ipc_protocol::{
    self as proto, ArrayDesc, DType as WireDType, EditParams, ErrorCode, Format, GenerateParams,
    ImageInput, MeshInput, RegionParams, Request, VariantParams,
};

use super::assets::AssetStore;
use crate::jobs::{
    BackgroundRemoval, ConditionerOverrides, EditInput, EditJob, GenerateJob, ImageSource, Job,
    MeshSource, Prompt, Sampling, VariantJob,
};
use crate::models::config::SamplerParams;
use crate::pipelines::edit::{Region, Resampling};
use crate::pipelines::image_to_3d::MultiImageMode;
use crate::pipelines::loader::Formats;
use crate::pipelines::voxelize::TriMesh;
use crate::postprocessing::BakeOptions;

/// An error reply's code and message.
pub type Refusal = (ErrorCode, String);

fn bad(msg: impl Into<String>) -> Refusal {
    (ErrorCode::BadRequest, msg.into())
}

fn too_large(msg: impl Into<String>) -> Refusal {
    (ErrorCode::TooLarge, msg.into())
}

/// A model the daemon serves.
#[derive(Debug, Clone)]
pub struct Served {
    pub name: String,
    /// `Some(true)` text, `Some(false)` image, `None` not known yet.
    pub is_text: Option<bool>,
}

/// The served model a request names, else the first of the prompt's kind.
pub fn pick_model(
    served: &[Served],
    asked: Option<&str>,
    is_text: bool,
) -> Result<String, Refusal> {
    if let Some(m) = asked {
        check_name(m, "model")?;
        if let Some(s) = served.iter().find(|s| s.name == m) {
            if s.is_text.is_some_and(|t| t != is_text) {
                let (kind, input) = if is_text {
                    ("an image", "a text prompt")
                } else {
                    ("a text", "images")
                };
                return Err(bad(format!(
                    "model {m} is {kind} model; it cannot take {input}"
                )));
            }
        }
        return served
            .iter()
            .find(|s| s.name == m)
            .map(|s| s.name.clone())
            .ok_or_else(|| {
                (
                    ErrorCode::ModelUnavailable,
                    format!(
                        "model {m:?} is not served by this daemon (it serves {}); start it with --model {m}",
                        served.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", ")
                    ),
                )
            });
    }
    served
        .iter()
        .find(|s| s.is_text == Some(is_text))
        .or_else(|| served.iter().find(|s| s.is_text.is_none()))
        .map(|s| s.name.clone())
        .ok_or_else(|| {
            (
                ErrorCode::ModelUnavailable,
                format!(
                    "this daemon serves no {} model",
                    if is_text { "text" } else { "image" }
                ),
            )
        })
}

fn check_name(s: &str, what: &str) -> Result<(), Refusal> {
    if s.len() > proto::MAX_NAME_BYTES {
        return Err(too_large(format!(
            "{what}: longer than {} bytes",
            proto::MAX_NAME_BYTES
        )));
    }
    if s.is_empty() {
        return Err(bad(format!("{what}: empty")));
    }
    Ok(())
}

fn check_text(t: &str) -> Result<(), Refusal> {
    if t.len() > proto::MAX_TEXT_BYTES {
        return Err(too_large(format!(
            "text: {} bytes, the limit is {}",
            t.len(),
            proto::MAX_TEXT_BYTES
        )));
    }
    if t.trim().is_empty() {
        return Err(bad("text: the prompt is empty"));
    }
    Ok(())
}

fn steps(v: Option<u32>, what: &str) -> Result<Option<usize>, Refusal> {
    match v {
        None => Ok(None),
        Some(0) => Err(bad(format!("{what}: must be at least 1"))),
        Some(n) if n > proto::MAX_STEPS => Err(too_large(format!(
            "{what}: {n} is over the limit of {}",
            proto::MAX_STEPS
        ))),
        Some(n) => Ok(Some(n as usize)),
    }
}

fn cfg(v: Option<f64>, what: &str) -> Result<Option<f64>, Refusal> {
    match v {
        Some(c) if !c.is_finite() || c.abs() > proto::MAX_CFG => Err(bad(format!(
            "{what}: must be finite and at most {} in magnitude",
            proto::MAX_CFG
        ))),
        other => Ok(other),
    }
}

fn formats(list: &[Format]) -> Formats {
    if list.is_empty() {
        return Formats {
            mesh: true,
            gaussian: true,
            radiance_field: false,
        };
    }
    Formats {
        mesh: list.contains(&Format::Mesh),
        gaussian: list.contains(&Format::Gaussian),
        radiance_field: list.contains(&Format::RadianceField),
    }
}

fn sampling(s: proto::Sampling) -> Result<Sampling, Refusal> {
    Ok(Sampling {
        seed: s.seed.unwrap_or(proto::DEFAULT_SEED),
        ss: SamplerParams {
            steps: steps(s.ss_steps, "ss_steps")?,
            cfg_strength: cfg(s.ss_cfg, "ss_cfg")?,
            ..Default::default()
        },
        slat: SamplerParams {
            steps: steps(s.slat_steps, "slat_steps")?,
            cfg_strength: cfg(s.slat_cfg, "slat_cfg")?,
            ..Default::default()
        },
    })
}

/// The bytes of upload `name`.
fn upload<'a>(
    req: &'a Request,
    binary: &'a [u8],
    name: &str,
) -> Result<(&'a ArrayDesc, &'a [u8]), Refusal> {
    let d = req.array(name).map_err(|e| bad(e.to_string()))?;
    let bytes = d.slice(binary).map_err(|e| bad(e.to_string()))?;
    Ok((d, bytes))
}

fn image(req: &Request, binary: &[u8], input: &ImageInput) -> Result<ImageSource, Refusal> {
    match input {
        ImageInput::Path(p) => {
            check_name(p, "image path")?;
            let p = PathBuf::from(p);
            if !p.is_absolute() {
                return Err(bad(format!(
                    "image path {}: give an absolute path (the daemon's folder is not yours)",
                    p.display()
                )));
            }
            Ok(ImageSource::Path(p))
        }
        ImageInput::Array(name) => {
            let (d, bytes) = upload(req, binary, name)?;
            let ok_shape = d.shape.len() == 3 && (d.shape[2] == 3 || d.shape[2] == 4);
            if d.dtype != WireDType::U8 || !ok_shape {
                return Err(bad(format!(
                    "image array {name:?}: expected u8 [H, W, 3|4], got {:?} {:?}",
                    d.dtype, d.shape
                )));
            }
            let (h, w, c) = (d.shape[0], d.shape[1], d.shape[2]);
            if h == 0 || w == 0 {
                return Err(bad(format!("image array {name:?}: empty ({h}x{w})")));
            }
            if h > proto::MAX_IMAGE_SIDE || w > proto::MAX_IMAGE_SIDE {
                return Err(too_large(format!(
                    "image array {name:?}: {w}x{h}, the longest side allowed is {}",
                    proto::MAX_IMAGE_SIDE
                )));
            }
            let rgba: Vec<u8> = if c == 4 {
                bytes.to_vec()
            } else {
                bytes
                    .chunks_exact(3)
                    .flat_map(|p| [p[0], p[1], p[2], 255])
                    .collect()
            };
            let img = image::RgbaImage::from_raw(w as u32, h as u32, rgba)
                .ok_or_else(|| bad(format!("image array {name:?}: size mismatch")))?;
            Ok(ImageSource::Rgba(Arc::new(img)))
        }
        ImageInput::Encoded(name) => {
            let (d, bytes) = upload(req, binary, name)?;
            if d.dtype != WireDType::U8 || d.shape.len() != 1 {
                return Err(bad(format!(
                    "encoded image {name:?}: expected u8 [N], got {:?} {:?}",
                    d.dtype, d.shape
                )));
            }
            if bytes.len() as u64 > proto::MAX_ENCODED_IMAGE_BYTES {
                return Err(too_large(format!(
                    "encoded image {name:?}: {} bytes, the limit is {}",
                    bytes.len(),
                    proto::MAX_ENCODED_IMAGE_BYTES
                )));
            }
            let img = crate::models::conditioners::preprocess::decode_image(bytes)
                .map_err(|e| bad(format!("encoded image {name:?}: {e:#}")))?;
            let side = u64::from(img.width().max(img.height()));
            if side > proto::MAX_IMAGE_SIDE {
                return Err(too_large(format!(
                    "encoded image {name:?}: {}x{}, the longest side allowed is {}",
                    img.width(),
                    img.height(),
                    proto::MAX_IMAGE_SIDE
                )));
            }
            Ok(ImageSource::Rgba(Arc::new(img)))
        }
    }
}

fn mesh(req: &Request, binary: &[u8], m: &MeshInput) -> Result<MeshSource, Refusal> {
    match m {
        MeshInput::Path(p) => {
            check_name(p, "mesh path")?;
            let p = PathBuf::from(p);
            if !p.is_absolute() {
                return Err(bad(format!(
                    "mesh path {}: give an absolute path",
                    p.display()
                )));
            }
            Ok(MeshSource::Path(p))
        }
        MeshInput::Arrays { vertices, faces } => {
            let (vd, vb) = upload(req, binary, vertices)?;
            if vd.dtype != WireDType::F32 || vd.shape.len() != 2 || vd.shape[1] != 3 {
                return Err(bad(format!(
                    "mesh vertices {vertices:?}: expected f32 [V, 3], got {:?} {:?}",
                    vd.dtype, vd.shape
                )));
            }
            let (fd, fb) = upload(req, binary, faces)?;
            let int = matches!(fd.dtype, WireDType::U32 | WireDType::I32);
            if !int || fd.shape.len() != 2 || fd.shape[1] != 3 {
                return Err(bad(format!(
                    "mesh faces {faces:?}: expected u32 or i32 [F, 3], got {:?} {:?}",
                    fd.dtype, fd.shape
                )));
            }
            let (nv, nf) = (vd.shape[0], fd.shape[0]);
            if nv > proto::MAX_MESH_VERTICES || nf > proto::MAX_MESH_FACES {
                return Err(too_large(format!(
                    "mesh of {nv} vertices and {nf} faces; the limits are {} and {}",
                    proto::MAX_MESH_VERTICES,
                    proto::MAX_MESH_FACES
                )));
            }
            if nv == 0 || nf == 0 {
                return Err(bad("the mesh has no vertex or no face"));
            }
            let mut verts = Vec::with_capacity(nv as usize);
            for c in vb.chunks_exact(12) {
                let f = |i: usize| f32::from_le_bytes([c[i], c[i + 1], c[i + 2], c[i + 3]]);
                let v = [f(0), f(4), f(8)];
                if !v.iter().all(|x| x.is_finite()) {
                    return Err(bad("mesh vertices: a coordinate is not finite"));
                }
                verts.push([f64::from(v[0]), f64::from(v[1]), f64::from(v[2])]);
            }
            let mut tris = Vec::with_capacity(nf as usize);
            for c in fb.chunks_exact(12) {
                let mut t = [0u32; 3];
                for (k, slot) in t.iter_mut().enumerate() {
                    let b = [c[4 * k], c[4 * k + 1], c[4 * k + 2], c[4 * k + 3]];
                    let i = if fd.dtype == WireDType::I32 {
                        u32::try_from(i32::from_le_bytes(b))
                            .map_err(|_| bad("mesh faces: a negative index"))?
                    } else {
                        u32::from_le_bytes(b)
                    };
                    if u64::from(i) >= nv {
                        return Err(bad(format!(
                            "mesh faces: index {i} is not below the vertex count {nv}"
                        )));
                    }
                    *slot = i;
                }
                tris.push(t);
            }
            Ok(MeshSource::Mesh(Arc::new(TriMesh {
                vertices: verts,
                faces: tris,
            })))
        }
    }
}

/// The background-removal settings of a request (`serve --background-model`'s network).
fn background(no_removal: bool, save_mask: bool, model: Option<&str>) -> BackgroundRemoval {
    BackgroundRemoval {
        enabled: !no_removal,
        model: model.map(String::from),
        keep_masks: save_mask,
    }
}

/// A `generate` request as a job (validated); returns it with the served model's name.
pub fn generate_job(
    req: &Request,
    binary: &[u8],
    p: &GenerateParams,
    served: &[Served],
    cond: &ConditionerOverrides,
    background_model: Option<&str>,
) -> Result<(Job, String), Refusal> {
    let prompt = match (&p.text, p.images.is_empty()) {
        (Some(_), false) => return Err(bad("give either text or images, not both")),
        (None, true) => return Err(bad("give text or images")),
        (Some(t), true) => {
            check_text(t)?;
            Prompt::Text(t.clone())
        }
        (None, false) => {
            if p.images.len() > proto::MAX_IMAGES {
                return Err(too_large(format!(
                    "{} images; at most {} condition one generation",
                    p.images.len(),
                    proto::MAX_IMAGES
                )));
            }
            Prompt::Images(
                p.images
                    .iter()
                    .map(|i| image(req, binary, i))
                    .collect::<Result<_, _>>()?,
            )
        }
    };
    let model = pick_model(served, p.model.as_deref(), prompt.is_text())?;
    let job = Job::Generate(GenerateJob {
        model: Some(model.clone()),
        multi_image_mode: match p.multi_image_mode {
            proto::MultiImageMode::Stochastic => MultiImageMode::Stochastic,
            proto::MultiImageMode::Multidiffusion => MultiImageMode::Multidiffusion,
        },
        conditioners: only_for(cond, prompt.is_text()),
        prompt,
        sampling: sampling(p.sampling())?,
        formats: formats(&p.formats),
        background: background(p.no_background_removal, p.save_mask, background_model),
    });
    job.validate().map_err(|e| bad(format!("{e:#}")))?;
    Ok((job, model))
}

/// The conditioner override that applies to a prompt of this kind.
fn only_for(cond: &ConditionerOverrides, is_text: bool) -> ConditionerOverrides {
    ConditionerOverrides {
        image: (!is_text).then(|| cond.image.clone()).flatten(),
        text: is_text.then(|| cond.text.clone()).flatten(),
    }
}

/// A `variant` request as a job (validated).
pub fn variant_job(
    req: &Request,
    binary: &[u8],
    p: &VariantParams,
    served: &[Served],
    cond: &ConditionerOverrides,
    background_model: Option<&str>,
) -> Result<(Job, String), Refusal> {
    let prompt = match (&p.text, &p.image) {
        (Some(_), Some(_)) => return Err(bad("give either text or image, not both")),
        (None, None) => return Err(bad("give text or image")),
        (Some(t), None) => {
            check_text(t)?;
            Prompt::Text(t.clone())
        }
        (None, Some(i)) => Prompt::Images(vec![image(req, binary, i)?]),
    };
    if let Some(r) = p.voxel_resolution {
        if r == 0 || r > proto::MAX_VOXEL_RESOLUTION {
            return Err(bad(format!(
                "voxel_resolution: {r} is not between 1 and {}",
                proto::MAX_VOXEL_RESOLUTION
            )));
        }
    }
    let model = pick_model(served, p.model.as_deref(), prompt.is_text())?;
    let job = Job::Variant(VariantJob {
        model: Some(model.clone()),
        mesh: mesh(req, binary, &p.mesh)?,
        conditioners: only_for(cond, prompt.is_text()),
        prompt,
        voxel_resolution: p.voxel_resolution.map(|r| r as usize),
        sampling: sampling(p.sampling())?,
        formats: formats(&p.formats),
        background: background(p.no_background_removal, p.save_mask, background_model),
    });
    job.validate().map_err(|e| bad(format!("{e:#}")))?;
    Ok((job, model))
}

/// Largest side of an uploaded region mask (the official structure grid is 64).
pub const MAX_MASK_SIDE: u64 = 1024;

/// An edit's region: the box, the uploaded mask, or their union.
fn region(req: &Request, binary: &[u8], r: &RegionParams) -> Result<Region, Refusal> {
    let mut parts = Vec::new();
    if let Some(b) = &r.region_box {
        if !b.min.iter().chain(&b.max).all(|x| x.is_finite()) {
            return Err(bad("region.box: every coordinate must be a finite number"));
        }
        let part = Region::Box {
            min: b.min,
            max: b.max,
        };
        part.check_box()
            .map_err(|e| bad(format!("region.box: {e:#}")))?;
        parts.push(part);
    }
    if let Some(name) = &r.mask {
        let (d, bytes) = upload(req, binary, name)?;
        if d.dtype != WireDType::U8 || d.shape.len() != 3 {
            return Err(bad(format!(
                "region mask {name:?}: expected u8 [R, R, R], got {:?} {:?}",
                d.dtype, d.shape
            )));
        }
        if d.shape.iter().any(|&s| s > MAX_MASK_SIDE) {
            return Err(too_large(format!(
                "region mask {name:?}: shape {:?}, the longest side allowed is {MAX_MASK_SIDE}",
                d.shape
            )));
        }
        parts.push(Region::Mask {
            dims: d.shape.iter().map(|&s| s as usize).collect(),
            voxels: bytes.iter().map(|&b| b != 0).collect(),
        });
    }
    match parts.len() {
        0 => Err(bad("region: give a box ({\"box\": {\"min\": [x, y, z], \"max\": [x, y, z]}}) and/or a mask")),
        1 => Ok(parts.remove(0)),
        _ => Ok(Region::Union(parts)),
    }
}

/// An `edit` request as a job (validated): the stored asset, its region and the prompt.
pub fn edit_job(
    req: &Request,
    binary: &[u8],
    p: &EditParams,
    served: &[Served],
    cond: &ConditionerOverrides,
    background_model: Option<&str>,
    store: &AssetStore,
) -> Result<(Job, String), Refusal> {
    check_name(&p.asset, "asset")?;
    let info = store
        .get(&p.asset)
        .map_err(|e| (ErrorCode::NotFound, format!("{e:#}")))?;
    let path = store
        .dir(&p.asset)
        .map_err(|e| (ErrorCode::NotFound, format!("{e:#}")))?
        .join("asset.trellis");
    if !path.is_file() {
        return Err((
            ErrorCode::NotFound,
            format!("asset {} has no latent bundle to edit", p.asset),
        ));
    }
    let prompt = match (&p.text, &p.image) {
        (Some(_), Some(_)) => return Err(bad("give either text or image, not both")),
        (None, None) => return Err(bad("edit: give text or image (what the region becomes)")),
        (Some(t), None) => {
            check_text(t)?;
            Prompt::Text(t.clone())
        }
        (None, Some(i)) => Prompt::Images(vec![image(req, binary, i)?]),
    };
    let region = region(req, binary, &p.region)?;
    let is_text = prompt.is_text();
    // Default: the asset's own model when this daemon serves it for this kind of prompt.
    let own = served
        .iter()
        .find(|s| s.name == info.model && s.is_text == Some(is_text))
        .map(|s| s.name.clone());
    let model = match (&p.model, own) {
        (None, Some(m)) => m,
        (asked, _) => pick_model(served, asked.as_deref(), is_text)?,
    };
    let jumps = p.jumps.unwrap_or(0) as usize;
    let jump_length = match p.jump_length {
        Some(0) => return Err(bad("jump_length: must be at least 1 step")),
        Some(n) => n as usize,
        None => 1,
    };
    let job = Job::Edit(EditJob {
        model: Some(model.clone()),
        source: EditInput::Asset {
            path,
            id: Some(p.asset.clone()),
        },
        region,
        conditioners: only_for(cond, is_text),
        prompt,
        sampling: sampling(p.sampling())?,
        resampling: Resampling { jump_length, jumps },
        formats: formats(&p.formats),
        background: background(p.no_background_removal, p.save_mask, background_model),
    });
    job.validate().map_err(|e| bad(format!("{e:#}")))?;
    Ok((job, model))
}

/// The daemon's GLB when a request gives no `glb`: the decoded mesh with vertex colours, every
/// triangle kept (the same mesh as the `mesh` arrays).
pub fn unbaked() -> BakeOptions {
    BakeOptions {
        bake: false,
        keep_high_poly: true,
        clean: false,
        ..Default::default()
    }
}

/// A request's `glb` options, checked; baking needs the mesh and the Gaussians decoded.
pub fn glb_options(p: Option<&proto::GlbParams>, list: &[Format]) -> Result<BakeOptions, Refusal> {
    let Some(g) = p else {
        return Ok(unbaked());
    };
    if !g.bake {
        if g.texture_size.is_some()
            || g.target_faces.is_some()
            || g.simplify.is_some()
            || g.keep_high_poly
        {
            return Err(bad(
                "glb: texture_size, target_faces, simplify and keep_high_poly apply with bake: true",
            ));
        }
        return Ok(unbaked());
    }
    let f = formats(list);
    if !f.mesh || !f.gaussian {
        return Err(bad(
            "glb.bake: the texture is baked from the Gaussians onto the mesh: formats must include mesh and gaussian",
        ));
    }
    if g.target_faces.is_some() && (g.simplify.is_some() || g.keep_high_poly) {
        return Err(bad(
            "glb: give one of target_faces, simplify and keep_high_poly",
        ));
    }
    if g.simplify.is_some() && g.keep_high_poly {
        return Err(bad(
            "glb: give one of target_faces, simplify and keep_high_poly",
        ));
    }
    let defaults = BakeOptions::default();
    let o = BakeOptions {
        bake: true,
        texture_size: g.texture_size.map_or(defaults.texture_size, |t| t as usize),
        target_faces: match g.target_faces {
            Some(0) => return Err(bad("glb.target_faces: must be at least 1")),
            Some(n) => Some(usize::try_from(n).map_err(|_| bad("glb.target_faces: too large"))?),
            None => None,
        },
        simplify: match g.simplify {
            Some(s) if !(0.0..1.0).contains(&s) => {
                return Err(bad("glb.simplify: must be in [0, 1)"))
            }
            Some(s) => s as f32,
            None => defaults.simplify,
        },
        keep_high_poly: g.keep_high_poly,
        ..defaults
    };
    o.validate().map_err(|e| bad(format!("glb: {e:#}")))?;
    Ok(o)
}

/// `decode`'s formats (non-empty).
pub fn decode_formats(list: &[Format]) -> Result<Formats, Refusal> {
    if list.is_empty() {
        return Err(bad("decode: give formats"));
    }
    Ok(formats(list))
}
