//! The machine we run on: OS, CPU, memory, build features. No TRELLIS twin (the original leaves
//! this to PyTorch); `trellisd doctor` prints it and the tier policy reads it.

use sysinfo::{CpuRefreshKind, MemoryRefreshKind, RefreshKind, System};

/// A snapshot of the host.
#[derive(Debug, Clone)]
pub struct SystemInfo {
    /// e.g. `Linux (Debian GNU/Linux 12)`.
    pub os: String,
    pub kernel: Option<String>,
    pub arch: String,
    /// CPU brand string, e.g. `AMD EPYC 7B13`.
    pub cpu_model: String,
    pub logical_cores: usize,
    pub physical_cores: Option<usize>,
    /// Bytes.
    pub memory_total: u64,
    /// Bytes the OS says a new allocation can take without swapping.
    pub memory_available: u64,
}

impl SystemInfo {
    /// Reads the host now.
    pub fn detect() -> Self {
        let sys = System::new_with_specifics(
            RefreshKind::nothing()
                .with_memory(MemoryRefreshKind::nothing().with_ram())
                .with_cpu(CpuRefreshKind::nothing()),
        );
        let cpu_model = sys
            .cpus()
            .first()
            .map(|c| c.brand().trim().to_string())
            .filter(|b| !b.is_empty())
            .unwrap_or_else(|| "unknown".to_string());
        let logical_cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(sys.cpus().len().max(1));
        let os = match (System::name(), System::long_os_version()) {
            (Some(n), Some(l)) if l.contains(&n) => l,
            (Some(n), Some(l)) => format!("{n} ({l})"),
            (Some(n), None) => n,
            (None, Some(l)) => l,
            (None, None) => std::env::consts::OS.to_string(),
        };
        Self {
            os,
            kernel: System::kernel_version(),
            arch: System::cpu_arch(),
            cpu_model,
            logical_cores,
            physical_cores: System::physical_core_count(),
            memory_total: sys.total_memory(),
            memory_available: sys.available_memory(),
        }
    }
}

/// The cargo features this binary was built with that change what it can run on.
pub fn build_features() -> Vec<&'static str> {
    let mut f = Vec::new();
    if cfg!(feature = "cuda") {
        f.push("cuda");
    }
    f
}

/// Bytes as `12.3 GiB` / `512.0 MiB`.
pub fn human_bytes(b: u64) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    const MIB: f64 = (1u64 << 20) as f64;
    let b = b as f64;
    if b >= GIB {
        format!("{:.1} GiB", b / GIB)
    } else if b >= MIB {
        format!("{:.1} MiB", b / MIB)
    } else {
        format!("{b:.0} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_this_host() {
        let s = SystemInfo::detect();
        assert!(s.logical_cores >= 1);
        assert!(s.memory_total > 0);
        assert!(s.memory_available <= s.memory_total);
        assert!(!s.os.is_empty() && !s.arch.is_empty());
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 20), "3.0 MiB");
        assert_eq!(human_bytes(80 << 30), "80.0 GiB");
        assert_eq!(build_features().contains(&"cuda"), cfg!(feature = "cuda"));
    }
}
