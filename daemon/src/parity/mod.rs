//! The parity harness: walks every fixture under a directory (format: `shared/reference/README.md`),
//! dispatches on each `meta.json`'s `kind`, and compares our networks with the original's tensors.
//!
//! Each family of kinds has one handler module, next to the code it checks:
//! [`dense`] (issue: dense networks), [`conditioners`], [`sparse`], [`decoders`], [`pipelines`],
//! [`background`] (U²-Net background removal).

pub mod background;
pub mod conditioners;
pub mod decoders;
pub mod dense;
pub mod fixture;
pub mod pipelines;
pub mod sparse;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::Device;

pub use fixture::{Check, Fixture, Report};

/// What a handler did with a fixture.
pub enum Outcome {
    Checked(Report),
    /// The kind is known but not implemented yet; the reason names it.
    Skipped(String),
}

/// Every kind some handler owns, in dispatch order.
pub fn known_kinds() -> Vec<&'static str> {
    [
        dense::KINDS,
        conditioners::KINDS,
        sparse::KINDS,
        decoders::KINDS,
        pipelines::KINDS,
        background::KINDS,
    ]
    .concat()
}

/// Runs the handler that owns `fx.kind`; an unknown kind is an error.
pub fn dispatch(fx: &mut Fixture) -> Result<Outcome> {
    let k = fx.kind.as_str();
    if dense::KINDS.contains(&k) {
        dense::check(fx)
    } else if conditioners::KINDS.contains(&k) {
        conditioners::check(fx)
    } else if sparse::KINDS.contains(&k) {
        sparse::check(fx)
    } else if decoders::KINDS.contains(&k) {
        decoders::check(fx)
    } else if pipelines::KINDS.contains(&k) {
        pipelines::check(fx)
    } else if background::KINDS.contains(&k) {
        background::check(fx)
    } else {
        bail!(
            "unknown fixture kind {k:?} (known: {})",
            known_kinds().join(", ")
        )
    }
}

/// Every directory under `root` (itself included) holding a `meta.json`, sorted.
pub fn find_fixtures(root: &Path) -> Result<Vec<PathBuf>> {
    if !root.is_dir() {
        bail!(
            "parity: fixture directory {} does not exist",
            root.display()
        );
    }
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        if dir.join("meta.json").is_file() {
            out.push(dir.clone());
        }
        for e in std::fs::read_dir(&dir)? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    pub checked: usize,
    pub passed: usize,
    pub failed: usize,
    pub skipped: usize,
    /// One entry per failed fixture.
    pub failures: Vec<Failure>,
}

/// A failed fixture: the checks over tolerance, or the error that stopped it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The fixture directory relative to the walked root.
    pub fixture: String,
    pub kind: String,
    /// Names of the checks over tolerance (empty when `error` is set).
    pub checks: Vec<String>,
    pub error: Option<String>,
}

impl Summary {
    /// True only when something was checked and every fixture passed: a skipped fixture is not
    /// a pass.
    pub fn ok(&self) -> bool {
        self.failed == 0 && self.skipped == 0 && self.checked > 0
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "parity: {} checked, {} passed, {} failed, {} skipped",
            self.checked, self.passed, self.failed, self.skipped
        )
    }
}

/// Runs every fixture under `root` whose path contains `only` (all when `None`), printing one line
/// each to `out`, and returns the counts. An empty or missing directory is an error.
pub fn run(
    root: &Path,
    device: &Device,
    only: Option<&str>,
    out: &mut dyn std::io::Write,
) -> Result<Summary> {
    let opts = RunOptions {
        only,
        ..Default::default()
    };
    run_with(root, device, &opts, out)
}

/// How [`run_with`] walks a fixture set.
#[derive(Default)]
pub struct RunOptions<'a> {
    /// Only fixtures whose path contains this text.
    pub only: Option<&'a str>,
    /// Print every check, not only the failing ones.
    pub verbose: bool,
}

/// [`run`] with options.
pub fn run_with(
    root: &Path,
    device: &Device,
    opts: &RunOptions,
    out: &mut dyn std::io::Write,
) -> Result<Summary> {
    let only = opts.only;
    let dirs = find_fixtures(root)?;
    if dirs.is_empty() {
        bail!("parity: no fixture (no meta.json) under {}", root.display());
    }
    let mut s = Summary::default();
    for dir in dirs {
        let rel = dir.strip_prefix(root).unwrap_or(&dir);
        let rel = if rel.as_os_str().is_empty() {
            ".".to_string()
        } else {
            rel.display().to_string()
        };
        if let Some(f) = only {
            if !rel.contains(f) {
                continue;
            }
        }
        s.checked += 1;
        let t0 = Instant::now();
        let result = Fixture::open(&dir, device).and_then(|mut fx| {
            let kind = fx.kind.clone();
            dispatch(&mut fx).map(|o| (kind, o))
        });
        let secs = t0.elapsed().as_secs_f64();
        match result {
            Ok((kind, Outcome::Skipped(why))) => {
                s.skipped += 1;
                writeln!(out, "skip {rel:<32} {kind}: {why}")?;
            }
            Ok((kind, Outcome::Checked(report))) => {
                let worst = report
                    .worst()
                    .map(|c| format!("worst {:.2e} ({} tol {:.0e})", c.error, c.name, c.tolerance))
                    .unwrap_or_else(|| "nothing compared".to_string());
                if opts.verbose {
                    for c in &report.checks {
                        writeln!(
                            out,
                            "       {} {}: {:.3e} (tol {:.0e})",
                            if c.passed() { "ok  " } else { "FAIL" },
                            c.name,
                            c.error,
                            c.tolerance
                        )?;
                    }
                }
                if report.passed() {
                    s.passed += 1;
                    writeln!(out, "ok   {rel:<32} {kind}: {worst} [{secs:.1}s]")?;
                } else {
                    s.failed += 1;
                    writeln!(out, "FAIL {rel:<32} {kind}: {worst} [{secs:.1}s]")?;
                    for c in report.checks.iter().filter(|c| !c.passed()) {
                        writeln!(
                            out,
                            "       {}: {:.3e} > tol {:.0e}",
                            c.name, c.error, c.tolerance
                        )?;
                    }
                    s.failures.push(Failure {
                        fixture: rel.clone(),
                        kind,
                        checks: report
                            .checks
                            .iter()
                            .filter(|c| !c.passed())
                            .map(|c| c.name.clone())
                            .collect(),
                        error: None,
                    });
                }
            }
            Err(e) => {
                s.failed += 1;
                writeln!(out, "FAIL {rel:<32} error: {e:#}")?;
                s.failures.push(Failure {
                    fixture: rel.clone(),
                    kind: String::new(),
                    checks: Vec::new(),
                    error: Some(format!("{e:#}")),
                });
            }
        }
    }
    writeln!(out, "{s}")?;
    Ok(s)
}
