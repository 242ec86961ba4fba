//! NVRTC, NVIDIA's run-time CUDA C++ compiler, opened at run time (no link-time dependency), and
//! the on-disk cache of what it compiled. No TRELLIS twin (the original builds its CUDA extensions
//! ahead of time for a fixed list of architectures).
//!
//! Kernels are compiled for the GPU that is present (`sm_XY` machine code) the first time they are
//! needed and cached under a key made of the architecture, a hash of the kernel's source and the
//! NVRTC version, so a new GPU, a changed kernel or a new NVRTC each compile again and nothing else
//! does. There is no list of architectures anywhere: [`Nvrtc::supported_archs`] says what the
//! loaded NVRTC can target.

use std::ffi::{c_char, c_int, CStr, CString};
use std::path::{Path, PathBuf};

use libloading::Library;

/// Errors from loading NVRTC or compiling with it.
#[derive(Debug, thiserror::Error)]
pub enum NvrtcError {
    #[error("NVRTC not found (tried {tried}): {why}")]
    NotFound { tried: String, why: String },
    #[error("NVRTC library {lib}: symbol {symbol} missing: {why}")]
    Symbol {
        lib: String,
        symbol: &'static str,
        why: String,
    },
    #[error("NVRTC {call} failed: {message}")]
    Call { call: &'static str, message: String },
    #[error("compiling {name} for sm_{arch} failed:\n{log}")]
    Compile {
        name: String,
        arch: u32,
        log: String,
    },
    #[error("NVRTC {version} cannot target sm_{arch} (it supports {supported:?})")]
    Unsupported {
        arch: u32,
        version: String,
        supported: Vec<u32>,
    },
    #[error("kernel cache {path}: {source}")]
    Cache {
        path: PathBuf,
        source: std::io::Error,
    },
}

type Prog = *mut std::ffi::c_void;
type VersionFn = unsafe extern "C" fn(*mut c_int, *mut c_int) -> c_int;
type CreateFn = unsafe extern "C" fn(
    *mut Prog,
    *const c_char,
    *const c_char,
    c_int,
    *const *const c_char,
    *const *const c_char,
) -> c_int;
type CompileFn = unsafe extern "C" fn(Prog, c_int, *const *const c_char) -> c_int;
type SizeFn = unsafe extern "C" fn(Prog, *mut usize) -> c_int;
type GetFn = unsafe extern "C" fn(Prog, *mut c_char) -> c_int;
type DestroyFn = unsafe extern "C" fn(*mut Prog) -> c_int;
type ErrStrFn = unsafe extern "C" fn(c_int) -> *const c_char;
type NumArchsFn = unsafe extern "C" fn(*mut c_int) -> c_int;
type ArchsFn = unsafe extern "C" fn(*mut c_int) -> c_int;

/// A loaded NVRTC library.
pub struct Nvrtc {
    lib: Library,
    path: String,
    version: (i32, i32),
}

/// Output of one compilation.
#[derive(Debug, Clone)]
pub struct Compiled {
    /// `sm_XY` machine code (a CUBIN), loadable with `cuModuleLoadData`.
    pub cubin: Vec<u8>,
    /// The compiler's log (warnings), possibly empty.
    pub log: String,
}

/// The library names tried when no path is given, newest CUDA major first.
pub const LIBRARY_NAMES: [&str; 3] = ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"];

impl Nvrtc {
    /// Opens NVRTC: `$TRELLIS_NVRTC_LIB` (a file) when set, else [`LIBRARY_NAMES`] through the
    /// loader's search path.
    pub fn open_default() -> Result<Self, NvrtcError> {
        match std::env::var_os("TRELLIS_NVRTC_LIB") {
            Some(p) => Self::open(&[PathBuf::from(p)]),
            None => Self::open(&LIBRARY_NAMES.map(PathBuf::from)),
        }
    }

