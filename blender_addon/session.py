"""The add-on's side of the daemon: one connection, the jobs this Blender submitted, and the
timer callback :func:`poll` that follows them and imports their results.

Operators only *submit* (a request that the daemon answers at once with a queued job) and return;
:func:`poll` runs on ``bpy.app.timers`` on the main thread, asks the daemon for each job's status,
and when a job is done fetches its arrays (mapped from the daemon's shared-memory file), builds
the objects and releases the buffer. Timers do not fire in background mode: tests call
:func:`poll` directly.
"""

from __future__ import annotations

import itertools
import os
import time
import traceback
from typing import Any, Dict, List, Optional

import bpy
import numpy as np
from mathutils import Matrix, Vector

from . import client as trellis
from . import importers

POLL_INTERVAL = 0.25
REQUEST_TIMEOUT = 15.0
READY_TIMEOUT = 120.0
ACTIVE_STATES = ("starting", "queued", "running")


class Job:
    """A job of this Blender session. ``key`` is local (stable from submission on); ``job`` is the
    daemon's id once the request was sent."""

    def __init__(self, key: int, kind: str, label: str, formats: List[str], placement: dict,
                 request: Optional[tuple]):
        self.key = key
        self.kind = kind
        self.label = label
        self.formats = formats
        self.placement = placement
        self.request = request  # (op, fields, arrays) until sent
        self.job: Optional[int] = None
        self.state = "starting"
        self.stage = ""
        self.step = 0
        self.total = 0
        self.eta_s: Optional[float] = None
        self.message = ""
        self.asset: Optional[str] = None
        self.preview: Optional[str] = None  # the asset's preview.png (done jobs)
        self.queue_position: Optional[int] = None
        self.objects: List[str] = []
        self.collection: Optional[str] = None
        self.submitted = time.monotonic()

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def progress(self) -> float:
        if self.state == "done":
            return 1.0
        return self.step / self.total if self.total else 0.0

    def describe(self) -> str:
        """One line for the job list: state, stage, step k/n, ETA."""
        if self.state == "running":
            text = self.stage.replace("_", " ") or "running"
            if self.total:
                text += f" {self.step}/{self.total}"
            if self.eta_s is not None:
                text += f", ETA {self.eta_s:.0f} s"
            return text
        if self.state == "queued" and self.queue_position:
            return f"queued ({self.queue_position} ahead)"
        if self.state in ("failed", "lost") and self.message:
            return f"{self.state}: {self.message}"
        return self.state

    def update(self, st: Dict[str, Any]) -> None:
        self.state = st.get("state", self.state)
        self.stage = st.get("stage") or ""
        self.step = int(st.get("step") or 0)
        self.total = int(st.get("total") or 0)
        self.eta_s = st.get("eta_s")
        self.queue_position = st.get("queue_position")
        self.message = st.get("message") or ""
        self.asset = st.get("asset") or self.asset
        self.preview = st.get("preview") or self.preview


