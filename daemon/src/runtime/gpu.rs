//! NVIDIA GPUs and CUDA libraries visible on this machine, found without CUDA code: `nvidia-smi`
//! for the GPUs (works whatever features this binary was built with) and a search of the usual
//! library folders for what a `cuda` build loads. No TRELLIS twin.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// One GPU as `nvidia-smi` reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuInfo {
    pub index: usize,
    pub name: String,
    /// Bytes.
    pub memory_total: u64,
    /// Bytes.
    pub memory_free: u64,
    /// `(major, minor)`, e.g. `(9, 0)` for an H100.
    pub compute_capability: Option<(u32, u32)>,
    pub driver: Option<String>,
}

/// The GPUs `nvidia-smi` lists; `Err` says why none could be listed (no `nvidia-smi`, error, ...).
pub fn list_gpus() -> Result<Vec<GpuInfo>, String> {
    let mut child = Command::new("nvidia-smi")
        .args([
            "--query-gpu=index,name,memory.total,memory.free,compute_cap,driver_version",
            "--format=csv,noheader,nounits",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("nvidia-smi not found or not runnable ({e})"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err("nvidia-smi did not answer within 10 s".to_string());
            }
            Err(e) => return Err(format!("waiting for nvidia-smi failed: {e}")),
        }
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("reading nvidia-smi's output failed: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "nvidia-smi failed ({}); is the NVIDIA driver loaded?",
            out.status
        ));
    }
    Ok(parse_nvidia_smi(&String::from_utf8_lossy(&out.stdout)))
}

/// Parses `nvidia-smi --query-gpu=index,name,memory.total,memory.free,compute_cap,driver_version
/// --format=csv,noheader,nounits` (memory in MiB). Lines it cannot read are skipped.
pub fn parse_nvidia_smi(text: &str) -> Vec<GpuInfo> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(',').map(str::trim).collect();
            if f.len() < 4 {
                return None;
            }
            let mib = |s: &str| s.parse::<u64>().ok().map(|m| m << 20);
            let compute_capability = f.get(4).and_then(|c| {
                let (a, b) = c.split_once('.')?;
                Some((a.parse().ok()?, b.parse().ok()?))
            });
            Some(GpuInfo {
                index: f[0].parse().ok()?,
                name: f[1].to_string(),
                memory_total: mib(f[2])?,
                memory_free: mib(f[3])?,
                compute_capability,
                driver: f.get(5).map(|d| d.to_string()).filter(|d| !d.is_empty()),
            })
        })
        .collect()
}

/// The shared libraries a `cuda` build opens (driver, runtime, cuBLAS, cuRAND, NVRTC).
pub const CUDA_LIBRARIES: [&str; 5] = [
    "libcuda.so.1",
    "libcudart.so",
    "libcublas.so",
    "libcurand.so",
    "libnvrtc.so",
];

/// Where [`find_cuda_libraries`] looks: `LD_LIBRARY_PATH`, `$CUDA_HOME/lib64`, `$CUDA_PATH/lib64`,
/// then the usual system and toolkit folders.
pub fn library_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("LD_LIBRARY_PATH")
        .map(|v| std::env::split_paths(&v).collect())
        .unwrap_or_default();
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(h) = std::env::var_os(var) {
            dirs.push(PathBuf::from(h).join("lib64"));
        }
    }
    for d in [
        "/usr/local/cuda/lib64",
        "/usr/local/cuda/targets/x86_64-linux/lib",
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib64",
        "/usr/lib/wsl/lib",
    ] {
        dirs.push(PathBuf::from(d));
    }
    dirs.retain(|d| !d.as_os_str().is_empty());
    dirs.dedup();
    dirs
}

/// For each of [`CUDA_LIBRARIES`], the first file in `dirs` whose name starts with it
/// (`libcublas.so.12`, ...), or `None`.
pub fn find_cuda_libraries(dirs: &[PathBuf]) -> Vec<(&'static str, Option<PathBuf>)> {
    CUDA_LIBRARIES
        .iter()
        .map(|lib| {
            let found = dirs.iter().find_map(|d| {
                let mut names: Vec<PathBuf> = std::fs::read_dir(d)
                    .ok()?
                    .filter_map(|e| e.ok())
                    .map(|e| e.path())
                    .filter(|p| {
                        p.file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(|n| n.starts_with(lib))
                    })
                    .collect();
                names.sort();
                names.into_iter().next()
            });
            (*lib, found)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nvidia_smi_lines() {
        // Line 0 is verbatim from an H100 machine (2026-11-27).
        let text = "0, NVIDIA H100 80GB HBM3, 81559, 81079, 9.0, 580.159.04\n\
                    1, NVIDIA GeForce RTX 3060, 12288, 11000, 8.6, 570.86\n\
                    garbage line\n";
        let g = parse_nvidia_smi(text);
        assert_eq!(g.len(), 2);
        assert_eq!(g[0].name, "NVIDIA H100 80GB HBM3");
        assert_eq!(g[0].memory_total, 81559 << 20);
        assert_eq!(g[0].compute_capability, Some((9, 0)));
        assert_eq!(g[0].driver.as_deref(), Some("580.159.04"));
        let plan = crate::runtime::tiers::choose(crate::runtime::tiers::Target::Cuda {
            free_memory: g[0].memory_free,
            compute_capability: g[0].compute_capability,
        });
        assert_eq!(plan.tier, crate::runtime::tiers::Tier::High);
        assert_eq!(plan.precision, crate::runtime::tiers::Precision::F16);
        assert_eq!(g[1].index, 1);
        assert_eq!(g[1].memory_free, 11000 << 20);
        assert_eq!(g[1].driver.as_deref(), Some("570.86"));
    }

    #[test]
    fn finds_libraries_by_prefix() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("libcublas.so.12"), b"").unwrap();
        std::fs::write(tmp.path().join("libcuda.so.1"), b"").unwrap();
        let found = find_cuda_libraries(&[tmp.path().to_path_buf()]);
        let get = |n: &str| found.iter().find(|(l, _)| *l == n).unwrap().1.clone();
        assert_eq!(
            get("libcublas.so"),
            Some(tmp.path().join("libcublas.so.12"))
        );
        assert_eq!(get("libcuda.so.1"), Some(tmp.path().join("libcuda.so.1")));
        assert_eq!(get("libcurand.so"), None);
    }
}
