//! Files of hub repositories: the local cache first, then a download through `hf-hub`.
//!
//! Mirrors `huggingface_hub.hf_hub_download` as TRELLIS' `from_pretrained` uses it, with one
//! difference: a file already in the cache is used without asking the hub whether `main` moved
//! (delete the repository's cache folder to refresh). The cache layout is the standard one
//! (`models--owner--name/blobs/<etag>`, `snapshots/<commit>/<file>`, `refs/main`), so files are
//! shared with Python tools. Interrupted downloads leave `blobs/<etag>.part`, which the next run
//! resumes.
//!
//! `hf-hub` sets no timeouts, so before the first download of a run the endpoint is probed with a
//! short connect/read timeout: without network the command fails within seconds and says how to
//! use a local copy instead.

use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use hf_hub::api::sync::{Api, ApiBuilder, ApiError};
use hf_hub::{Cache, Repo};

use super::HubOptions;

/// What a user without network should do; part of every connectivity error.
pub const OFFLINE_HINT: &str = "to run without network, pass a local copy with `--model DIR` \
(a folder holding pipeline.json and ckpts/), or set HF_HUB_OFFLINE=1 to use only files already in the cache";

/// What a user in offline mode (`HF_HUB_OFFLINE`) should do about files missing from the cache.
pub const CACHE_ONLY_HINT: &str = "pass a local copy with `--model DIR` (a folder holding \
pipeline.json and ckpts/; conditioners can be local folders named in its image_cond_model / \
text_cond_model), or unset HF_HUB_OFFLINE to download what is missing";

/// Repositories that moved: the old name (still used inside official `pipeline.json` files) → the
/// current one. Lookups try both; downloads use the current name, so a file is fetched once.
const MOVED: [(&str, &str); 1] = [(
    "JeffreyXiang/TRELLIS-image-large",
    "microsoft/TRELLIS-image-large",
)];

/// The current name of a repository.
pub fn canonical_repo(repo: &str) -> &str {
    MOVED
        .iter()
        .find(|(old, _)| old.eq_ignore_ascii_case(repo))
        .map(|(_, new)| *new)
        .unwrap_or(repo)
}

/// Whether `s` is a plausible `owner/name` repository id (also keeps cache paths and URLs sane).
pub fn is_repo_id(s: &str) -> bool {
    let mut parts = s.split('/');
    let (Some(owner), Some(name), None) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    [owner, name].iter().all(|p| {
        !p.is_empty()
            && p.len() <= 96
            && !p.starts_with(['.', '-'])
            && !p.contains("..")
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    })
}

/// Whether `file` is a safe relative path inside a repository.
pub fn is_repo_file(file: &str) -> bool {
    !file.is_empty()
        && !file.starts_with('/')
        && !file.contains('\\')
        && file
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
}

/// The cache folder of a model repository (`models--owner--name`).
pub fn repo_cache_dir(opts: &HubOptions, repo: &str) -> PathBuf {
    opts.cache_dir.join(format!(
        "models--{}",
        canonical_repo(repo).replace('/', "--")
    ))
}

/// The outcome of asking for one file.
#[derive(Debug)]
pub enum Fetched {
    /// In the cache (possibly just downloaded).
    Present(PathBuf),
    /// Not in the cache and, online, the hub says it does not exist (offline: not looked up).
    Absent,
}

/// Cache lookups and downloads for one resolution (one probe at most).
pub struct Remote<'a> {
    opts: &'a HubOptions,
    api: Option<Api>,
    /// Files downloaded so far (for messages and tests).
    pub downloaded: Vec<String>,
}

impl<'a> Remote<'a> {
    pub fn new(opts: &'a HubOptions) -> Self {
        Self {
            opts,
            api: None,
            downloaded: Vec::new(),
        }
    }

    pub fn offline(&self) -> bool {
        self.opts.offline
    }

    pub fn options(&self) -> &HubOptions {
        self.opts
    }

