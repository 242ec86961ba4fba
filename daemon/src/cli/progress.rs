//! Progress output of the generating subcommands: a bar per stage on stderr (default), one JSON
//! object per event on stdout (`--json`), or nothing (`--quiet`).

use std::io::Write;

use indicatif::{ProgressBar, ProgressStyle};

use crate::pipelines::base::{ProgressEvent, Stage};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Bars,
    Json,
    Quiet,
}

impl Mode {
    pub fn from_flags(quiet: bool, json: bool) -> Self {
        if json {
            Mode::Json
        } else if quiet {
            Mode::Quiet
        } else {
            Mode::Bars
        }
    }
}

pub struct Reporter {
    mode: Mode,
    bar: Option<(Stage, ProgressBar)>,
}

impl Reporter {
    pub fn new(mode: Mode) -> Self {
        Self { mode, bar: None }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// One JSON line on stdout (`--json` only).
    pub fn json(&self, v: &serde_json::Value) {
        if self.mode == Mode::Json {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{v}");
            let _ = out.flush();
        }
    }

    /// Reports `step` of `steps` in `stage` (the twin of `RunControl::emit` for the CLI's own steps).
    pub fn emit(&mut self, stage: Stage, step: usize, steps: usize, detail: Option<String>) {
        self.event(&ProgressEvent {
            stage,
            step,
            steps,
            detail,
        });
    }

    pub fn event(&mut self, e: &ProgressEvent) {
        match self.mode {
            Mode::Quiet => {}
            Mode::Json => {
                let mut v = serde_json::json!({"event": "progress", "stage": e.stage, "step": e.step, "steps": e.steps});
                if let Some(d) = &e.detail {
                    v["detail"] = serde_json::json!(d);
                }
                self.json(&v);
            }
            Mode::Bars => self.bar_event(e),
        }
    }

    fn bar_event(&mut self, e: &ProgressEvent) {
        let same = matches!(&self.bar, Some((s, _)) if *s == e.stage);
        if !same {
            self.finish();
            let pb = ProgressBar::with_draw_target(
                Some(e.steps.max(1) as u64),
                indicatif::ProgressDrawTarget::stderr(),
            );
            let style = ProgressStyle::with_template(
                "{prefix:>18} [{bar:30}] {pos}/{len} {msg} ({elapsed})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            pb.set_style(style);
            pb.set_prefix(e.stage.label());
            self.bar = Some((e.stage, pb));
        }
        if let Some((_, pb)) = &self.bar {
            pb.set_length(e.steps.max(1) as u64);
            pb.set_position(e.step as u64);
            if let Some(d) = &e.detail {
                pb.set_message(d.clone());
            }
        }
    }

    /// Ends the current bar (leaves it on screen).
    pub fn finish(&mut self) {
        if let Some((_, pb)) = self.bar.take() {
            pb.finish();
        }
    }

    /// A plain status line (stderr) in bar mode.
    pub fn note(&mut self, msg: &str) {
        if self.mode == Mode::Bars {
            self.finish();
            eprintln!("{msg}");
        }
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.finish();
    }
}
