//! `--device auto|cpu|cuda[:N]`: which device a command runs on, and the check that makes a `cuda`
//! build start and explain itself on machines without a GPU or without CUDA's libraries. No TRELLIS
//! twin (the original assumes `cuda`).
//!
//! A `cuda` build opens the CUDA libraries at run time (candle's cudarc with `dynamic-loading`, see
//! `tools/build-cuda.sh`), and cudarc panics when one is missing. So before a CUDA device is opened,
//! [`probe_libraries`] opens each library the backend needs, first by name (the loader's search
//! path), then by full path in [`library_dirs`] (toolkits, `/usr/local/cuda`, NVIDIA's pip wheels):
//! a library opened by path stays loaded, and cudarc's later open by name then finds it. What is
//! still missing is reported, and a run falls back to the CPU with one warning line.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use anyhow::{bail, Result};
use candle_core::Device;

use super::gpu;

/// Free GPU memory below which `--device auto` prefers the CPU (the `minimal` tier's floor).
pub const AUTO_MIN_FREE: u64 = 4 << 30;

/// What the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceRequest {
    /// The first GPU with at least [`AUTO_MIN_FREE`] free, else the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceRequest {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "auto" => DeviceRequest::Auto,
            "cpu" => DeviceRequest::Cpu,
            "cuda" | "gpu" => DeviceRequest::Cuda(0),
            other => match other.strip_prefix("cuda:") {
                Some(i) => DeviceRequest::Cuda(i.parse().map_err(|_| {
                    anyhow::anyhow!("bad device {s:?}: expected auto, cpu or cuda:N")
                })?),
                None => bail!("unknown device {s:?}: expected auto, cpu or cuda:N"),
            },
        })
    }
}

impl fmt::Display for DeviceRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceRequest::Auto => f.write_str("auto"),
            DeviceRequest::Cpu => f.write_str("cpu"),
            DeviceRequest::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// The device name of `d` as the command line spells it.
