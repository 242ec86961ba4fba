//! Compiles every NVRTC kernel for sm_80, 86, 89, 90, 100 and 120 without a GPU. NVRTC is opened
//! at run time: `$TRELLIS_NVRTC_LIB` (`.ci/run` installs NVIDIA's `nvidia-cuda-nvrtc-cu12` wheel
//! under target/ and points it there), else the loader's search path. Without NVRTC the test
//! says it was skipped, except under CI (`CI` set), where that is a failure.
#![cfg(feature = "cuda")]

use trellis_kernels::cuda::ALL;
use trellis_kernels::nvrtc::Nvrtc;

const ARCHS: [u32; 6] = [80, 86, 89, 90, 100, 120];

#[test]
fn every_kernel_compiles_for_every_target_arch() {
    let nvrtc = match Nvrtc::open_default() {
        Ok(n) => n,
        Err(e) => {
            if std::env::var_os("CI").is_some() {
                panic!("NVRTC is required under CI: {e}");
            }
            eprintln!("skipped: {e} (set TRELLIS_NVRTC_LIB to libnvrtc.so.12 of nvidia-cuda-nvrtc-cu12 >= 12.8)");
            return;
        }
    };
    eprintln!(
        "NVRTC {}.{} from {}",
        nvrtc.version().0,
        nvrtc.version().1,
        nvrtc.path()
    );
    let cache = tempfile::tempdir().unwrap();
    for src in ALL {
        // Arch-specific sources (wgmma) build for their one chip only.
        let archs: Vec<u32> = match src.arch_specific {
            Some(a) => vec![a],
            None => ARCHS.to_vec(),
        };
        let specific = src.arch_specific.is_some();
        for arch in archs {
            let compiled = nvrtc
                .compile_for(src.source, src.name, arch, specific)
                .unwrap_or_else(|e| panic!("{}: {e}", src.name));
            // An ELF image that defines every entry point.
            assert_eq!(&compiled.cubin[..4], b"\x7fELF", "{} sm_{arch}", src.name);
            for ep in src.entry_points {
                assert!(
                    compiled.cubin.windows(ep.len()).any(|w| w == ep.as_bytes()),
                    "{} sm_{arch}: entry point {ep} missing",
                    src.name
                );
            }
            assert!(
                !compiled.log.to_lowercase().contains("warning"),
                "{} sm_{arch}: {}",
                src.name,
                compiled.log
            );
        }
        // The cache: a second call reads the file the first wrote.
        let a = nvrtc
            .compile_cached(src.source, src.name, 90, specific, cache.path())
            .unwrap();
        let files: Vec<_> = std::fs::read_dir(cache.path()).unwrap().collect();
        assert!(!files.is_empty());
        let b = nvrtc
            .compile_cached(src.source, src.name, 90, specific, cache.path())
            .unwrap();
        assert_eq!(a, b);
    }
    // An arch this NVRTC cannot target is a clear error, not a crash.
    let e = nvrtc
        .compile(ALL[0].source, ALL[0].name, 1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("cannot target sm_1"), "{e}");
}
