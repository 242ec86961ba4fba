//! Model repositories: local folders, the Hugging Face cache, downloads.
//!
//! Mirrors `Pipeline.from_pretrained` (trellis/pipelines/base.py) and `models.from_pretrained`
//! (trellis/models/__init__.py). A TRELLIS repository is `pipeline.json` plus, for every model it
//! names, `<entry>.json` (the `{"name", "args"}` config) and `<entry>.safetensors`. An entry
//! resolves first inside the repository (`ckpts/<stem>`, or `../Other/ckpts/<stem>` for a local
//! folder), otherwise as `<owner>/<repo>/<path>` on the hub (the official text repositories point
//! at the decoders of the image repository this way).
//!
//! Every problem is reported at once: all missing files of a pipeline in one error.

pub mod config;
pub mod options;
pub mod remote;
pub mod status;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

pub use config::{PipelineClass, PipelineConfig, SlatNormalization};
pub use options::HubOptions;
use remote::{is_repo_file, is_repo_id, Fetched, Remote};
pub use remote::{CACHE_ONLY_HINT, OFFLINE_HINT};

/// The official pipeline repositories.
pub const OFFICIAL_PIPELINES: [&str; 4] = [
    "microsoft/TRELLIS-image-large",
    "microsoft/TRELLIS-text-base",
    "microsoft/TRELLIS-text-large",
    "microsoft/TRELLIS-text-xlarge",
];

/// The conditioner repositories the official pipelines use.
pub const OFFICIAL_CONDITIONERS: [&str; 2] = [
    "facebook/dinov2-with-registers-large",
    "openai/clip-vit-large-patch14",
];

/// The two files of one network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelFiles {
    /// `<entry>.json`: `{"name": <class>, "args": {...}}`.
    pub config: PathBuf,
    /// `<entry>.safetensors`: the state dict.
    pub weights: PathBuf,
}

/// Where a pipeline came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PipelineSource {
    /// A folder given on the command line.
    Local,
    /// A hub repository id (files live in the cache's snapshot folder).
    Hub(String),
}

/// A pipeline repository with every model file present on disk.
#[derive(Debug, Clone)]
pub struct PipelineRepo {
    /// The folder holding `pipeline.json` (for a hub repository: its cache snapshot).
    pub root: PathBuf,
    pub source: PipelineSource,
    pub config: PipelineConfig,
    /// Model name (`slat_flow_model`, ...) → its files.
    pub models: BTreeMap<String, ModelFiles>,
}