class Session:
    def __init__(self):
        self.client: Optional[trellis.Client] = None
        self.daemon: Optional[trellis.DaemonProcess] = None
        self.info: Dict[str, Any] = {}
        self.jobs: Dict[int, Job] = {}
        self.reports: List[tuple] = []  # (level, message), newest last
        self.last_error = ""
        self.connecting = False  # a daemon was started without a job: connect once it is ready
        self.daemon_started = 0.0
        self._keys = itertools.count(1)

    # connection ------------------------------------------------------------------------------

    def address(self, prefs=None) -> str:
        if prefs is not None and prefs.socket:
            return prefs.socket
        if self.daemon is not None:
            return self.daemon.address
        return trellis.default_address()

    def connect(self, prefs=None) -> trellis.Client:
        """Connects (and says hello) if not connected; raises DaemonUnavailable when nobody
        answers."""
        if self.client is not None and self.client.connected:
            return self.client
        self.client = None
        c = trellis.Client(self.address(prefs), timeout=REQUEST_TIMEOUT, name="trellis-rs blender")
        self.client = c
        self.info = c.info
        self.last_error = ""
        self.connecting = False
        return c

    def disconnect(self) -> None:
        if self.client is not None:
            self.client.close()
        self.client = None

    def start_daemon(self, prefs) -> trellis.DaemonProcess:
        """Starts `trellisd serve` as the preferences say; returns at once."""
        if self.daemon is not None and self.daemon.proc.poll() is None:
            return self.daemon
        path = bpy.path.abspath(prefs.daemon_path) if prefs.daemon_path else ""
        args = prefs.serve_args()
        known = serve_options(path)
        if known is not None:
            for flag in ("--vram-tier", "--precision"):
                if flag in args and flag not in known:
                    i = args.index(flag)
                    self.report("WARNING", f"this trellisd has no {flag}: its own choice "
                                f"is used instead of {args[i + 1]}")
                    del args[i:i + 2]
        self.daemon = trellis.start_daemon(
            path, models=prefs.models(), args=args, address=prefs.socket or None)
        self.daemon_started = time.monotonic()
        return self.daemon

    def capable(self, op: str) -> bool:
        return op in (self.info.get("capabilities") or ())

    def status_line(self) -> str:
        if self.client is None or not self.info:
            if self.daemon is not None and self.daemon.proc.poll() is None:
                return "Daemon starting..."
            return self.last_error or "Daemon not connected"
        devices = ", ".join(self.info.get("devices") or []) or "?"
        return f"{self.info.get('daemon', 'trellisd')} · {devices} · tier {self.info.get('tier', '?')}"

    # jobs ------------------------------------------------------------------------------------

    def submit(self, prefs, kind: str, label: str, op: str, fields: dict,
               arrays: Optional[dict], formats: List[str], placement: dict) -> Job:
        """Queues a job: sends it now if a daemon answers; otherwise starts one (preference) and
        the timer sends it once the daemon is ready. Raises TrellisError when that is impossible."""
        job = Job(next(self._keys), kind, label, formats, placement, (op, fields, arrays or {}))
        try:
            self.connect(prefs)
        except trellis.DaemonUnavailable as e:
            if not prefs.auto_start:
                raise trellis.DaemonUnavailable(
                    f"{e.message}. Start it, or enable 'Start the daemon when needed' in the "
                    "add-on's preferences") from e
            self.start_daemon(prefs)
        if self.client is not None:
            self._send(job)
        self.jobs[job.key] = job
        ensure_timer()
        return job

    def _send(self, job: Job) -> None:
        assert self.client is not None and job.request is not None
        op, fields, arrays = job.request
        result = self.client.request(op, fields, arrays).result or {}
        job.request = None
        job.job = int(result["job"])
        job.update(result)

    def cancel(self, key: int) -> None:
        job = self.jobs.get(key)
        if job is None or not job.active:
            return
        if job.job is None:
            job.state = "cancelled"
            job.request = None
            return
        if self.client is None:
            raise trellis.DaemonUnavailable("not connected to the daemon")
        job.update(self.client.cancel(job.job) or {})

    def clear_finished(self) -> None:
        for key in [k for k, j in self.jobs.items() if not j.active]:
            del self.jobs[key]

    def active(self) -> bool:
        """Whether the timer has work: a job to follow, or a starting daemon to connect to."""
        return self.connecting or any(j.active for j in self.jobs.values())

    def report(self, level: str, message: str) -> None:
        """A report from the timer (no operator to attach it to): kept for the panel and tests,
        and raised through the internal report operator so it shows in the status bar."""
        self.reports.append((level, message))
        del self.reports[:-50]
        try:
            bpy.ops.trellis.report(level=level, message=message)
        except Exception:  # no window (background mode), or the add-on is going away
            print(f"TRELLIS {level}: {message}")

    def _lost(self, message: str) -> None:
        self.disconnect()
        self.connecting = False
        self.last_error = message
        for j in self.jobs.values():
            if j.active:
                j.state = "lost"
                j.message = message
        self.report("ERROR", message)

    def tick(self) -> None:
        """One poll: connect / send pending jobs, update every active job, import finished ones."""
        pending = [j for j in self.jobs.values() if j.state == "starting" and j.request]
        if self.client is None and (pending or self.active()):
            if self.daemon is not None:
                try:
                    ready = self.daemon.ready()
                except trellis.DaemonUnavailable as e:
                    self.daemon = None
                    self._lost(e.message)
                    return
                if not ready:
                    if time.monotonic() - self.daemon_started > READY_TIMEOUT:
                        self._lost(f"the daemon did not become ready: {self.daemon.log_tail()}")
                    return
            try:
                self.connect(_prefs())
            except trellis.TrellisError as e:
                self._lost(f"the daemon is gone: {e.message}")
                return
        for job in pending:
            try:
                self._send(job)
            except (trellis.DaemonUnavailable, trellis.ProtocolError) as e:
                self._lost(f"the daemon is gone: {e.message}")
                return
            except trellis.TrellisError as e:
                job.state = "failed"
                job.request = None
                job.message = e.message
                self.report("ERROR", f"TRELLIS job '{job.label}': {e.message}")
        for job in list(self.jobs.values()):
            if job.job is None or job.state not in ("queued", "running"):
                continue
            try:
                st = self.client.status(job.job)
            except (trellis.DaemonUnavailable, trellis.ProtocolError) as e:
                code = self.daemon.proc.poll() if self.daemon is not None else None
                why = f" (exit status {code})" if code is not None else ""
                self._lost(f"the daemon stopped{why} while job '{job.label}' ran; it is "
                           f"started again on the next request: {e.message}")
                return
            except trellis.TrellisError as e:
                job.state = "failed"
                job.message = e.message
                self.report("ERROR", f"TRELLIS job '{job.label}': {e.message}")
                continue
            job.update(st)
            if job.state == "done":
                self._import(job)
            elif job.state == "failed":
                self.report("ERROR", f"TRELLIS job '{job.label}' failed: {job.message}")
            elif job.state == "cancelled":
                self.report("WARNING", f"TRELLIS job '{job.label}' cancelled")

    def _import(self, job: Job) -> None:
        if not job.asset:
            job.state, job.message = "failed", "the daemon reported no asset for the finished job"
            self.report("ERROR", f"TRELLIS job '{job.label}': {job.message}")
            return
        try:
            build_objects(self.client, job)
        except trellis.TrellisError as e:
            job.state, job.message = "failed", e.message
            self.report("ERROR", f"TRELLIS job '{job.label}': import failed: {e.message}")
            return
        except Exception as e:  # a bug or bad arrays: say so, keep the add-on alive
            traceback.print_exc()
            job.state, job.message = "failed", f"{type(e).__name__}: {e}"
            self.report("ERROR", f"TRELLIS job '{job.label}': import failed: {job.message}")
            return
        try:
            bpy.ops.ed.undo_push(message=f"TRELLIS: {job.label}")
        except RuntimeError:
            pass
        self.report("INFO", f"TRELLIS job '{job.label}' imported ({', '.join(job.objects)})")


