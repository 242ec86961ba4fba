//! What the hub cache holds: for `trellisd doctor`. Like `huggingface-cli scan-cache`, restricted to
//! the repositories TRELLIS needs, and aware of what "complete" means for each (every model file a
//! pipeline names, or a conditioner's config, weights and tokenizer).

use std::path::Path;

use super::remote::{repo_cache_dir, Remote};
use super::HubOptions;

/// How much of a repository the cache holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheState {
    /// No trace of it.
    Absent,
    /// Some files; `missing` says what a run would still download (or why it cannot tell).
    Partial { missing: Vec<String> },
    /// Everything a run needs; `bytes` on disk.
    Complete { bytes: u64 },
}

/// Which kind of repository `repo` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepoKind {
    Pipeline,
    Conditioner,
}

/// The cache state of hub repository `repo`, looking only at the cache (never the network).
pub fn cache_state(repo: &str, kind: RepoKind, opts: &HubOptions) -> CacheState {
    if !repo_cache_dir(opts, repo).is_dir() {
        return CacheState::Absent;
    }
    let offline = HubOptions {
        offline: true,
        ..opts.clone()
    };
    let mut remote = Remote::new(&offline);
    let files = match kind {
        RepoKind::Pipeline => super::resolve_pipeline(repo, &mut remote).map(|(r, missing)| {
            let mut files = vec![r.root.join("pipeline.json")];
            for m in r.models.values() {
                files.push(m.config.clone());
                files.push(m.weights.clone());
            }
            (files, missing)
        }),
        RepoKind::Conditioner => {
            super::resolve_conditioner_in(repo, &mut remote).map(|(dir, missing)| {
                let files = ["config.json", "model.safetensors", "tokenizer.json"]
                    .iter()
                    .map(|f| dir.join(f))
                    .filter(|p| p.is_file())
                    .collect();
                (files, missing)
            })
        }
    };
    match files {
        Ok((files, missing)) if missing.is_empty() => CacheState::Complete {
            bytes: files.iter().map(|p| file_size(p)).sum(),
        },
        Ok((_, missing)) => CacheState::Partial { missing },
        Err(e) => CacheState::Partial {
            missing: vec![format!("{e:#}")],
        },
    }
}

/// Size of a file, following the cache's symlinks into `blobs/`.
fn file_size(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}