impl PipelineRepo {
    /// The files of model `name`, or an error naming the models this pipeline has.
    pub fn model(&self, name: &str) -> Result<&ModelFiles> {
        self.models.get(name).ok_or_else(|| {
            anyhow!(
                "pipeline {} has no model {name:?} (it has: {})",
                self.root.display(),
                self.models.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        })
    }
}

/// Opens a pipeline: `spec` is a local folder, or a hub id such as `microsoft/TRELLIS-image-large`
/// (downloaded into the cache unless `opts.offline`). Every model file must exist.
pub fn open_pipeline(spec: &str, opts: &HubOptions) -> Result<PipelineRepo> {
    let mut remote = Remote::new(opts);
    let (repo, missing) = resolve_pipeline(spec, &mut remote)?;
    if !missing.is_empty() {
        bail!(missing_message(&format!("pipeline {spec}"), &missing, opts));
    }
    Ok(repo)
}

/// The files of the pipeline's `SparseStructureEncoder` (occupancy → structure latent), which
/// no official `pipeline.json` names although its repository ships it: `sparse_structure_encoder`
/// when pipeline.json names one; else the decoder's entry with `ss_dec_` replaced by `ss_enc_`
/// (`ckpts/ss_enc_conv3d_16l8_fp16` of TRELLIS-image-large, found through the same rules as every
/// entry, so a text pipeline finds the image repository's encoder); else the only `ss_enc_*`
/// checkpoint beside the decoder's files.
pub fn structure_encoder(repo: &PipelineRepo, opts: &HubOptions) -> Result<ModelFiles> {
    if let Some(files) = repo.models.get("sparse_structure_encoder") {
        return Ok(files.clone());
    }
    let entry = repo
        .config
        .models
        .get("sparse_structure_decoder")
        .ok_or_else(|| {
            anyhow!(
                "pipeline {} names no sparse_structure_decoder",
                repo.root.display()
            )
        })?;
    let (dir, stem) = match entry.rsplit_once('/') {
        Some((d, s)) => (format!("{d}/"), s),
        None => (String::new(), entry.as_str()),
    };
    let mut tried = Vec::new();
    if let Some(rest) = stem.strip_prefix("ss_dec_") {
        let candidate = format!("{dir}ss_enc_{rest}");
        let hub_id = match &repo.source {
            PipelineSource::Hub(id) => Some(id.as_str()),
            PipelineSource::Local => None,
        };
        let mut remote = Remote::new(opts);
        match locate_model(&repo.root, hub_id, &candidate, &mut remote)? {
            Ok(files) => return Ok(files),
            Err(missing) => tried.extend(missing),
        }
    }
    let dec = repo.model("sparse_structure_decoder")?;
    if let Some(folder) = dec.config.parent() {
        let mut found: Vec<ModelFiles> = std::fs::read_dir(folder)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().to_string();
                let stem = name.strip_suffix(".json")?;
                stem.starts_with("ss_enc_").then(|| ModelFiles {
                    config: e.path(),
                    weights: folder.join(format!("{stem}.safetensors")),
                })
            })
            .filter(|f| f.weights.is_file())
            .collect();
        found.sort_by(|a, b| a.config.cmp(&b.config));
        match found.len() {
            1 => return Ok(found.remove(0)),
            0 => tried.push(format!("{}/ss_enc_*.json", folder.display())),
            _ => bail!(
                "{} holds several structure encoders ({}); name one as sparse_structure_encoder in pipeline.json",
                folder.display(),
                found
                    .iter()
                    .map(|f| f.config.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
    bail!(
        "pipeline {}: no SparseStructureEncoder found (needed to edit a mesh, or an asset without \
         its structure latent); looked for:\n  - {}",
        repo.root.display(),
        tried.join("\n  - ")
    )
}

/// The hub repository of a conditioner name used in `pipeline.json` (`image_cond_model`,
/// `text_cond_model`): TRELLIS loads DINOv2 through torch.hub by its hub name; we use the same
/// weights from their Hugging Face Transformers repository.
pub fn conditioner_repo(name: &str) -> Option<&'static str> {
    Some(match name {
        "dinov2_vits14_reg" => "facebook/dinov2-with-registers-small",
        "dinov2_vitb14_reg" => "facebook/dinov2-with-registers-base",
        "dinov2_vitl14_reg" => "facebook/dinov2-with-registers-large",
        "dinov2_vitg14_reg" => "facebook/dinov2-with-registers-giant",
        "openai/clip-vit-large-patch14" => "openai/clip-vit-large-patch14",
        _ => return None,
    })
}

/// A conditioner (image or text encoder) in Hugging Face Transformers form: a folder with
/// `config.json`, `model.safetensors` and, for CLIP, `tokenizer.json`. `name_or_path` is a local
/// folder, a name from `pipeline.json` (`dinov2_vitl14_reg`) or a hub id. (For a local pipeline,
/// [`open_pipeline`] already turned a conditioner folder relative to the repository into a full
/// path in [`PipelineConfig`].)
pub fn resolve_conditioner(name_or_path: &str, opts: &HubOptions) -> Result<PathBuf> {
    let mut remote = Remote::new(opts);
    let (dir, missing) = resolve_conditioner_in(name_or_path, &mut remote)?;
    if !missing.is_empty() {
        bail!(missing_message(
            &format!("conditioner {name_or_path}"),
            &missing,
            opts
        ));
    }
    Ok(dir)
}

/// Appends `.json` / `.safetensors` to an entry path (stems may contain dots).
fn with_suffix(base: &Path, suffix: &str) -> PathBuf {
    let mut s: OsString = base.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn missing_message(what: &str, missing: &[String], opts: &HubOptions) -> String {
    let mut msg = format!("{what}: {} file(s) missing:", missing.len());
    for m in missing {
        msg.push_str("\n  - ");
        msg.push_str(m);
    }
    if opts.offline {
        msg.push_str(&format!(
            "\nHF_HUB_OFFLINE is set, so only the cache {} was searched; {CACHE_ONLY_HINT}",
            opts.cache_dir.display()
        ));
    }
    msg
}

/// Whether `spec` names a local folder or a hub repository.
enum Spec {
    Local(PathBuf),
    Hub(String),
}

fn classify_spec(spec: &str, what: &str) -> Result<Spec> {
    let p = Path::new(spec);
    if p.is_dir() {
        return Ok(Spec::Local(p.to_path_buf()));
    }
    if p.exists() {
        bail!("{spec} is a file; expected a {what} folder or a hub id (owner/name)");
    }
    if is_repo_id(spec) {
        return Ok(Spec::Hub(spec.to_string()));
    }
    bail!("{spec}: no such folder, and not a hub repository id (owner/name)")
}

/// Resolves a pipeline, collecting every missing model file instead of stopping at the first.
pub(crate) fn resolve_pipeline(
    spec: &str,
    remote: &mut Remote,
) -> Result<(PipelineRepo, Vec<String>)> {
    let (root, source, pipeline_json) = match classify_spec(spec, "pipeline")? {
        Spec::Local(dir) => {
            let pj = dir.join("pipeline.json");
            if !pj.is_file() {
                bail!(
                    "{} has no pipeline.json: expected a TRELLIS repository folder (pipeline.json + ckpts/)",
                    dir.display()
                );
            }
            (dir, PipelineSource::Local, pj)
        }
        Spec::Hub(id) => match remote.get(&id, "pipeline.json")? {
            Fetched::Present(pj) => {
                let root = pj
                    .parent()
                    .map(Path::to_path_buf)
                    .ok_or_else(|| anyhow!("bad cache path {}", pj.display()))?;
                (root, PipelineSource::Hub(id), pj)
            }
            Fetched::Absent if remote.offline() => bail!(
                "{id}/pipeline.json is not in the hub cache {} and HF_HUB_OFFLINE is set; {CACHE_ONLY_HINT}",
                remote.options().cache_dir.display()
            ),
            Fetched::Absent => bail!(
                "{id}: the hub has no such repository or it has no pipeline.json (check the id; gated repositories need HF_TOKEN)"
            ),
        },
    };
    let mut config = PipelineConfig::load(&pipeline_json)?;
    if source == PipelineSource::Local {
        // A conditioner given as a folder relative to the repository (e.g.
        // `../conditioners/dinov2_reg_tiny`) becomes a path callers can use from anywhere.
        for cond in [&mut config.image_cond_model, &mut config.text_cond_model]
            .into_iter()
            .flatten()
        {
            let candidate = root.join(cond.as_str());
            if Path::new(cond.as_str()).is_relative() && candidate.is_dir() {
                *cond = candidate.display().to_string();
            }
        }
    }
    let hub_id = match &source {
        PipelineSource::Hub(id) => Some(id.clone()),
        PipelineSource::Local => None,
    };
    let mut models = BTreeMap::new();
    let mut missing = Vec::new();
    for (name, entry) in &config.models {
        let located = locate_model(&root, hub_id.as_deref(), entry, remote)
            .with_context(|| format!("model {name} ({entry})"))?;
        match located {
            Ok(files) => {
                models.insert(name.clone(), files);
            }
            Err(m) => missing.extend(m),
        }
    }
    Ok((
        PipelineRepo {
            root,
            source,
            config,
            models,
        },
        missing,
    ))
}

/// An entry as `<owner>/<repo>/<path>` on the hub, if it has that shape.
fn split_hub_entry(entry: &str) -> Option<(String, String)> {
    let mut parts = entry.splitn(3, '/');
    let (owner, name, rest) = (parts.next()?, parts.next()?, parts.next()?);
    let repo = format!("{owner}/{name}");
    (is_repo_id(&repo) && is_repo_file(rest)).then(|| (repo, rest.to_string()))
}

type Located = std::result::Result<ModelFiles, Vec<String>>;

/// Finds one model: `Ok(Ok(files))`, `Ok(Err(missing files))`, or a hard error (network, ...).
fn locate_model(
    root: &Path,
    hub_id: Option<&str>,
    entry: &str,
    remote: &mut Remote,
) -> Result<Located> {
    let hub_entry = split_hub_entry(entry);
    let Some(hub_id) = hub_id else {
        // A local folder: relative to it, else a hub entry.
        let base = root.join(entry);
        let files = ModelFiles {
            config: with_suffix(&base, ".json"),
            weights: with_suffix(&base, ".safetensors"),
        };
        if files.config.is_file() && files.weights.is_file() {
            return Ok(Ok(files));
        }
        if let Some((repo, path)) = hub_entry {
            return hub_pair(&repo, &path, remote);
        }
        let missing = [&files.config, &files.weights]
            .into_iter()
            .filter(|p| !p.is_file())
            .map(|p| p.display().to_string())
            .collect();
        return Ok(Err(missing));
    };
    // A hub repository: `<hub_id>/<entry>` first, then the entry as `<owner>/<repo>/<path>`.
    let inside = is_repo_file(entry).then(|| (hub_id.to_string(), entry.to_string()));
    for (repo, path) in inside.iter().chain(hub_entry.iter()) {
        if let Some(files) = cached_pair(repo, path, remote) {
            return Ok(Ok(files));
        }
    }
    if remote.offline() {
        let (repo, path) = match (&hub_entry, &inside) {
            (Some(h), _) => h,
            (None, Some(i)) => i,
            (None, None) => {
                bail!("entry {entry:?} is neither a path inside {hub_id} nor owner/repo/path")
            }
        };
        return hub_pair(repo, path, remote);
    }
    if let Some((repo, path)) = &inside {
        if let Fetched::Present(_) = remote.get(repo, &format!("{path}.json"))? {
            return hub_pair(repo, path, remote);
        }
    }
    match &hub_entry {
        Some((repo, path)) => hub_pair(repo, path, remote),
        None => {
            let mut m = vec![format!("{hub_id}/{entry}.json")];
            let st = format!("{entry}.safetensors");
            if let Fetched::Absent = remote.get(hub_id, &st)? {
                m.push(format!("{hub_id}/{st}"));
            }
            Ok(Err(m))
        }
    }
}

fn cached_pair(repo: &str, path: &str, remote: &Remote) -> Option<ModelFiles> {
    Some(ModelFiles {
        config: remote.cached(repo, &format!("{path}.json"))?,
        weights: remote.cached(repo, &format!("{path}.safetensors"))?,
    })
}

/// Both files of `<repo>/<path>` from the cache or the hub.
fn hub_pair(repo: &str, path: &str, remote: &mut Remote) -> Result<Located> {
    let json = format!("{path}.json");
    let st = format!("{path}.safetensors");
    let a = remote.get(repo, &json)?;
    let b = remote.get(repo, &st)?;
    match (a, b) {
        (Fetched::Present(config), Fetched::Present(weights)) => {
            Ok(Ok(ModelFiles { config, weights }))
        }
        (a, b) => {
            let mut m = Vec::new();
            if matches!(a, Fetched::Absent) {
                m.push(format!("{repo}/{json}"));
            }
            if matches!(b, Fetched::Absent) {
                m.push(format!("{repo}/{st}"));
            }
            Ok(Err(m))
        }
    }
}

/// Whether a Transformers `config.json` describes a CLIP model (which also needs its tokenizer).
fn is_clip(config_json: &Path, name: &str) -> Result<bool> {
    let text = std::fs::read_to_string(config_json)
        .with_context(|| format!("cannot read {}", config_json.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| anyhow!("{}: not valid JSON: {e}", config_json.display()))?;
    let model_type = v
        .get("model_type")
        .and_then(|m| m.as_str())
        .unwrap_or_default();
    Ok(model_type.contains("clip") || name.to_ascii_lowercase().contains("clip"))
}

pub(crate) fn resolve_conditioner_in(
    name_or_path: &str,
    remote: &mut Remote,
) -> Result<(PathBuf, Vec<String>)> {
    let spec = if Path::new(name_or_path).is_dir() {
        Spec::Local(PathBuf::from(name_or_path))
    } else if let Some(repo) = conditioner_repo(name_or_path) {
        Spec::Hub(repo.to_string())
    } else {
        classify_spec(name_or_path, "conditioner")?
    };
    match spec {
        Spec::Local(dir) => {
            let config = dir.join("config.json");
            let mut need = vec![config.clone(), dir.join("model.safetensors")];
            if config.is_file() && is_clip(&config, name_or_path)? {
                need.push(dir.join("tokenizer.json"));
            }
            let missing = need
                .iter()
                .filter(|p| !p.is_file())
                .map(|p| p.display().to_string())
                .collect();
            Ok((dir, missing))
        }
        Spec::Hub(repo) => {
            let config = match remote.get(&repo, "config.json")? {
                Fetched::Present(p) => p,
                Fetched::Absent => {
                    let mut m = vec![
                        format!("{repo}/config.json"),
                        format!("{repo}/model.safetensors"),
                    ];
                    if name_or_path.to_ascii_lowercase().contains("clip") {
                        m.push(format!("{repo}/tokenizer.json"));
                    }
                    return Ok((remote.options().cache_dir.clone(), m));
                }
            };
            let dir = config
                .parent()
                .map(Path::to_path_buf)
                .ok_or_else(|| anyhow!("bad cache path {}", config.display()))?;
            let mut files = vec!["model.safetensors"];
            if is_clip(&config, name_or_path)? {
                files.push("tokenizer.json");
            }
            let mut missing = Vec::new();
            for f in files {
                match remote.get(&repo, f)? {
                    Fetched::Present(p) if p.parent() == Some(dir.as_path()) => {}
                    Fetched::Present(p) => bail!(
                        "{repo}: {} and config.json ended up in different cache snapshots; delete {} and retry",
                        p.display(),
                        remote::repo_cache_dir(remote.options(), &repo).display()
                    ),
                    Fetched::Absent => missing.push(format!("{repo}/{f}")),
                }
            }
            Ok((dir, missing))
        }
    }
}