SESSION = Session()
_SERVE_OPTIONS: Dict[tuple, Optional[str]] = {}


def serve_options(binary: str) -> Optional[str]:
    """The `serve --help` text of ``binary`` (cached per file and modification time), to pass
    only options it knows; None when it cannot be asked."""
    import subprocess

    try:
        key = (binary, os.stat(binary).st_mtime_ns)
    except OSError:
        return None
    if key not in _SERVE_OPTIONS:
        try:
            r = subprocess.run([binary, "serve", "--help"], capture_output=True, text=True,
                               timeout=10)
            _SERVE_OPTIONS[key] = r.stdout if r.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            _SERVE_OPTIONS[key] = None
    return _SERVE_OPTIONS[key]


def _prefs():
    from . import preferences
    return preferences.get()


def _redraw() -> None:
    wm = getattr(bpy.context, "window_manager", None)
    if wm is None:
        return
    for window in wm.windows:
        for area in window.screen.areas:
            if area.type == "VIEW_3D":
                for region in area.regions:
                    if region.type == "UI":
                        region.tag_redraw()


def poll() -> Optional[float]:
    """The timer callback: one :meth:`Session.tick`; returns the next interval, or None (the
    timer stops) when no job is active."""
    try:
        SESSION.tick()
    except Exception:
        traceback.print_exc()
    _redraw()
    return POLL_INTERVAL if SESSION.active() else None


def ensure_timer() -> None:
    if not bpy.app.timers.is_registered(poll):
        bpy.app.timers.register(poll, first_interval=POLL_INTERVAL)


def stop_timer() -> None:
    if bpy.app.timers.is_registered(poll):
        bpy.app.timers.unregister(poll)


# ---------------------------------------------------------------------------------------------
# Building objects from a finished job


