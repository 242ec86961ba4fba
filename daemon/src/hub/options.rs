//! Where model repositories come from: the Hugging Face endpoint, the local cache, offline mode.
//!
//! Mirrors the environment conventions of `huggingface_hub` (which TRELLIS' `from_pretrained` uses):
//! `HF_HUB_CACHE`, `HF_HOME`, `HF_HUB_OFFLINE`, `HF_ENDPOINT`, `HF_TOKEN`,
//! `HF_HUB_DISABLE_PROGRESS_BARS`.

use std::path::PathBuf;
use std::time::Duration;

/// The public Hugging Face endpoint.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// How [`crate::hub::open_pipeline`] and [`crate::hub::resolve_conditioner`] find files.
#[derive(Debug, Clone, PartialEq)]
pub struct HubOptions {
    /// Use the cache only; never touch the network.
    pub offline: bool,
    /// Base URL of the hub (`https://huggingface.co`, or a mirror).
    pub endpoint: String,
    /// The hub cache (`models--owner--name/{blobs,snapshots,refs}` folders live here).
    pub cache_dir: PathBuf,
    /// Show a progress bar per downloaded file (on stderr).
    pub progress: bool,
    /// Bearer token for gated or private repositories.
    pub token: Option<String>,
    /// How long the reachability check before the first download may take (connect and answer).
    pub probe_timeout: Duration,
    /// A download that receives no data for this long fails (and resumes on the next run):
    /// `$TRELLIS_RS_STALL_TIMEOUT` seconds, default 60.
    pub stall_timeout: Duration,
}

/// How long a download may receive nothing before it fails.
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(60);

impl HubOptions {
    /// Options from the environment, with `huggingface_hub`'s defaults:
    /// cache `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`;
    /// offline when `HF_HUB_OFFLINE` is `1`/`true`/`yes`/`on`; endpoint `$HF_ENDPOINT` or
    /// `https://huggingface.co`; token `$HF_TOKEN`, else the `token` file of `$HF_HOME`.
    pub fn from_env() -> Self {
        Self::from_vars(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    }

    /// [`HubOptions::from_env`] over any variable lookup (testable without touching the process
    /// environment).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        let home = var("HOME")
            .or_else(|| var("USERPROFILE"))
            .map(PathBuf::from);
        let hf_home = var("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            home.clone()
                .unwrap_or_default()
                .join(".cache")
                .join("huggingface")
        });
        let cache_dir = var("HF_HUB_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("hub"));
        let token = var("HF_TOKEN").or_else(|| {
            std::fs::read_to_string(hf_home.join("token"))
                .ok()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
        });
        Self {
            offline: var("HF_HUB_OFFLINE").is_some_and(|v| truthy(&v)),
            endpoint: var("HF_ENDPOINT")
                .map(|e| e.trim_end_matches('/').to_string())
                .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string()),
            cache_dir,
            progress: !var("HF_HUB_DISABLE_PROGRESS_BARS").is_some_and(|v| truthy(&v)),
            token,
            probe_timeout: Duration::from_secs(5),
            stall_timeout: var("TRELLIS_RS_STALL_TIMEOUT")
                .and_then(|v| v.trim().parse::<f64>().ok())
                .filter(|s| s.is_finite() && *s > 0.0)
                .map(Duration::from_secs_f64)
                .unwrap_or(DEFAULT_STALL_TIMEOUT),
        }
    }

    /// Options that read and write `cache_dir` and talk to `endpoint`, without progress bars.
    pub fn new(endpoint: impl Into<String>, cache_dir: impl Into<PathBuf>) -> Self {
        Self {
            offline: false,
            endpoint: endpoint.into().trim_end_matches('/').to_string(),
            cache_dir: cache_dir.into(),
            progress: false,
            token: None,
            probe_timeout: Duration::from_secs(5),
            stall_timeout: DEFAULT_STALL_TIMEOUT,
        }
    }
}

/// `huggingface_hub`'s reading of boolean environment variables.
fn truthy(v: &str) -> bool {
    matches!(
        v.trim().to_ascii_lowercase().as_str(),
        "1" | "true" | "yes" | "on"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn opts(vars: &[(&str, &str)]) -> HubOptions {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        HubOptions::from_vars(|k| m.get(k).cloned())
    }

    #[test]
    fn cache_dir_precedence() {
        let o = opts(&[("HOME", "/home/u")]);
        assert_eq!(o.cache_dir, PathBuf::from("/home/u/.cache/huggingface/hub"));
        let o = opts(&[("HOME", "/home/u"), ("HF_HOME", "/data/hf")]);
        assert_eq!(o.cache_dir, PathBuf::from("/data/hf/hub"));
        let o = opts(&[
            ("HOME", "/home/u"),
            ("HF_HOME", "/data/hf"),
            ("HF_HUB_CACHE", "/fast/cache"),
        ]);
        assert_eq!(o.cache_dir, PathBuf::from("/fast/cache"));
    }

    #[test]
    fn offline_endpoint_and_progress() {
        let o = opts(&[("HOME", "/h")]);
        assert!(!o.offline);
        assert!(o.progress);
        assert_eq!(o.endpoint, DEFAULT_ENDPOINT);
        for v in ["1", "TRUE", "yes", "On"] {
            assert!(opts(&[("HF_HUB_OFFLINE", v)]).offline, "{v}");
        }
        for v in ["0", "false", "no"] {
            assert!(!opts(&[("HF_HUB_OFFLINE", v)]).offline, "{v}");
        }
        let o = opts(&[
            ("HF_ENDPOINT", "http://mirror.local:8080/"),
            ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
            ("HF_TOKEN", "hf_x"),
        ]);
        assert_eq!(o.endpoint, "http://mirror.local:8080");
        assert!(!o.progress);
        assert_eq!(o.token.as_deref(), Some("hf_x"));
    }
}
