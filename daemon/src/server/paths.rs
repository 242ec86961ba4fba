//! Where the daemon lives on this machine: its socket address, its lock, its shared-memory
//! folder and the asset store (docs/PROTOCOL.md, "Connecting" and "Asset store").

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// The user id (0 where the OS has none).
pub fn uid() -> u32 {
    #[cfg(unix)]
    {
        // SAFETY: getuid cannot fail and has no preconditions.
        unsafe { libc::getuid() }
    }
    #[cfg(not(unix))]
    {
        0
    }
}

fn user_name() -> String {
    std::env::var("USERNAME")
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_else(|_| "user".into())
}

/// The socket address: `$TRELLIS_RS_SOCKET`, else the platform's default.
pub fn socket_address() -> PathBuf {
    if let Some(s) = std::env::var_os("TRELLIS_RS_SOCKET") {
        return PathBuf::from(s);
    }
    default_socket_address()
}

fn default_socket_address() -> PathBuf {
    if cfg!(windows) {
        return PathBuf::from(format!(r"\\.\pipe\trellis-rs-{}", user_name()));
    }
    if cfg!(target_os = "macos") {
        let tmp = std::env::var_os("TMPDIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/tmp"));
        return tmp
            .join(format!("trellis-rs-{}", uid()))
            .join("daemon.sock");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("trellis-rs").join("daemon.sock"),
        _ => PathBuf::from(format!("/tmp/trellis-rs-{}", uid())).join("daemon.sock"),
    }
}

/// Creates `dir` (and parents) with mode 0700 and checks it belongs to this user.
pub fn private_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
        if !dir.is_dir() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("creating {}", dir.display()))?;
        }
        let md = std::fs::metadata(dir).with_context(|| format!("{}", dir.display()))?;
        anyhow::ensure!(
            md.uid() == uid(),
            "{} belongs to user {}, not to this user ({}); set TRELLIS_RS_SOCKET elsewhere",
            dir.display(),
            md.uid(),
            uid()
        );
        if md.permissions().mode() & 0o077 != 0 {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .with_context(|| format!("chmod 0700 {}", dir.display()))?;
        }
    }
    #[cfg(not(unix))]
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(())
}

/// The data folder: `$TRELLIS_RS_DATA`, else `$XDG_DATA_HOME/trellis-rs` (the OS equivalents).
pub fn data_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("TRELLIS_RS_DATA") {
        return Ok(PathBuf::from(d));
    }
    if cfg!(windows) {
        if let Some(a) = std::env::var_os("APPDATA") {
            return Ok(PathBuf::from(a).join("trellis-rs"));
        }
    }
    if !cfg!(windows) && !cfg!(target_os = "macos") {
        if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|x| !x.is_empty()) {
            return Ok(PathBuf::from(x).join("trellis-rs"));
        }
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .ok_or_else(|| anyhow::anyhow!("no HOME; set TRELLIS_RS_DATA"))?;
    Ok(if cfg!(target_os = "macos") {
        home.join("Library/Application Support/trellis-rs")
    } else {
        home.join(".local/share/trellis-rs")
    })
}

/// The folder under which shared-memory buffer folders live.
fn shm_root() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

fn shm_prefix() -> String {
    format!("trellis-rs-{}-", uid())
}

/// This daemon's shared-memory folder: `/dev/shm/trellis-rs-<uid>-<pid>`.
pub fn shm_dir() -> PathBuf {
    shm_root().join(format!("{}{}", shm_prefix(), std::process::id()))
}

/// Whether process `pid` runs.
pub fn pid_alive(pid: u32) -> bool {
    #[cfg(unix)]
    {
        let Ok(p) = libc::pid_t::try_from(pid) else {
            return false;
        };
        // SAFETY: signal 0 only checks that the process exists.
        let r = unsafe { libc::kill(p, 0) };
        r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}

/// Removes the buffer folders of this user's daemons that no longer run; returns them.
pub fn sweep_dead_shm_dirs() -> Vec<PathBuf> {
    let prefix = shm_prefix();
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(shm_root()) else {
        return removed;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(pid) = name
            .strip_prefix(&prefix)
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !pid_alive(pid) && std::fs::remove_dir_all(e.path()).is_ok()
        {
            removed.push(e.path());
        }
    }
    removed
}

/// Holds `<socket>.lock` for the daemon's life (flock): one daemon per address.
pub struct DaemonLock {
    #[allow(dead_code)]
    file: std::fs::File,
    path: PathBuf,
}

impl DaemonLock {
    /// Takes the lock, or says which daemon holds it (`Err(Some(pid))`, `Err(None)` unknown).
    pub fn acquire(socket: &Path) -> Result<std::result::Result<Self, Option<u32>>> {
        let path = PathBuf::from(format!("{}.lock", socket.display()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        #[cfg(unix)]
        {
            use std::io::{Read, Seek, Write};
            use std::os::unix::io::AsRawFd;
            // SAFETY: flock on a file descriptor we own.
            let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            let mut file = file;
            if r != 0 {
                let mut s = String::new();
                let _ = file.read_to_string(&mut s);
                return Ok(Err(s.trim().parse().ok()));
            }
            file.set_len(0)?;
            file.seek(std::io::SeekFrom::Start(0))?;
            write!(file, "{}", std::process::id())?;
            file.flush()?;
            Ok(Ok(Self { file, path }))
        }
        #[cfg(not(unix))]
        Ok(Ok(Self { file, path }))
    }
}

impl Drop for DaemonLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