def _quat_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamilton product of (w, x, y, z) quaternions, broadcast over rows."""
    w1, x1, y1, z1 = np.moveaxis(a, -1, 0)
    w2, x2, y2, z2 = np.moveaxis(b, -1, 0)
    return np.stack([
        w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2,
        w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2,
        w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2,
        w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2,
    ], axis=-1)


def placement_for(job: Job):
    """(object matrix, function mapping the asset's unit-cube positions to the object's local
    space, uniform scale factor for Gaussian sizes, rotation to apply to Gaussian orientations,
    4x4 matrix from the object's local space back to the asset's space)."""
    p = job.placement
    if p.get("frame") is not None:
        # A variant: unit cube -> the source's world bounds -> the source's local space.
        centre = np.asarray(p["frame"]["centre"], dtype=np.float64)
        scale = float(p["frame"]["scale"])
        m = Matrix(p["matrix"])
        if p.get("offset"):
            m = Matrix.Translation(Vector(p["offset"])) @ m
        inv = np.array(Matrix(p["matrix"]).inverted_safe(), dtype=np.float64)
        loc, rot, sca = Matrix(p["matrix"]).decompose()
        mean_scale = float(np.mean(np.abs(np.array(sca)))) or 1.0

        def to_local(u: np.ndarray) -> np.ndarray:
            world = u.astype(np.float64) * scale + centre
            return (world @ inv[:3, :3].T + inv[:3, 3]).astype(np.float32)

        to_asset = np.diag([1.0 / scale] * 3 + [1.0])
        to_asset[:3, 3] = -centre / scale
        to_asset = to_asset @ np.array(Matrix(p["matrix"]), dtype=np.float64)
        q = rot.inverted()
        return m, to_local, scale / mean_scale, np.array([q.w, q.x, q.y, q.z]), to_asset
    m = Matrix(p.get("matrix") or Matrix.Identity(4))
    if p.get("offset"):
        m = Matrix.Translation(Vector(p["offset"])) @ m
    if p.get("to_asset") is not None:
        # An edit: the result is in its source's asset space; it takes the source's place.
        to_asset = np.asarray(p["to_asset"], dtype=np.float64)
        back = np.linalg.inv(to_asset)
        _, rot, sca = Matrix(back.tolist()).decompose()
        factor = float(np.mean(np.abs(np.array(sca)))) or 1.0

        def to_local_edit(u: np.ndarray) -> np.ndarray:
            return (u.astype(np.float64) @ back[:3, :3].T + back[:3, 3]).astype(np.float32)

        return m, to_local_edit, factor, np.array([rot.w, rot.x, rot.y, rot.z]), to_asset
    return m, (lambda u: np.asarray(u, dtype=np.float32)), 1.0, None, np.eye(4)


def _get(fetched: trellis.Fetched, name: str, required: bool = True):
    if name in fetched:
        return fetched[name]
    if required:
        raise trellis.ProtocolError(
            f"the {fetched.result.get('what')} arrays lack {name!r} (got {sorted(fetched)})")
    return None


def build_objects(c: trellis.Client, job: Job) -> None:
    """Fetches each requested representation of the job's asset, builds its object in a
    collection named after the job, and releases the daemon's buffer whatever happens."""
    matrix, to_local, size_factor, rot, to_asset = placement_for(job)
    to_asset_record = [float(x) for x in np.asarray(to_asset, dtype=np.float64).ravel()]
    coll = importers.ensure_collection(f"TRELLIS {job.label}")
    job.collection = coll.name
    for what in job.formats:
        with c.fetch(job.asset, what) as f:
            if what == "mesh":
                data = importers.mesh_from_arrays(
                    f"{job.label} mesh",
                    to_local(_get(f, "positions")),
                    _get(f, "triangles"),
                    colors=_get(f, "colors", False),
                    uvs=_get(f, "uvs", False),
                    texture=_get(f, "texture", False),
                )
                obj = importers.new_object(f"{job.label} mesh", data, coll, matrix,
                                           job.asset, job.job, job.kind)
                obj[importers.TO_ASSET_KEY] = to_asset_record
            elif what == "gaussian":
                scales = _get(f, "scales", False)
                rots = _get(f, "rotations", False)
                if scales is not None:
                    scales = np.asarray(scales, np.float32) * np.float32(size_factor)
                if rots is not None and rot is not None:
                    rots = _quat_mul(rot[None, :], np.asarray(rots, np.float64)).astype(np.float32)
                data = importers.gaussians_to_mesh(
                    f"{job.label} gaussians",
                    to_local(_get(f, "positions")),
                    colors=_get(f, "colors", False),
                    scales=scales,
                    rotations=rots,
                    opacities=_get(f, "opacities", False),
                )
                obj = importers.new_object(f"{job.label} gaussians", data, coll, matrix,
                                           job.asset, job.job, job.kind)
                obj[importers.TO_ASSET_KEY] = to_asset_record
                importers.add_gaussian_preview(obj)
            else:
                continue
            job.objects.append(obj.name)
    src_name = job.placement.get("source")
    if src_name and job.placement.get("keep_original") == "HIDE":
        src = bpy.data.objects.get(src_name)
        if src is not None:
            src.hide_set(True)
            src.hide_render = True


def _first_connect() -> None:
    """Once after registration: connect to a daemon that already runs (never starts one), so the
    panel's status line is filled in."""
    try:
        SESSION.connect(_prefs())
    except Exception as e:  # not running: the status line says so
        SESSION.last_error = getattr(e, "message", str(e))
    return None


def register():
    bpy.app.timers.register(_first_connect, first_interval=0.5)


def unregister():
    stop_timer()
    if bpy.app.timers.is_registered(_first_connect):
        bpy.app.timers.unregister(_first_connect)
    SESSION.disconnect()
