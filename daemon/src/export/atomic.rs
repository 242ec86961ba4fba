//! Atomic output files: everything is written to a temporary file next to the target and renamed
//! over it only once complete, so a failure never leaves a half-written output behind.

use std::io::Write;
use std::path::Path;

use anyhow::{anyhow, Context, Result};

/// Fails early (before any long computation) when `path` cannot be an output file: its folder
/// must exist and it must not be a directory.
pub fn check_output_path(path: &Path) -> Result<()> {
    if path.as_os_str().is_empty() {
        return Err(anyhow!("empty output path"));
    }
    if path.is_dir() {
        return Err(anyhow!("output path {} is a directory", path.display()));
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        return Err(anyhow!(
            "output folder {} does not exist (for {})",
            parent.display(),
            path.display()
        ));
    }
    Ok(())
}

/// Writes `path` through `fill`, atomically (temp file in the same folder, then rename).
pub fn write_atomic(path: &Path, fill: impl FnOnce(&mut dyn Write) -> Result<()>) -> Result<()> {
    check_output_path(path)?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut builder = tempfile::Builder::new();
    builder.prefix(".trellis-tmp-");
    // Temporary files are private (0600) by default; an output file gets the usual 0644 less the umask.
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644));
    let mut tmp = builder
        .tempfile_in(parent)
        .with_context(|| format!("creating a temporary file in {}", parent.display()))?;
    {
        let mut w = std::io::BufWriter::new(tmp.as_file_mut());
        fill(&mut w)?;
        w.flush()
            .with_context(|| format!("writing {}", path.display()))?;
    }
    tmp.as_file().sync_all().ok();
    tmp.persist(path)
        .map_err(|e| anyhow!("writing {}: {}", path.display(), e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_leaves_nothing_and_missing_folder_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("out.bin");
        let e = write_atomic(&p, |w| {
            w.write_all(b"partial")?;
            Err(anyhow!("boom"))
        });
        assert!(e.is_err());
        assert!(!p.exists());
        assert_eq!(
            std::fs::read_dir(d.path()).unwrap().count(),
            0,
            "temp file left behind"
        );
        write_atomic(&p, |w| Ok(w.write_all(b"ok")?)).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"ok");
        let e = check_output_path(&d.path().join("nope/out.glb")).unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
        assert!(check_output_path(d.path()).is_err());
    }
}
