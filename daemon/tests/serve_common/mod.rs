//! Shared by the `serve_*` tests: the tiny repositories, a real `trellisd serve` in a temporary
//! folder (its own socket and asset store), raw frames.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use trellis::client::Client;
use trellis_ipc_protocol::{Frame, Limits, Reply, Request, HEADER_LEN};

/// The tiny repositories: (image pipeline, text pipeline, DINOv2 folder, CLIP folder).
pub struct Tiny {
    pub image: PathBuf,
    pub text: PathBuf,
    pub dinov2: PathBuf,
    pub clip: PathBuf,
}

/// Where the tiny repositories are: `trellisd tiny-repos` when the binary has it, else the
/// reference fixtures. `None` (the test prints that it was skipped) when neither exists.
pub fn tiny_repos(scratch: &Path) -> Option<Tiny> {
    let bin = env!("CARGO_BIN_EXE_trellisd");
    let generated = Command::new(bin)
        .args(["tiny-repos", "--help"])
        .output()
        .is_ok_and(|o| o.status.success());
    let t = if generated {
        // `trellisd tiny-repos --out DIR` writes the four folders side by side.
        let out = scratch.join("tiny");
        let ok = Command::new(bin)
            .args(["tiny-repos", "--out"])
            .arg(&out)
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "trellisd tiny-repos failed");
        Tiny {
            image: out.join("TRELLIS-image-tiny"),
            text: out.join("TRELLIS-text-tiny"),
            dinov2: out.join("dinov2_reg_tiny"),
            clip: out.join("clip_text_tiny"),
        }
    } else {
        let root = trellis::reference_dir();
        Tiny {
            image: root.join("pipelines/TRELLIS-image-tiny"),
            text: root.join("pipelines/TRELLIS-text-tiny"),
            dinov2: root.join("conditioners/dinov2_reg_tiny"),
            clip: root.join("conditioners/clip_text_tiny"),
        }
    };
    if !t.image.is_dir() || !t.dinov2.is_dir() {
        eprintln!(
            "SKIPPED: no tiny repositories ({} missing and no `trellisd tiny-repos`)",
            t.image.display()
        );
        return None;
    }
    Some(t)
}

/// A running `trellisd serve`.
pub struct Daemon {
    pub child: Child,
    pub socket: PathBuf,
    pub data: PathBuf,
    pub pid: u32,
}

pub fn serve_command(dir: &Path, tiny: &Tiny, devices: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_trellisd"));
    c.env("TRELLIS_RS_SOCKET", dir.join("run/daemon.sock"))
        .env("TRELLIS_RS_DATA", dir.join("data"))
        .env("HF_HUB_OFFLINE", "1")
        .arg("serve")
        .arg("--model")
        .arg(&tiny.image)
        .arg("--model")
        .arg(&tiny.text)
        .arg("--image-cond-model")
        .arg(&tiny.dinov2)
        .arg("--text-cond-model")
        .arg(&tiny.clip)
        .args(["--devices", devices]);
    c
}

impl Daemon {
    /// Starts a daemon and waits for its `READY <address>` line.
    pub fn start(dir: &Path, tiny: &Tiny, devices: &str) -> Self {
        Self::start_with(dir, tiny, devices, |_| {})
    }

    /// [`Daemon::start`] with more arguments or environment (`more` edits the command).
    pub fn start_with(
        dir: &Path,
        tiny: &Tiny,
        devices: &str,
        more: impl FnOnce(&mut Command),
    ) -> Self {
        let mut cmd = serve_command(dir, tiny, devices);
        more(&mut cmd);
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start trellisd serve");
        let mut line = String::new();
        let stdout = child.stdout.take().expect("stdout");
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read READY");
        let socket = dir.join("run/daemon.sock");
        assert_eq!(
            line.trim(),
            format!("READY {}", socket.display()),
            "the daemon did not say READY"
        );
        let pid = child.id();
        Self {
            child,
            socket,
            data: dir.join("data"),
            pid,
        }
    }

    pub fn client(&self) -> Client {
        Client::connect(&self.socket).expect("connect")
    }

    pub fn raw(&self) -> std::os::unix::net::UnixStream {
        let s = std::os::unix::net::UnixStream::connect(&self.socket).expect("connect");
        s.set_read_timeout(Some(std::time::Duration::from_secs(60)))
            .unwrap();
        s
    }

    /// The daemon's shared-memory folder.
    pub fn shm_dir(&self) -> PathBuf {
        shm_dir_of(self.pid)
    }

    /// Waits for the process to end; returns its exit code.
    pub fn wait(&mut self) -> Option<i32> {
        self.child.wait().ok().and_then(|s| s.code())
    }
}

pub fn shm_dir_of(pid: u32) -> PathBuf {
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    let root = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    root.join(format!("trellis-rs-{uid}-{pid}"))
}

impl Daemon {
    /// SIGTERM, then up to 10 s for a clean stop (kill after that); returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        if let Ok(Some(s)) = self.child.try_wait() {
            return s.code();
        }
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGTERM) };
        let t = std::time::Instant::now();
        while t.elapsed() < std::time::Duration::from_secs(10) {
            if let Ok(Some(s)) = self.child.try_wait() {
                return s.code();
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = self.child.kill();
        self.child.wait().ok().and_then(|s| s.code())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// An RGBA PNG: a coloured disc on a transparent background.
pub fn png_bytes() -> Vec<u8> {
    let mut img = image::RgbaImage::new(96, 80);
    for (x, y, p) in img.enumerate_pixels_mut() {
        let (dx, dy) = (x as f32 - 50.0, y as f32 - 38.0);
        if dx * dx + dy * dy < 28.0 * 28.0 {
            *p = image::Rgba([(x * 2) as u8, 120, (y * 3) as u8, 255]);
        }
    }
    let mut out = Vec::new();
    image::DynamicImage::ImageRgba8(img)
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

/// Sends raw JSON (and binary) in a well-formed frame.
pub fn send_raw(s: &mut std::os::unix::net::UnixStream, json: &[u8], binary: &[u8]) {
    let f = Frame {
        json: json.to_vec(),
        binary: binary.to_vec(),
    };
    f.write_to(s, &Limits::default()).expect("send");
}

pub fn send(s: &mut std::os::unix::net::UnixStream, req: &Request, binary: &[u8]) {
    send_raw(s, &serde_json::to_vec(req).unwrap(), binary);
}

pub fn recv(s: &mut std::os::unix::net::UnixStream) -> (Reply, Vec<u8>) {
    let f = Frame::read_from(s, &Limits::default()).expect("reply frame");
    (f.message().expect("reply JSON"), f.binary)
}

/// Bytes of a frame header with arbitrary fields.
pub fn header(magic: &[u8; 4], version: u16, flags: u16, json: u32, bin: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_LEN);
    h.extend_from_slice(magic);
    h.extend_from_slice(&version.to_le_bytes());
    h.extend_from_slice(&flags.to_le_bytes());
    h.extend_from_slice(&json.to_le_bytes());
    h.extend_from_slice(&bin.to_le_bytes());
    h
}
