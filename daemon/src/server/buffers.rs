//! Shared-memory buffers: files in the daemon's own folder under `/dev/shm`, written through a
//! memory map (memmap2) before the reply that names them. A buffer belongs to the connection
//! that fetched it: deleted on `release`, when that connection closes, and with the folder when
//! the daemon stops.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};

pub struct Buffers {
    pub dir: PathBuf,
    counter: AtomicU64,
}

impl Buffers {
    /// Creates the folder (mode 0700).
    pub fn create(dir: PathBuf) -> Result<Self> {
        super::paths::private_dir(&dir)?;
        Ok(Self {
            dir,
            counter: AtomicU64::new(0),
        })
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.bin"))
    }

    /// A new buffer holding a copy of the file `src`; returns (id, path, size).
    pub fn from_file(&self, src: &Path) -> Result<(String, PathBuf, u64)> {
        let data = std::fs::File::open(src).with_context(|| format!("{}", src.display()))?;
        let size = data.metadata()?.len();
        let id = format!("b{}", self.counter.fetch_add(1, Ordering::Relaxed) + 1);
        let path = self.path(&id);
        let written = (|| -> Result<()> {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)?;
            f.set_len(size)?;
            if size > 0 {
                // SAFETY: the daemon created this file just now and nobody else writes it.
                let src_map = unsafe { memmap2::Mmap::map(&data)? };
                let mut dst = unsafe { memmap2::MmapMut::map_mut(&f)? };
                dst.copy_from_slice(&src_map);
                dst.flush()?;
            }
            Ok(())
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&path);
            return Err(e.context(format!("writing buffer {}", path.display())));
        }
        Ok((id, path, size))
    }

    /// Deletes a buffer; false if there was none.
    pub fn release(&self, id: &str) -> bool {
        std::fs::remove_file(self.path(id)).is_ok()
    }

    /// Deletes every buffer in `ids`.
    pub fn release_all(&self, ids: &BTreeSet<String>) {
        for id in ids {
            self.release(id);
        }
    }

    /// Deletes the folder.
    pub fn remove_dir(&self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