    /// `file` of `repo` in the cache, under the repository's current or old name.
    pub fn cached(&self, repo: &str, file: &str) -> Option<PathBuf> {
        if !is_repo_id(repo) || !is_repo_file(file) {
            return None;
        }
        let cache = Cache::new(self.opts.cache_dir.clone());
        let canonical = canonical_repo(repo);
        let mut names = vec![canonical.to_string()];
        names.extend(
            MOVED
                .iter()
                .filter(|(_, new)| *new == canonical)
                .map(|(old, _)| old.to_string()),
        );
        names
            .into_iter()
            .find_map(|name| cache.repo(Repo::model(name)).get(file))
            .filter(|p| p.is_file())
    }

    /// `file` of `repo`: from the cache, else downloaded (unless offline).
    pub fn get(&mut self, repo: &str, file: &str) -> Result<Fetched> {
        if !is_repo_id(repo) {
            bail!("{repo:?} is not a hub repository id (expected owner/name)");
        }
        if !is_repo_file(file) {
            bail!("{file:?} is not a file path inside a repository");
        }
        if let Some(p) = self.cached(repo, file) {
            return Ok(Fetched::Present(p));
        }
        if self.opts.offline {
            return Ok(Fetched::Absent);
        }
        let api = self.api()?;
        let canonical = canonical_repo(repo).to_string();
        // hf-hub sets no read timeout: the download runs on its own thread while this one
        // watches the partial blob grow, and gives up when nothing arrives for `stall_timeout`
        // (the partial file stays; hf-hub resumes it next time).
        let (tx, rx) = std::sync::mpsc::channel();
        let (name, f, progress) = (canonical.clone(), file.to_string(), self.opts.progress);
        std::thread::spawn(move || {
            let handle = api.model(name);
            let r = if progress {
                handle.download_with_progress(&f, Bar::new())
            } else {
                handle.download_with_progress(&f, ())
            };
            let _ = tx.send(r);
        });
        let blobs = repo_cache_dir(self.opts, &canonical).join("blobs");
        let mut last = folder_bytes(&blobs);
        let mut since = std::time::Instant::now();
        let result = loop {
            match rx.recv_timeout(Duration::from_millis(250)) {
                Ok(r) => break r,
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    bail!("the download of {canonical}/{file} ended without an answer")
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    let now = folder_bytes(&blobs);
                    if now != last {
                        last = now;
                        since = std::time::Instant::now();
                    } else if since.elapsed() >= self.opts.stall_timeout {
                        bail!(
                            "downloading {}/{canonical}/resolve/main/{file} stalled: no data for {:.0} s; \
                             run again to resume it, or pass a local copy with --model DIR",
                            self.opts.endpoint,
                            self.opts.stall_timeout.as_secs_f64()
                        );
                    }
                }
            }
        };
        match result {
            Ok(p) => {
                self.downloaded.push(format!("{canonical}/{file}"));
                Ok(Fetched::Present(p))
            }
            Err(e) => classify(e, &self.opts.endpoint, &canonical, file),
        }
    }

    /// The `hf-hub` client, built after the endpoint answered the probe.
    fn api(&mut self) -> Result<Api> {
        if let Some(api) = &self.api {
            return Ok(api.clone());
        }
        probe(&self.opts.endpoint, self.opts.probe_timeout)?;
        std::fs::create_dir_all(&self.opts.cache_dir).with_context(|| {
            format!(
                "cannot create the hub cache folder {} (set HF_HUB_CACHE or HF_HOME elsewhere)",
                self.opts.cache_dir.display()
            )
        })?;
        let api = ApiBuilder::from_cache(Cache::new(self.opts.cache_dir.clone()))
            .with_endpoint(self.opts.endpoint.clone())
            .with_token(self.opts.token.clone())
            .with_progress(false)
            .with_user_agent("trellis-rs", env!("CARGO_PKG_VERSION"))
            .build()
            .map_err(|e| anyhow!("cannot set up the hub client: {e}"))?;
        self.api = Some(api.clone());
        Ok(api)
    }
}

