//! The asset store: one folder per finished job under `<data>/assets/<id>/` holding
//! `asset.trellis`, `mesh.glb`, `gaussians.ply`, the `fetch` arrays per format
//! (`<format>.json` + `<format>.bin`), the mattes of background-removed inputs when asked
//! (`mask.png`) and, written last, `asset.json`. Every file is written
//! atomically, so a killed daemon leaves either a whole asset or a folder without `asset.json`
//! (not listed).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{anyhow, bail, ensure, Context, Result};
use trellis_ipc_protocol::{ArrayDesc, AssetInfo, BinaryBuilder, Format};

use crate::export::atomic::write_atomic;
use crate::export::textured::{rasterizer_for, textured_mesh, write_export_glb};
use crate::jobs::outputs::{
    export_mesh_arrays, first_gaussians, first_mesh, gaussian_arrays, mesh_arrays, write_outputs,
    OutputFiles,
};
use crate::jobs::JobOutput;
use crate::pipelines::base::{ProgressEvent, RunControl};
use crate::postprocessing::bake::SplatData;
use crate::postprocessing::{preview, BakeOptions, ExportMesh};

/// Pixels per view of an asset's `preview.png` (a grid of 4 views: mesh above, Gaussians below).
pub const PREVIEW_RESOLUTION: usize = 128;

pub struct AssetStore {
    pub root: PathBuf,
    counter: AtomicU64,
}

/// Ids are lowercase letters, digits and `-`: safe as folder names.
pub fn check_id(id: &str) -> Result<()> {
    ensure!(
        !id.is_empty()
            && id.len() <= 64
            && id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
        "{id:?} is not an asset id (1 to 64 of a-z, 0-9, -)"
    );
    Ok(())
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `preview.png`: the stored mesh (and the Gaussians, when decoded) from four views, the
/// thumbnail clients show in their job lists (`files.preview`, the job's `preview`).
fn write_preview(
    dir: &Path,
    info: &mut AssetInfo,
    raster: &dyn trellis_kernels::raster::Rasterizer,
    mesh: &ExportMesh,
    splats: Option<&SplatData>,
) -> Result<()> {
    let path = dir.join("preview.png");
    let uvtex = match (&mesh.uvs, &mesh.texture) {
        (Some(u), Some(t)) => Some((u.as_slice(), t)),
        _ => None,
    };
    preview::write_preview(
        &path,
        raster,
        PREVIEW_RESOLUTION,
        &mesh.vertices,
        &mesh.faces,
        uvtex,
        mesh.colors.as_deref(),
        splats,
    )?;
    info.files
        .insert("preview".into(), path.display().to_string());
    Ok(())
}

fn write_json(path: &Path, v: &impl serde::Serialize) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(v)?;
    write_atomic(path, |w| Ok(w.write_all(&bytes)?))
}

impl AssetStore {
    pub fn open(root: PathBuf) -> Result<Self> {
        std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        Ok(Self {
            root,
            counter: AtomicU64::new(0),
        })
    }

    pub fn dir(&self, id: &str) -> Result<PathBuf> {
        check_id(id)?;
        Ok(self.root.join(id))
    }

    fn new_id(&self) -> String {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        format!("{ms:x}-{:x}-{n:x}", std::process::id())
    }

    /// Stores a finished generation; returns its record. Post-processing (bake, preview)
    /// rasterises on `device` (the job's).
    pub fn save_generation(
        &self,
        out: &JobOutput,
        kind: &str,
        glb: &BakeOptions,
        device: &candle_core::Device,
    ) -> Result<AssetInfo> {
        let id = self.new_id();
        let dir = self.root.join(&id);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let result = self.fill(&dir, &id, out, kind, glb, device);
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        result
    }

    fn fill(
        &self,
        dir: &Path,
        id: &str,
        out: &JobOutput,
        kind: &str,
        glb: &BakeOptions,
        device: &candle_core::Device,
    ) -> Result<AssetInfo> {
        let bundle = dir.join("asset.trellis");
        let files = OutputFiles {
            asset: Some(bundle),
            ..Default::default()
        };
        let mut quiet = |_: &ProgressEvent| {};
        let mut ctl = RunControl {
            progress: &mut quiet,
            cancel: None,
            keep_trajectory: false,
        };
        write_outputs(&files, out, &mut ctl)?;
        let meta = out.meta().clone();
        let mut info = AssetInfo {
            asset: id.to_string(),
            task: meta
                .get("task")
                .and_then(|t| t.as_str())
                .unwrap_or(kind)
                .to_string(),
            model: meta
                .get("model")
                .and_then(|t| t.as_str())
                .unwrap_or_default()
                .to_string(),
            created: now_secs(),
            formats: Vec::new(),
            files: BTreeMap::from([(
                "trellis".to_string(),
                dir.join("asset.trellis").display().to_string(),
            )]),
            meta,
        };
        self.add_decoded(dir, &mut info, out, glb, device)?;
        // The mattes of background-removed inputs (a request's `save_mask`).
        let masks = out.masks();
        for (i, m) in masks.iter().enumerate() {
            let (key, name) = if masks.len() == 1 {
                ("mask".to_string(), "mask.png".to_string())
            } else {
                (format!("mask_{i}"), format!("mask_{i}.png"))
            };
            let p = dir.join(name);
            crate::models::background::write_mask(&p, m)?;
            info.files.insert(key, p.display().to_string());
        }
        write_json(&dir.join("asset.json"), &info)?;
        Ok(info)
    }