    /// Opens the first of `candidates` (file paths or bare library names) that loads.
    pub fn open(candidates: &[PathBuf]) -> Result<Self, NvrtcError> {
        let mut why = Vec::new();
        for c in candidates {
            // SAFETY: NVRTC's initialisers have no preconditions.
            match unsafe { Library::new(c) } {
                Ok(lib) => {
                    let mut n = Nvrtc {
                        lib,
                        path: c.display().to_string(),
                        version: (0, 0),
                    };
                    let f: VersionFn = n.sym(b"nvrtcVersion\0", "nvrtcVersion")?;
                    let (mut a, mut b) = (0, 0);
                    // SAFETY: two valid out-pointers.
                    n.check("nvrtcVersion", unsafe { f(&mut a, &mut b) })?;
                    n.version = (a, b);
                    return Ok(n);
                }
                Err(e) => why.push(e.to_string()),
            }
        }
        Err(NvrtcError::NotFound {
            tried: candidates
                .iter()
                .map(|c| c.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            why: why.join("; "),
        })
    }

    fn sym<T: Copy>(&self, name: &[u8], pretty: &'static str) -> Result<T, NvrtcError> {
        // SAFETY: every type this module asks for is the C signature NVRTC documents.
        unsafe { self.lib.get::<T>(name) }
            .map(|s| *s)
            .map_err(|e| NvrtcError::Symbol {
                lib: self.path.clone(),
                symbol: pretty,
                why: e.to_string(),
            })
    }

    fn check(&self, call: &'static str, code: c_int) -> Result<(), NvrtcError> {
        if code == 0 {
            return Ok(());
        }
        let message = self
            .sym::<ErrStrFn>(b"nvrtcGetErrorString\0", "nvrtcGetErrorString")
            .ok()
            .map(|f| {
                // SAFETY: NVRTC returns a static NUL-terminated string for any code.
                let p = unsafe { f(code) };
                if p.is_null() {
                    format!("error {code}")
                } else {
                    // SAFETY: as above.
                    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
                }
            })
            .unwrap_or_else(|| format!("error {code}"));
        Err(NvrtcError::Call { call, message })
    }

    /// Where the library was opened from.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// `(major, minor)`, e.g. `(12, 8)`.
    pub fn version(&self) -> (i32, i32) {
        self.version
    }

    /// The `sm_XY` architectures this NVRTC can compile for, as `XY` numbers.
    pub fn supported_archs(&self) -> Result<Vec<u32>, NvrtcError> {
        let n: NumArchsFn =
            self.sym(b"nvrtcGetNumSupportedArchs\0", "nvrtcGetNumSupportedArchs")?;
        let get: ArchsFn = self.sym(b"nvrtcGetSupportedArchs\0", "nvrtcGetSupportedArchs")?;
        let mut count = 0;
        // SAFETY: valid out-pointer.
        self.check("nvrtcGetNumSupportedArchs", unsafe { n(&mut count) })?;
        let mut v = vec![0 as c_int; count.max(0) as usize];
        // SAFETY: `v` holds `count` ints as the call requires.
        self.check("nvrtcGetSupportedArchs", unsafe { get(v.as_mut_ptr()) })?;
        Ok(v.into_iter().map(|a| a as u32).collect())
    }

    /// Compiles `source` (named `name` in messages) to machine code for `sm_{arch}`.
    pub fn compile(&self, source: &str, name: &str, arch: u32) -> Result<Compiled, NvrtcError> {
        self.compile_for(source, name, arch, false)
    }

    /// [`Nvrtc::compile`] for `sm_{arch}`, or with `arch_specific` for `sm_{arch}a` (that one
    /// chip's extra instructions, e.g. Hopper's wgmma).
    pub fn compile_for(
        &self,
        source: &str,
        name: &str,
        arch: u32,
        arch_specific: bool,
    ) -> Result<Compiled, NvrtcError> {
        let supported = self.supported_archs()?;
        if !supported.contains(&arch) {
            return Err(NvrtcError::Unsupported {
                arch,
                version: format!("{}.{}", self.version.0, self.version.1),
                supported,
            });
        }
        let create: CreateFn = self.sym(b"nvrtcCreateProgram\0", "nvrtcCreateProgram")?;
        let compile: CompileFn = self.sym(b"nvrtcCompileProgram\0", "nvrtcCompileProgram")?;
        let log_size: SizeFn = self.sym(b"nvrtcGetProgramLogSize\0", "nvrtcGetProgramLogSize")?;
        let get_log: GetFn = self.sym(b"nvrtcGetProgramLog\0", "nvrtcGetProgramLog")?;
        let cubin_size: SizeFn = self.sym(b"nvrtcGetCUBINSize\0", "nvrtcGetCUBINSize")?;
        let get_cubin: GetFn = self.sym(b"nvrtcGetCUBIN\0", "nvrtcGetCUBIN")?;
        let destroy: DestroyFn = self.sym(b"nvrtcDestroyProgram\0", "nvrtcDestroyProgram")?;

        let src = CString::new(source).map_err(|_| NvrtcError::Call {
            call: "nvrtcCreateProgram",
            message: format!("{name}: source holds a NUL byte"),
        })?;
        let cname = CString::new(name.replace('\0', "")).unwrap_or_default();
        let opts: Vec<CString> = [
            format!(
                "--gpu-architecture=sm_{arch}{}",
                if arch_specific { "a" } else { "" }
            ),
            "--std=c++17".to_string(),
            "--fmad=false".to_string(),
            "-default-device".to_string(),
        ]
        .into_iter()
        .filter_map(|o| CString::new(o).ok())
        .collect();
        let opt_ptrs: Vec<*const c_char> = opts.iter().map(|o| o.as_ptr()).collect();

        let mut prog: Prog = std::ptr::null_mut();
        // SAFETY: valid out-pointer and NUL-terminated strings; no headers.
        self.check("nvrtcCreateProgram", unsafe {
            create(
                &mut prog,
                src.as_ptr(),
                cname.as_ptr(),
                0,
                std::ptr::null(),
                std::ptr::null(),
            )
        })?;
        let result = (|| {
            // SAFETY: `prog` was created above; `opt_ptrs` point into `opts`, alive here.
            let rc = unsafe { compile(prog, opt_ptrs.len() as c_int, opt_ptrs.as_ptr()) };
            let mut n = 0usize;
            // SAFETY: valid program and out-pointer.
            self.check("nvrtcGetProgramLogSize", unsafe { log_size(prog, &mut n) })?;
            let mut buf = vec![0u8; n.max(1)];
            // SAFETY: `buf` holds the `n` bytes NVRTC writes.
            self.check("nvrtcGetProgramLog", unsafe {
                get_log(prog, buf.as_mut_ptr() as *mut c_char)
            })?;
            let log = String::from_utf8_lossy(&buf)
                .trim_end_matches('\0')
                .trim()
                .to_string();
            if rc != 0 {
                return Err(NvrtcError::Compile {
                    name: name.to_string(),
                    arch,
                    log,
                });
            }
            let mut n = 0usize;
            // SAFETY: as above.
            self.check("nvrtcGetCUBINSize", unsafe { cubin_size(prog, &mut n) })?;
            let mut cubin = vec![0u8; n];
            // SAFETY: `cubin` holds the `n` bytes NVRTC writes.
            self.check("nvrtcGetCUBIN", unsafe {
                get_cubin(prog, cubin.as_mut_ptr() as *mut c_char)
            })?;
            Ok(Compiled { cubin, log })
        })();
        // SAFETY: `prog` is a live program; destroyed exactly once.
        let _ = unsafe { destroy(&mut prog) };
        result
    }

    /// [`Nvrtc::compile`] through the on-disk cache in `cache_dir` (see the module docs); a cache
    /// that cannot be written is not an error (the code is compiled again next time).
    /// `arch_specific` as in [`Nvrtc::compile_for`].
    pub fn compile_cached(
        &self,
        source: &str,
        name: &str,
        arch: u32,
        arch_specific: bool,
        cache_dir: &Path,
    ) -> Result<Vec<u8>, NvrtcError> {
        let stem = if arch_specific {
            format!("{name}-a")
        } else {
            name.to_string()
        };
        let path = cache_dir.join(cache_file_name(&stem, arch, self.version, source));
        if let Ok(bytes) = std::fs::read(&path) {
            if !bytes.is_empty() {
                return Ok(bytes);
            }
        }
        let compiled = self.compile_for(source, name, arch, arch_specific)?;
        if std::fs::create_dir_all(cache_dir).is_ok() {
            let tmp = path.with_extension(format!("tmp{}", std::process::id()));
            if std::fs::write(&tmp, &compiled.cubin).is_ok()
                && std::fs::rename(&tmp, &path).is_err()
            {
                let _ = std::fs::remove_file(&tmp);
            }
        }
        Ok(compiled.cubin)
    }
}

/// 64-bit FNV-1a of `bytes` (stable across runs and builds, unlike `DefaultHasher`).
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// `{name}-sm{arch}-nvrtc{major}.{minor}-{source hash}.cubin`.
pub fn cache_file_name(name: &str, arch: u32, version: (i32, i32), source: &str) -> String {
    let safe: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!(
        "{safe}-sm{arch}-nvrtc{}.{}-{:016x}.cubin",
        version.0,
        version.1,
        fnv1a64(source.as_bytes())
    )
}

/// The default cache folder: `$TRELLIS_KERNEL_CACHE`, else `$XDG_CACHE_HOME/trellis-rs/kernels`,
/// else `~/.cache/trellis-rs/kernels`, else the system temporary folder.
pub fn default_cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("TRELLIS_KERNEL_CACHE") {
        return PathBuf::from(p);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("trellis-rs").join("kernels")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_names_change_with_each_part_of_the_key() {
        let a = cache_file_name("sparse conv", 90, (12, 8), "src");
        assert!(a.starts_with("sparse_conv-sm90-nvrtc12.8-"), "{a}");
        assert_ne!(a, cache_file_name("sparse conv", 89, (12, 8), "src"));
        assert_ne!(a, cache_file_name("sparse conv", 90, (13, 0), "src"));
        assert_ne!(a, cache_file_name("sparse conv", 90, (12, 8), "src2"));
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn a_missing_library_is_a_clear_error() {
        let e = Nvrtc::open(&[PathBuf::from("/nonexistent/libnvrtc.so.99")])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("NVRTC not found") && e.contains("libnvrtc.so.99"),
            "{e}"
        );
    }
}