pub fn device_name(d: &Device) -> String {
    match d.location() {
        candle_core::DeviceLocation::Cpu => "cpu".to_string(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// What happens when a CUDA device was asked for and cannot be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// Run on the CPU after one warning line on stderr (generate, variant, decode).
    CpuWithWarning,
    /// Fail with the reason (parity and benchmarks, where the device is the point).
    Fail,
}

/// One library the CUDA backend opens, and where it was found.
#[derive(Debug, Clone)]
pub struct LibraryProbe {
    /// What the library is for, e.g. `cuBLAS`.
    pub what: &'static str,
    /// The file names tried, in order.
    pub names: Vec<String>,
    /// `Ok(where)`: loaded (by name through the loader's path, or the full path it was found at);
    /// `Err(why)`: not found or not loadable.
    pub result: std::result::Result<String, String>,
}

/// The CUDA major this binary's libraries belong to (`cuda` builds), else `None`.
pub fn cuda_major() -> Option<u32> {
    option_env!("TRELLIS_CUDA_MAJOR").and_then(|m| m.parse().ok())
}

/// The libraries a `cuda` build opens, each with its candidate file names (newest first).
fn required_libraries() -> Vec<(&'static str, Vec<String>)> {
    let majors: Vec<u32> = match cuda_major() {
        Some(m) => vec![m],
        None => vec![13, 12],
    };
    let versioned =
        |stem: &str| -> Vec<String> { majors.iter().map(|m| format!("{stem}.so.{m}")).collect() };
    vec![
        ("the NVIDIA driver", vec!["libcuda.so.1".to_string()]),
        ("cuBLASLt", versioned("libcublasLt")),
        ("cuBLAS", versioned("libcublas")),
        ("cuRAND", vec!["libcurand.so.10".to_string()]),
        ("NVRTC", versioned("libnvrtc")),
    ]
}

/// Folders searched by full path when the loader does not find a library by name:
/// [`gpu::library_dirs`] plus the `nvidia/*/lib` folders of Python environments (NVIDIA's wheels).
pub fn library_dirs() -> Vec<PathBuf> {
    let mut dirs = gpu::library_dirs();
    let mut roots: Vec<PathBuf> = Vec::new();
    if let Some(v) = std::env::var_os("VIRTUAL_ENV") {
        roots.push(PathBuf::from(v));
    }
    roots.extend(["/usr/local", "/usr", "/opt/torch/.venv"].map(PathBuf::from));
    for root in roots {
        for lib in ["lib", "lib64"] {
            let Ok(pythons) = std::fs::read_dir(root.join(lib)) else {
                continue;
            };
            for py in pythons.flatten() {
                for site in ["site-packages", "dist-packages"] {
                    let nv = py.path().join(site).join("nvidia");
                    let Ok(pkgs) = std::fs::read_dir(&nv) else {
                        continue;
                    };
                    for p in pkgs.flatten() {
                        dirs.push(p.path().join("lib"));
                    }
                }
            }
        }
    }
    dirs.dedup();
    dirs
}

/// Opens (and keeps open) each library [`required_libraries`] names; see the module docs.
pub fn probe_libraries() -> Vec<LibraryProbe> {
    let dirs = library_dirs();
    required_libraries()
        .into_iter()
        .map(|(what, names)| {
            let result = open_library(&names, &dirs);
            LibraryProbe {
                what,
                names,
                result,
            }
        })
        .collect()
}

fn open_library(names: &[String], dirs: &[PathBuf]) -> std::result::Result<String, String> {
    let mut errors = Vec::new();
    for name in names {
        // SAFETY: loading a CUDA library runs its initialisers, which is what opening the CUDA
        // backend does anyway; the handle is leaked on purpose so that it stays loaded.
        match unsafe { libloading::Library::new(name) } {
            Ok(lib) => {
                std::mem::forget(lib);
                return Ok(format!("{name} (loader search path)"));
            }
            Err(e) => errors.push(e.to_string()),
        }
    }
    for dir in dirs {
        for name in names {
            let path = dir.join(name);
            if !path.exists() {
                continue;
            }
            // SAFETY: as above.
            match unsafe { libloading::Library::new(&path) } {
                Ok(lib) => {
                    std::mem::forget(lib);
                    return Ok(path.display().to_string());
                }
                Err(e) => errors.push(format!("{}: {e}", path.display())),
            }
        }
    }
    Err(format!(
        "not found: {} (searched the loader's path and {} folders)",
        names.join(" or "),
        dirs.len()
    ))
}

/// Why a CUDA device cannot be used by this process, or `None` when it can be opened.
pub fn cuda_unavailable_reason() -> Option<String> {
    if !candle_core::utils::cuda_is_available() {
        return Some("this build has no CUDA support (build it with tools/build-cuda.sh)".into());
    }
    let missing: Vec<String> = probe_libraries()
        .into_iter()
        .filter_map(|p| p.result.err().map(|e| format!("{}: {e}", p.what)))
        .collect();
    if missing.is_empty() {
        None
    } else {
        Some(format!(
            "CUDA libraries missing ({}); `trellisd doctor` says where it looked",
            missing.join("; ")
        ))
    }
}

fn open_cuda(index: usize) -> Result<Device> {
    if let Some(why) = cuda_unavailable_reason() {
        bail!("cuda:{index}: {why}");
    }
    // cudarc panics rather than failing on some driver errors: turn that into an error too.
    let opened = std::panic::catch_unwind(|| Device::new_cuda(index))
        .map_err(|_| anyhow::anyhow!("cuda:{index}: the CUDA backend failed to start"))?;
    let device = opened.map_err(|e| anyhow::anyhow!("cuda:{index}: {e}"))?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = &device {
        // SAFETY: this process orders its streams itself: candle's for all compute, and the copy
        // stream of `runtime::prefetch`, ordered through its own events. Without this every
        // allocation would create two events, and once the copy stream exists every kernel
        // argument would record one.
        unsafe { d.disable_event_tracking() };
    }
    super::precision::apply_to_backend();
    // Freed memory stays in the pool for the next step (as PyTorch's caching allocator does);
    // the job layer trims it between jobs.
    super::vram::keep_freed_memory(&device, u64::MAX);
    Ok(device)
}

/// Opens the device `request` names, falling back to the CPU as `fallback` says.
pub fn open(request: DeviceRequest, fallback: Fallback) -> Result<Device> {
    match request {
        DeviceRequest::Cpu => Ok(Device::Cpu),
        DeviceRequest::Cuda(i) => match open_cuda(i) {
            Ok(d) => Ok(d),
            Err(e) if fallback == Fallback::CpuWithWarning => {
                eprintln!("warning: {e:#}; running on the CPU");
                Ok(Device::Cpu)
            }
            Err(e) => Err(e),
        },
        DeviceRequest::Auto => {
            if !candle_core::utils::cuda_is_available() {
                return Ok(Device::Cpu);
            }
            let gpus = gpu::list_gpus().unwrap_or_default();
            let Some(g) = gpus.iter().find(|g| g.memory_free >= AUTO_MIN_FREE) else {
                if !gpus.is_empty() {
                    eprintln!(
                        "warning: no GPU has {} GiB free; running on the CPU",
                        AUTO_MIN_FREE >> 30
                    );
                }
                return Ok(Device::Cpu);
            };
            match open_cuda(g.index) {
                Ok(d) => Ok(d),
                Err(e) => {
                    eprintln!("warning: {e:#}; running on the CPU");
                    Ok(Device::Cpu)
                }
            }
        }
    }
}

/// Parses and opens `s` (`auto`, `cpu`, `cuda[:N]`) with `fallback`.
pub fn open_str(s: &str, fallback: Fallback) -> Result<Device> {
    open(s.parse()?, fallback)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_print_back() {
        for (s, r) in [
            ("auto", DeviceRequest::Auto),
            ("cpu", DeviceRequest::Cpu),
            ("cuda", DeviceRequest::Cuda(0)),
            ("CUDA:3", DeviceRequest::Cuda(3)),
        ] {
            assert_eq!(s.parse::<DeviceRequest>().unwrap(), r, "{s}");
        }
        assert_eq!(DeviceRequest::Cuda(2).to_string(), "cuda:2");
        assert!("cuda:x".parse::<DeviceRequest>().is_err());
        assert!("tpu".parse::<DeviceRequest>().is_err());
    }

    #[test]
    fn cpu_builds_fall_back_or_fail_as_asked() {
        if candle_core::utils::cuda_is_available() {
            eprintln!("skipped: this build has CUDA support");
            return;
        }
        let d = open(DeviceRequest::Cuda(0), Fallback::CpuWithWarning).unwrap();
        assert!(d.is_cpu());
        let e = open(DeviceRequest::Cuda(0), Fallback::Fail).unwrap_err();
        assert!(e.to_string().contains("no CUDA support"), "{e}");
        assert!(open(DeviceRequest::Auto, Fallback::Fail).unwrap().is_cpu());
    }

    #[test]
    fn probes_name_every_library_and_what_was_tried() {
        let probes = probe_libraries();
        assert_eq!(probes.len(), required_libraries().len());
        for p in &probes {
            assert!(!p.names.is_empty());
            if let Err(e) = &p.result {
                assert!(e.contains(&p.names[0]), "{e}");
            }
        }
    }
}