/// Bytes in the files of `dir` (partial downloads grow there).
fn folder_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|r| {
            r.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Turns an `hf-hub` error into "absent" (404, unknown repository) or a clear error.
fn classify(e: ApiError, endpoint: &str, repo: &str, file: &str) -> Result<Fetched> {
    let what = format!("{endpoint}/{repo}/resolve/main/{file}");
    match e {
        ApiError::RequestError(boxed) => match *boxed {
            ureq::Error::Status(404, _) => Ok(Fetched::Absent),
            ureq::Error::Status(401, r)
                if r.header("x-error-code") == Some("RepositoryNotFound") =>
            {
                Ok(Fetched::Absent)
            }
            ureq::Error::Status(code @ (401 | 403), _) => bail!(
                "{what}: access denied (HTTP {code}); a gated or private repository needs a token in HF_TOKEN"
            ),
            ureq::Error::Status(code, _) => bail!("{what}: the hub answered HTTP {code}"),
            ureq::Error::Transport(t) => bail!("downloading {what} failed: {t}; {OFFLINE_HINT}"),
        },
        other => Err(anyhow!("downloading {what} failed: {other}")),
    }
}

/// Checks within `timeout` (connect, then answer) that `endpoint` answers HTTP at all.
pub fn probe(endpoint: &str, timeout: Duration) -> Result<()> {
    let url = format!("{endpoint}/api/whoami-v2");
    let (tx, rx) = mpsc::channel();
    let agent = ureq::AgentBuilder::new()
        .try_proxy_from_env(true)
        .timeout_connect(timeout)
        .timeout_read(timeout)
        .redirects(0)
        .build();
    let probe_url = url.clone();
    std::thread::spawn(move || {
        let r = match agent.head(&probe_url).call() {
            Ok(_) | Err(ureq::Error::Status(..)) => Ok(()),
            Err(ureq::Error::Transport(t)) => Err(t.to_string()),
        };
        // The receiver may have given up already; nothing to do then.
        let _ = tx.send(r);
    });
    // DNS resolution is not covered by ureq's timeouts: bound the whole probe here.
    match rx.recv_timeout(timeout * 2 + Duration::from_secs(1)) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(reason)) => {
            bail!("cannot reach the model hub at {endpoint} ({reason}); {OFFLINE_HINT}")
        }
        Err(_) => bail!(
            "the model hub at {endpoint} did not answer within {:.0} s; {OFFLINE_HINT}",
            (timeout * 2).as_secs_f64()
        ),
    }
}

/// A download progress bar on stderr (indicatif).
struct Bar(indicatif::ProgressBar);

impl Bar {
    fn new() -> Self {
        let style = indicatif::ProgressStyle::with_template(
            "{msg:40!} [{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
        Bar(indicatif::ProgressBar::new(0).with_style(style))
    }
}

impl hf_hub::api::Progress for Bar {
    fn init(&mut self, size: usize, filename: &str) {
        self.0.set_length(size as u64);
        self.0.set_position(0);
        self.0.set_message(filename.to_string());
    }
    fn update(&mut self, size: usize) {
        self.0.inc(size as u64);
    }
    fn finish(&mut self) {
        self.0.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_and_files() {
        assert!(is_repo_id("microsoft/TRELLIS-image-large"));
        assert!(is_repo_id("openai/clip-vit-large-patch14"));
        for bad in ["a", "a/b/c", "/b", "a/", "../x", "a/..", "a/b c", ".a/b"] {
            assert!(!is_repo_id(bad), "{bad}");
        }
        assert!(is_repo_file("ckpts/x.json"));
        for bad in ["", "/etc/passwd", "a/../b", "./a", "a//b", "a\\b"] {
            assert!(!is_repo_file(bad), "{bad}");
        }
    }

    #[test]
    fn moved_repositories_map_to_their_current_name() {
        assert_eq!(
            canonical_repo("JeffreyXiang/TRELLIS-image-large"),
            "microsoft/TRELLIS-image-large"
        );
        assert_eq!(canonical_repo("a/b"), "a/b");
        let o = HubOptions::new("http://x", "/c");
        assert_eq!(
            repo_cache_dir(&o, "JeffreyXiang/TRELLIS-image-large"),
            PathBuf::from("/c/models--microsoft--TRELLIS-image-large")
        );
    }

    #[test]
    fn probe_of_a_closed_port_fails_fast_with_the_hint() {
        // Bind then drop: the port is (almost certainly) closed afterwards.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let t = std::time::Instant::now();
        let e = probe(&format!("http://127.0.0.1:{port}"), Duration::from_secs(2)).unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(6));
        assert!(e.to_string().contains("--model DIR"), "{e}");
    }
}