    /// Adds the representations of `out` (files and arrays) to the record.
    fn add_decoded(
        &self,
        dir: &Path,
        info: &mut AssetInfo,
        out: &JobOutput,
        glb: &BakeOptions,
        device: &candle_core::Device,
    ) -> Result<()> {
        let d = out.decoded();
        if let Ok(m) = first_mesh(d) {
            let glb_path = dir.join("mesh.glb");
            let raster = rasterizer_for(Some(device));
            let splats = first_gaussians(d).ok().map(SplatData::from_gaussian);
            if m.success && !m.faces.is_empty() && glb.bake {
                // The baked mesh: the GLB and the arrays are the same (decimated, UV-mapped) mesh.
                let (em, _) = textured_mesh(raster.as_ref(), m, first_gaussians(d).ok(), glb)?;
                write_export_glb(&glb_path, &em)?;
                info.files
                    .insert("glb".into(), glb_path.display().to_string());
                write_arrays(dir, Format::Mesh, &export_mesh_arrays(&em)?)?;
                write_preview(dir, info, raster.as_ref(), &em, splats.as_ref())?;
            } else {
                if m.success && !m.faces.is_empty() {
                    let files = OutputFiles {
                        glb: Some(glb_path.clone()),
                        bake: glb.clone(),
                        ..Default::default()
                    };
                    let mut quiet = |_: &ProgressEvent| {};
                    let mut ctl = RunControl {
                        progress: &mut quiet,
                        cancel: None,
                        keep_trajectory: false,
                    };
                    write_outputs(&files, out, &mut ctl)?;
                    info.files
                        .insert("glb".into(), glb_path.display().to_string());
                    let em = ExportMesh {
                        vertices: m.vertices.clone(),
                        faces: m.faces.clone(),
                        uvs: None,
                        texture: None,
                        colors: crate::jobs::outputs::mesh_colors(m),
                    };
                    write_preview(dir, info, raster.as_ref(), &em, splats.as_ref())?;
                }
                write_arrays(dir, Format::Mesh, &mesh_arrays(m)?)?;
            }
            add_format(info, Format::Mesh);
        }
        if let Ok(g) = first_gaussians(d) {
            let ply = dir.join("gaussians.ply");
            crate::export::ply::save_gaussian_ply(g, &ply)?;
            info.files.insert("ply".into(), ply.display().to_string());
            write_arrays(dir, Format::Gaussian, &gaussian_arrays(g)?)?;
            add_format(info, Format::Gaussian);
        }
        Ok(())
    }

    /// Adds a decode job's representations to asset `id`.
    pub fn add_formats(
        &self,
        id: &str,
        out: &JobOutput,
        glb: &BakeOptions,
        device: &candle_core::Device,
    ) -> Result<AssetInfo> {
        let dir = self.dir(id)?;
        let mut info = self.get(id)?;
        self.add_decoded(&dir, &mut info, out, glb, device)?;
        write_json(&dir.join("asset.json"), &info)?;
        Ok(info)
    }

    pub fn get(&self, id: &str) -> Result<AssetInfo> {
        let path = self.dir(id)?.join("asset.json");
        let bytes = std::fs::read(&path).map_err(|_| anyhow!("no asset {id:?}"))?;
        serde_json::from_slice(&bytes).with_context(|| format!("{}", path.display()))
    }

    /// Every complete asset, oldest first.
    pub fn list(&self) -> Result<Vec<AssetInfo>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.root)
            .with_context(|| format!("{}", self.root.display()))?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().to_string();
            if check_id(&name).is_err() || !e.path().join("asset.json").is_file() {
                continue;
            }
            if let Ok(a) = self.get(&name) {
                out.push(a);
            }
        }
        out.sort_by(|a, b| (a.created, &a.asset).cmp(&(b.created, &b.asset)));
        Ok(out)
    }

    pub fn delete(&self, id: &str) -> Result<()> {
        let dir = self.dir(id)?;
        ensure!(dir.join("asset.json").is_file(), "no asset {id:?}");
        // asset.json first: a half-deleted folder is not listed again.
        std::fs::remove_file(dir.join("asset.json"))?;
        std::fs::remove_dir_all(&dir).with_context(|| format!("deleting {}", dir.display()))?;
        Ok(())
    }

    /// The descriptors and the data file of `format`'s arrays.
    pub fn arrays(&self, id: &str, format: Format) -> Result<(Vec<ArrayDesc>, PathBuf)> {
        let info = self.get(id)?;
        if !info.formats.contains(&format) {
            bail!(
                "asset {id} has no {} (it has {}); decode it first",
                format.name(),
                info.formats
                    .iter()
                    .map(|f| f.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        let dir = self.dir(id)?;
        let desc: Vec<ArrayDesc> =
            serde_json::from_slice(&std::fs::read(dir.join(format!("{}.json", format.name())))?)?;
        Ok((desc, dir.join(format!("{}.bin", format.name()))))
    }
}

fn add_format(info: &mut AssetInfo, f: Format) {
    if !info.formats.contains(&f) {
        info.formats.push(f);
        info.formats.sort();
    }
}

fn write_arrays(dir: &Path, f: Format, b: &BinaryBuilder) -> Result<()> {
    write_atomic(&dir.join(format!("{}.bin", f.name())), |w| {
        Ok(w.write_all(&b.binary)?)
    })?;
    write_json(&dir.join(format!("{}.json", f.name())), &b.arrays)
}
