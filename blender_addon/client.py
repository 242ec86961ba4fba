"""Client of the trellis-rs daemon (``trellisd serve``): the Python half of the wire format.

Standard library and numpy only, no ``bpy``: the Blender add-on imports it, and so can any script.
``docs/PROTOCOL.md`` is the specification this module follows (frame header, JSON envelopes,
array descriptors, shared-memory buffers).

    import sys; sys.path.insert(0, "/path/to/trellis-rs/blender_addon")
    import client as trellis

    with trellis.Client() as c:                     # connects and says hello
        job = c.generate(text="a wooden crate", seed=1)
        done = c.wait(job["job"], on_status=lambda j: print(j["state"], j.get("stage")))
        with c.fetch(done["asset"], "mesh") as mesh:  # numpy arrays over the daemon's buffer
            print(mesh["positions"].shape, mesh["triangles"].shape)
        # leaving the block releases the buffer (the daemon deletes its file)

Everything that can go wrong on the daemon's side raises :class:`TrellisError` (with the
daemon's machine-readable ``code``); a daemon that is not running raises
:class:`DaemonUnavailable`, a broken stream :class:`ProtocolError`.
"""

from __future__ import annotations

import itertools
import json
import mmap
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "PROTOCOL_VERSION",
    "Client",
    "Fetched",
    "TrellisError",
    "DaemonUnavailable",
    "ProtocolError",
    "JobFailed",
    "default_address",
    "encode_header",
    "decode_header",
    "pack_arrays",
    "unpack_array",
    "start_daemon",
    "image_inputs",
    "DaemonProcess",
]

PROTOCOL_VERSION = 1
MAGIC = b"TRLS"
HEADER = struct.Struct("<4sHHIQ")
HEADER_LEN = HEADER.size  # 20
ALIGN = 16
SOCKET_ENV = "TRELLIS_RS_SOCKET"
DEFAULT_MAX_JSON = 16 << 20
DEFAULT_MAX_BINARY = 8 << 30

# Wire dtype names -> numpy dtypes (little-endian). bf16 has no numpy twin: it is widened to f32.
_DTYPES: Dict[str, np.dtype] = {
    "u8": np.dtype("u1"),
    "i32": np.dtype("<i4"),
    "i64": np.dtype("<i8"),
    "u32": np.dtype("<u4"),
    "f16": np.dtype("<f2"),
    "bf16": np.dtype("<u2"),
    "f32": np.dtype("<f4"),
    "f64": np.dtype("<f8"),
}
_NAMES_OF: Dict[str, str] = {
    np.dtype("u1").str: "u8",
    np.dtype("<i4").str: "i32",
    np.dtype("<i8").str: "i64",
    np.dtype("<u4").str: "u32",
    np.dtype("<f2").str: "f16",
    np.dtype("<f4").str: "f32",
    np.dtype("<f8").str: "f64",
}

FINAL_STATES = ("done", "failed", "cancelled")


class TrellisError(Exception):
    """An error reply of the daemon: ``code`` (e.g. ``bad_request``, ``not_found``,
    ``job_failed``), ``message`` (what went wrong, written for a person) and, for a job that
    ended badly, ``job``."""

    def __init__(self, code: str, message: str, job: Optional[int] = None):
        super().__init__(f"{message} [{code}]")
        self.code = code
        self.message = message
        self.job = job


class DaemonUnavailable(TrellisError):
    """No daemon answers at the address (not started, crashed, or another address)."""

    def __init__(self, message: str):
        super().__init__("unavailable", message)


class ProtocolError(TrellisError):
    """The byte stream broke the protocol (bad magic, version, truncation, bad array)."""

    def __init__(self, message: str):
        super().__init__("protocol", message)


class JobFailed(TrellisError):
    """A job :meth:`Client.wait` followed ended ``failed`` or ``cancelled``."""


# ---------------------------------------------------------------------------------------------
# Address


def default_address() -> str:
    """The daemon's address: ``$TRELLIS_RS_SOCKET`` if set, else the platform's default (a Unix
    socket path; on Windows a named pipe)."""
    override = os.environ.get(SOCKET_ENV)
    if override:
        return override
    if sys.platform == "win32":
        user = os.environ.get("USERNAME") or "user"
        return r"\\.\pipe\trellis-rs-" + user
    if sys.platform == "darwin":
        base = os.environ.get("TMPDIR") or "/tmp"
        return os.path.join(base, f"trellis-rs-{os.getuid()}", "daemon.sock")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return os.path.join(runtime, "trellis-rs", "daemon.sock")
    return os.path.join("/tmp", f"trellis-rs-{os.getuid()}", "daemon.sock")


# ---------------------------------------------------------------------------------------------
# Frames and arrays


def encode_header(json_len: int, binary_len: int) -> bytes:
    """The 20-byte frame header: magic, version, flags 0, JSON length (u32), binary length (u64)."""
    if not 0 <= json_len <= 0xFFFFFFFF:
        raise ProtocolError(f"JSON section of {json_len} bytes does not fit the header")
    return HEADER.pack(MAGIC, PROTOCOL_VERSION, 0, json_len, binary_len)


def decode_header(
    data: bytes, max_json: int = DEFAULT_MAX_JSON, max_binary: int = DEFAULT_MAX_BINARY
) -> Tuple[int, int]:
    """Checks a header and returns ``(json_len, binary_len)``."""
    if len(data) < HEADER_LEN:
        raise ProtocolError(f"truncated frame: needed {HEADER_LEN} bytes, got {len(data)}")
    magic, version, flags, json_len, binary_len = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ProtocolError(f"not a trellis-rs frame (magic {magic!r}, expected b'TRLS')")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {version} is not supported (this client speaks {PROTOCOL_VERSION})"
        )
    if flags != 0:
        raise ProtocolError(f"frame flags {flags:#06x} are not supported (expected 0)")
    if json_len > max_json:
        raise ProtocolError(f"JSON section of {json_len} bytes exceeds the limit of {max_json}")
    if binary_len > max_binary:
        raise ProtocolError(
            f"binary section of {binary_len} bytes exceeds the limit of {max_binary}"
        )
    return json_len, binary_len


def _wire_dtype(a: np.ndarray) -> str:
    dt = a.dtype
    if dt.byteorder == ">":
        dt = dt.newbyteorder("<")
    name = _NAMES_OF.get(dt.str)
    if name is None:
        raise TypeError(
            f"arrays of dtype {a.dtype} cannot be sent (use one of {sorted(_DTYPES)})"
        )
    return name


def pack_arrays(arrays: Mapping[str, np.ndarray]) -> Tuple[List[dict], List[memoryview], int]:
    """Lays out ``arrays`` for a binary section, each at a 16-byte aligned offset.

    Returns the descriptors, the pieces to send in order (padding included) and the total length.
    No array is copied unless it is not C-contiguous little-endian already.
    """
    descs: List[dict] = []
    pieces: List[memoryview] = []
    offset = 0
    for name, value in arrays.items():
        a = np.asarray(value)
        wire = _wire_dtype(a)
        a = np.ascontiguousarray(a, dtype=_DTYPES[wire])
        pad = -offset % ALIGN
        if pad:
            pieces.append(memoryview(bytes(pad)))
            offset += pad
        descs.append({"name": name, "dtype": wire, "shape": list(a.shape), "offset": offset})
        if a.nbytes:
            pieces.append(memoryview(a.reshape(-1).view(np.uint8)))
        offset += a.nbytes
    return descs, pieces, offset


def unpack_array(desc: Mapping[str, Any], buf, base: int = 0) -> np.ndarray:
    """The array ``desc`` describes inside ``buf`` (bytes, mmap, memoryview), without a copy
    (except ``bf16``, widened to float32). Bounds and alignment are checked."""
    name = desc.get("name", "?")
    dtype_name = desc.get("dtype")
    if dtype_name not in _DTYPES:
        raise ProtocolError(f"array {name!r}: unknown dtype {dtype_name!r}")
    dt = _DTYPES[dtype_name]
    shape = desc.get("shape")
    offset = desc.get("offset")
    if (
        not isinstance(shape, list)
        or not all(isinstance(d, int) and d >= 0 for d in shape)
        or not isinstance(offset, int)
        or offset < 0
    ):
        raise ProtocolError(f"array {name!r}: bad shape {shape!r} or offset {offset!r}")
    count = 1
    for d in shape:
        count *= d
    nbytes = count * dt.itemsize
    size = len(buf) if not isinstance(buf, memoryview) else buf.nbytes
    if offset % dt.itemsize:
        raise ProtocolError(
            f"array {name!r}: offset {offset} is not a multiple of the element size {dt.itemsize}"
        )
    if base + offset + nbytes > size:
        raise ProtocolError(
            f"array {name!r}: bytes {offset}..{offset + nbytes} lie outside the {size - base} "
            "bytes of its section"
        )
    a = np.frombuffer(buf, dtype=dt, count=count, offset=base + offset).reshape(shape)
    if dtype_name == "bf16":
        a = (a.astype(np.uint32) << 16).view(np.float32)
    return a


# ---------------------------------------------------------------------------------------------
# Streams


class _Stream:
    """A connected byte stream: a Unix socket, or a Windows named pipe opened as a file."""

    def __init__(self, address: str, timeout: Optional[float]):
        self.address = address
        self._sock: Optional[socket.socket] = None
        self._pipe = None
        if sys.platform == "win32" and address.startswith("\\\\"):
            try:
                self._pipe = open(address, "r+b", buffering=0)
            except OSError as e:
                raise DaemonUnavailable(f"no trellis-rs daemon at {address} ({e})") from e
            return
        if not hasattr(socket, "AF_UNIX"):
            raise DaemonUnavailable("this Python has no Unix sockets")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(address)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            s.close()
            raise DaemonUnavailable(
                f"no trellis-rs daemon listens at {address} ({e.strerror or e}); "
                "start it with `trellisd serve`"
            ) from e
        except OSError as e:
            s.close()
            raise DaemonUnavailable(f"cannot connect to {address}: {e}") from e
        self._sock = s

    def settimeout(self, timeout: Optional[float]) -> None:
        if self._sock is not None:
            self._sock.settimeout(timeout)

    def send(self, pieces: Iterable) -> None:
        try:
            for p in pieces:
                if self._sock is not None:
                    self._sock.sendall(p)
                else:
                    self._pipe.write(p)
        except OSError as e:
            raise ProtocolError(f"connection to the daemon lost while sending ({e})") from e

    def recv_into(self, view: memoryview, what: str) -> None:
        filled = 0
        total = view.nbytes
        while filled < total:
            try:
                if self._sock is not None:
                    n = self._sock.recv_into(view[filled:], total - filled)
                else:
                    n = self._pipe.readinto(view[filled:])
            except socket.timeout as e:
                raise ProtocolError(f"the daemon did not answer in time ({what})") from e
            except OSError as e:
                raise ProtocolError(f"connection to the daemon lost ({e})") from e
            if not n:
                if what == "header" and filled == 0:
                    raise ProtocolError("the daemon closed the connection")
                raise ProtocolError(f"truncated frame: {what} ended after {filled} of {total} bytes")
            filled += n

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None
        if self._pipe is not None:
            try:
                self._pipe.close()
            finally:
                self._pipe = None


class Reply:
    """One reply frame: its JSON (``message``), and the binary section (``binary``)."""

    __slots__ = ("message", "binary")

    def __init__(self, message: dict, binary: bytearray):
        self.message = message
        self.binary = binary

    @property
    def id(self) -> int:
        return self.message.get("id", 0)

    @property
    def status(self) -> str:
        return self.message.get("status", "")

    @property
    def result(self) -> Any:
        return self.message.get("result")

    @property
    def arrays(self) -> List[dict]:
        return self.message.get("arrays") or []

    def array(self, name: str) -> np.ndarray:
        for d in self.arrays:
            if d.get("name") == name:
                return unpack_array(d, self.binary)
        raise ProtocolError(f"the reply has no array {name!r}")


# ---------------------------------------------------------------------------------------------
# Fetched arrays


class Fetched(Mapping[str, np.ndarray]):
    """Arrays of a ``fetch`` reply: a read-only mapping name -> numpy array.

    With the ``shm`` transport the arrays are views of the daemon's buffer file, mapped
    read-only; :meth:`close` (or leaving a ``with`` block) drops the mapping and tells the daemon
    to delete the buffer. Copy what you need to keep beyond that.
    """

    def __init__(self, client: "Client", result: dict, arrays: Dict[str, np.ndarray], mm=None):
        self._client = client
        self.result = result
        self._arrays = arrays
        self._mmap = mm
        buf = result.get("buffer") or None
        self.buffer: Optional[str] = buf.get("buffer") if isinstance(buf, dict) else None
        self.transport: str = result.get("transport", "inline")
        self.closed = False

    def __getitem__(self, key: str) -> np.ndarray:
        if self.closed:
            raise ValueError("the fetched arrays were released")
        return self._arrays[key]

    def __iter__(self):
        return iter(self._arrays)

    def __len__(self) -> int:
        return len(self._arrays)

    def close(self, release: bool = True) -> None:
        """Drops the arrays and the mapping; releases the daemon's buffer (once)."""
        if self.closed:
            return
        self.closed = True
        self._arrays = {}
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                # A caller still holds a view; the mapping goes when that view does.
                pass
            self._mmap = None
        if release and self.buffer is not None:
            self._client.release(self.buffer)

    def __enter__(self) -> "Fetched":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _map_buffer(path: str, size: int):
    """Maps a buffer file of the daemon read-only."""
    with open(path, "rb") as f:
        actual = os.fstat(f.fileno()).st_size
        if actual < size:
            raise ProtocolError(f"buffer {path} holds {actual} bytes, the reply announced {size}")
        if size == 0:
            return b""
        return mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)


# ---------------------------------------------------------------------------------------------
# The client


def image_inputs(images: Sequence[Any], prefix: str = "image") -> Tuple[List[dict], Dict[str, np.ndarray]]:
    """Image inputs of a request: file paths become ``{"path": ...}`` (the daemon reads them),
    encoded file bytes ``{"encoded": name}``, uint8 ``[H, W, 3|4]`` arrays ``{"array": name}``.
    Returns the references and the arrays to upload."""
    refs: List[dict] = []
    arrays: Dict[str, np.ndarray] = {}
    for i, img in enumerate(images):
        name = f"{prefix}{i}"
        if isinstance(img, (str, os.PathLike)):
            refs.append({"path": os.path.abspath(os.fspath(img))})
        elif isinstance(img, (bytes, bytearray, memoryview)):
            arrays[name] = np.frombuffer(img, dtype=np.uint8)
            refs.append({"encoded": name})
        else:
            a = np.asarray(img)
            if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] not in (3, 4):
                raise ValueError(
                    f"image {i}: expected a uint8 [H, W, 3|4] array, got {a.dtype} {a.shape}"
                )
            arrays[name] = a
            refs.append({"array": name})
    return refs, arrays


class Client:
    """One connection to the daemon, with one request in flight at a time: :meth:`request` sends
    and reads until that request's final reply (a ``wait=True`` request's progress replies go to
    ``on_progress`` first), holding an internal lock, so threads sharing a client take turns.
    The protocol lets replies of several requests interleave on one connection; to cancel a job
    that a ``wait=True`` call follows, use a second :class:`Client`.
    """

    def __init__(
        self,
        address: Optional[str] = None,
        timeout: Optional[float] = 60.0,
        name: str = "trellis-rs python client",
        connect: bool = True,
    ):
        self.address = address or default_address()
        self.timeout = timeout
        self.name = name
        self.info: Dict[str, Any] = {}
        self._stream: Optional[_Stream] = None
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.max_json = DEFAULT_MAX_JSON
        # What the daemon accepts in a request (hello's limits); replies are read up to the
        # protocol's default limits.
        self.max_upload_json = DEFAULT_MAX_JSON
        self.max_upload = DEFAULT_MAX_BINARY
        if connect:
            self.connect()

    # connection ------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._stream is not None

    def connect(self) -> Dict[str, Any]:
        """Connects and says hello; returns the daemon's ``hello`` result (also ``self.info``)."""
        self.close()
        self._stream = _Stream(self.address, self.timeout)
        try:
            self.info = self.hello()
        except BaseException:
            self.close()
            raise
        limits = self.info.get("limits") or {}
        self.max_upload_json = int(limits.get("max_json", DEFAULT_MAX_JSON))
        self.max_upload = int(limits.get("max_binary", DEFAULT_MAX_BINARY))
        return self.info

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def __enter__(self) -> "Client":
        if not self.connected:
            self.connect()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def capable(self, op: str) -> bool:
        """Whether the daemon answers ``op`` (its ``hello`` capabilities)."""
        return op in (self.info.get("capabilities") or ())

    # exchange --------------------------------------------------------------------------------

    def _read_reply(self) -> Reply:
        assert self._stream is not None
        head = bytearray(HEADER_LEN)
        self._stream.recv_into(memoryview(head), "header")
        json_len, binary_len = decode_header(bytes(head), DEFAULT_MAX_JSON, DEFAULT_MAX_BINARY)
        body = bytearray(json_len)
        self._stream.recv_into(memoryview(body), "JSON section")
        binary = bytearray(binary_len)
        if binary_len:
            self._stream.recv_into(memoryview(binary), "binary section")
        try:
            message = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ProtocolError(f"bad JSON section in the daemon's reply: {e}") from e
        if not isinstance(message, dict):
            raise ProtocolError("a reply's JSON section must be an object")
        return Reply(message, binary)

    def request(
        self,
        op: str,
        fields: Optional[Mapping[str, Any]] = None,
        arrays: Optional[Mapping[str, np.ndarray]] = None,
        on_progress: Optional[Callable[[dict], None]] = None,
        timeout: Any = "default",
    ) -> Reply:
        """Sends one request and returns its final ``ok`` reply; an ``error`` reply raises
        :class:`TrellisError`. ``timeout`` (seconds, or None to wait for ever) bounds each read."""
        if self._stream is None:
            raise DaemonUnavailable(f"not connected to the daemon at {self.address}")
        rid = next(self._ids)
        message: Dict[str, Any] = {"id": rid, "op": op}
        if fields:
            for k, v in fields.items():
                if v is not None:
                    message[k] = v
        pieces: List = []
        binary_len = 0
        if arrays:
            descs, pieces, binary_len = pack_arrays(arrays)
            message["arrays"] = descs
        body = json.dumps(message, separators=(",", ":")).encode("utf-8")
        if len(body) > self.max_upload_json:
            raise TrellisError(
                "too_large", f"request JSON of {len(body)} bytes exceeds the daemon's limit of "
                f"{self.max_upload_json}"
            )
        if binary_len > self.max_upload:
            raise TrellisError(
                "too_large", f"upload of {binary_len} bytes exceeds the daemon's limit of "
                f"{self.max_upload}"
            )
        with self._lock:
            self._stream.settimeout(self.timeout if timeout == "default" else timeout)
            try:
                self._stream.send([encode_header(len(body), binary_len), body, *pieces])
                while True:
                    reply = self._read_reply()
                    if reply.id == 0 and reply.status == "error":
                        # The daemon could not read our frame and closes the connection.
                        m = reply.message
                        self.close()
                        raise TrellisError(str(m.get("code", "internal")), str(m.get("message", "")))
                    if reply.id != rid:
                        raise ProtocolError(f"reply id {reply.id} does not match request id {rid}")
                    status = reply.status
                    if status == "progress":
                        if on_progress is not None:
                            on_progress(reply.message)
                        continue
                    if status == "ok":
                        return reply
                    if status == "error":
                        m = reply.message
                        raise TrellisError(
                            str(m.get("code", "internal")), str(m.get("message", "")), m.get("job")
                        )
                    raise ProtocolError(f"reply with unknown status {status!r}")
            except ProtocolError:
                # The stream may be out of step: drop the connection, a later call reconnects.
                self.close()
                raise
            finally:
                if self._stream is not None:
                    self._stream.settimeout(self.timeout)

    def call(self, op: str, **fields: Any) -> Any:
        """``request`` for ops without arrays; returns the reply's ``result``."""
        return self.request(op, fields).result

    # operations ------------------------------------------------------------------------------

    def hello(self) -> Dict[str, Any]:
        return self.request("hello", {"protocol": PROTOCOL_VERSION, "client": self.name}).result

    def ping(self) -> Any:
        return self.call("ping")


    @staticmethod
    def _sampling(seed, ss_steps, ss_cfg, slat_steps, slat_cfg) -> Dict[str, Any]:
        return {
            "seed": None if seed is None else int(seed),
            "ss_steps": None if ss_steps is None else int(ss_steps),
            "ss_cfg": None if ss_cfg is None else float(ss_cfg),
            "slat_steps": None if slat_steps is None else int(slat_steps),
            "slat_cfg": None if slat_cfg is None else float(slat_cfg),
        }

    def generate(
        self,
        text: Optional[str] = None,
        images: Sequence[Any] = (),
        model: Optional[str] = None,
        seed: Optional[int] = None,
        ss_steps: Optional[int] = None,
        ss_cfg: Optional[float] = None,
        slat_steps: Optional[int] = None,
        slat_cfg: Optional[float] = None,
        formats: Optional[Sequence[str]] = None,
        multi_image_mode: Optional[str] = None,
        wait: bool = False,
        on_progress: Optional[Callable[[dict], None]] = None,
    ) -> Dict[str, Any]:
        """Queues a generation from ``text`` or ``images`` (file paths, encoded file bytes, or
        uint8 ``[H, W, 3|4]`` arrays). Returns the job (``{"job": N, "state": "queued", ...}``);
        with ``wait=True`` the call returns when the job has ended."""
        refs, arrays = image_inputs(images, "image")
        fields: Dict[str, Any] = {
            "model": model,
            "text": text,
            "images": refs or None,
            "multi_image_mode": multi_image_mode,
            "formats": list(formats) if formats else None,
            "wait": True if wait else None,
        }
        fields.update(self._sampling(seed, ss_steps, ss_cfg, slat_steps, slat_cfg))
        reply = self.request(
            "generate", fields, arrays, on_progress, timeout=None if wait else "default"
        )
        return reply.result

    def variant(
        self,
        vertices: Any = None,
        faces: Any = None,
        mesh_path: Optional[str] = None,
        text: Optional[str] = None,
        image: Any = None,
        model: Optional[str] = None,
        seed: Optional[int] = None,
        slat_steps: Optional[int] = None,
        slat_cfg: Optional[float] = None,
        voxel_resolution: Optional[int] = None,
        formats: Optional[Sequence[str]] = None,
        wait: bool = False,
        on_progress: Optional[Callable[[dict], None]] = None,
    ) -> Dict[str, Any]:
        """Queues a variant of a mesh given as arrays (``vertices`` float32 ``[V, 3]``, ``faces``
        ``[F, 3]`` int) or as a file (``mesh_path``), under ``text`` or one ``image``."""
        arrays: Dict[str, np.ndarray] = {}
        if mesh_path is not None:
            mesh: Dict[str, Any] = {"path": os.path.abspath(mesh_path)}
        else:
            if vertices is None or faces is None:
                raise ValueError("variant needs vertices and faces, or mesh_path")
            v = np.asarray(vertices, dtype=np.float32)
            f = np.asarray(faces)
            if v.ndim != 2 or v.shape[1] != 3 or f.ndim != 2 or f.shape[1] != 3:
                raise ValueError(f"expected [V, 3] vertices and [F, 3] faces, got {v.shape} {f.shape}")
            arrays["vertices"] = v
            arrays["faces"] = f.astype(np.uint32, copy=False)
            mesh = {"arrays": {"vertices": "vertices", "faces": "faces"}}
        image_ref = None
        if image is not None:
            refs, img_arrays = image_inputs([image], "image")
            image_ref = refs[0]
            arrays.update(img_arrays)
        fields: Dict[str, Any] = {
            "model": model,
            "mesh": mesh,
            "text": text,
            "image": image_ref,
            "voxel_resolution": voxel_resolution,
            "formats": list(formats) if formats else None,
            "wait": True if wait else None,
        }
        fields.update(self._sampling(seed, None, None, slat_steps, slat_cfg))
        reply = self.request(
            "variant", fields, arrays, on_progress, timeout=None if wait else "default"
        )
        return reply.result

    def edit(
        self,
        asset: str,
        box: Optional[Tuple[Sequence[float], Sequence[float]]] = None,
        mask: Any = None,
        text: Optional[str] = None,
        image: Any = None,
        model: Optional[str] = None,
        seed: Optional[int] = None,
        ss_steps: Optional[int] = None,
        ss_cfg: Optional[float] = None,
        slat_steps: Optional[int] = None,
        slat_cfg: Optional[float] = None,
        jumps: Optional[int] = None,
        jump_length: Optional[int] = None,
        formats: Optional[Sequence[str]] = None,
        wait: bool = False,
        on_progress: Optional[Callable[[dict], None]] = None,
    ) -> Dict[str, Any]:
        """Queues a region edit of the stored ``asset`` under ``text`` or one ``image``: the
        region is ``box`` (``(min, max)`` in the asset's normalised space ``[-0.5, 0.5]^3``),
        ``mask`` (a ``[R, R, R]`` array on the model's structure grid, non-zero = regenerate) or
        both. The result is a new asset (the finished job's ``asset``)."""
        arrays: Dict[str, np.ndarray] = {}
        region: Dict[str, Any] = {}
        if box is not None:
            lo, hi = box
            region["box"] = {"min": [float(x) for x in lo], "max": [float(x) for x in hi]}
        if mask is not None:
            m = np.asarray(mask)
            if m.ndim != 3:
                raise ValueError(f"the region mask must be [R, R, R], got {m.shape}")
            arrays["region_mask"] = (m != 0).astype(np.uint8)
            region["mask"] = "region_mask"
        image_ref = None
        if image is not None:
            refs, img_arrays = image_inputs([image], "image")
            image_ref = refs[0]
            arrays.update(img_arrays)
        fields: Dict[str, Any] = {
            "asset": asset,
            "region": region,
            "model": model,
            "text": text,
            "image": image_ref,
            "jumps": jumps,
            "jump_length": jump_length,
            "formats": list(formats) if formats else None,
            "wait": True if wait else None,
        }
        fields.update(self._sampling(seed, ss_steps, ss_cfg, slat_steps, slat_cfg))
        reply = self.request(
            "edit", fields, arrays, on_progress, timeout=None if wait else "default"
        )
        return reply.result

    def decode(self, asset: str, formats: Sequence[str], wait: bool = False) -> Dict[str, Any]:
        return self.request(
            "decode",
            {"asset": asset, "formats": list(formats), "wait": True if wait else None},
            timeout=None if wait else "default",
        ).result

    def status(self, job: int) -> Dict[str, Any]:
        return self.call("status", job=int(job))

    def jobs(self) -> List[Dict[str, Any]]:
        result = self.call("jobs")
        if isinstance(result, dict):
            return list(result.get("jobs") or [])
        return list(result or [])

    def cancel(self, job: int) -> Dict[str, Any]:
        return self.call("cancel", job=int(job))

    def wait(
        self,
        job: int,
        poll: float = 0.2,
        timeout: Optional[float] = None,
        on_status: Optional[Callable[[dict], None]] = None,
    ) -> Dict[str, Any]:
        """Polls ``status`` until the job ends; returns its final status when ``done``, raises
        :class:`JobFailed` when it failed or was cancelled, ``TimeoutError`` after ``timeout``."""
        start = time.monotonic()
        while True:
            st = self.status(job)
            if on_status is not None:
                on_status(st)
            state = st.get("state")
            if state == "done":
                return st
            if state in ("failed", "cancelled"):
                raise JobFailed(
                    "job_failed" if state == "failed" else "cancelled",
                    st.get("message") or f"job {job} {state}",
                    job,
                )
            if timeout is not None and time.monotonic() - start > timeout:
                raise TimeoutError(f"job {job} still {state} after {timeout} s")
            time.sleep(poll)

    def fetch(self, asset: str, what: str = "mesh", transport: str = "auto") -> Fetched:
        """The arrays of a stored asset's ``mesh`` or ``gaussian``: through a shared-memory file
        mapped read-only (released when the :class:`Fetched` is closed) or inline."""
        reply = self.request("fetch", {"asset": asset, "what": what, "transport": transport})
        result = reply.result if isinstance(reply.result, dict) else {}
        buf = result.get("buffer")
        if result.get("transport") == "shm":
            if not isinstance(buf, dict) or "path" not in buf or "buffer" not in buf:
                raise ProtocolError("a shm fetch reply must describe its buffer (path, size)")
            try:
                mm = _map_buffer(buf["path"], int(buf.get("size", 0)))
            except (OSError, ValueError, ProtocolError) as e:
                self.release(buf["buffer"])
                if isinstance(e, ProtocolError):
                    raise
                raise ProtocolError(f"cannot map the daemon's buffer {buf['path']}: {e}") from e
            try:
                arrays = {d["name"]: unpack_array(d, mm) for d in reply.arrays}
            except BaseException:
                if hasattr(mm, "close"):
                    try:
                        mm.close()
                    except BufferError:
                        pass
                self.release(buf["buffer"])
                raise
            return Fetched(self, result, arrays, mm if hasattr(mm, "close") else None)
        arrays = {d["name"]: unpack_array(d, reply.binary) for d in reply.arrays}
        return Fetched(self, result, arrays)

    def release(self, buffer: str) -> Any:
        return self.call("release", buffer=buffer)

    def assets_list(self) -> List[Dict[str, Any]]:
        result = self.call("assets_list")
        if isinstance(result, dict):
            return list(result.get("assets") or [])
        return list(result or [])

    def assets_get(self, asset: str) -> Dict[str, Any]:
        return self.call("assets_get", asset=asset)

    def assets_delete(self, asset: str) -> Any:
        return self.call("assets_delete", asset=asset)

    def shutdown(self) -> Any:
        """Asks the daemon to stop. A daemon that closes the connection before its reply has
        come counts as stopping (the reply races the daemon's exit)."""
        try:
            return self.call("shutdown")
        except ProtocolError as e:
            if "closed the connection" not in e.message:
                raise
            return {}
        finally:
            self.close()


# ---------------------------------------------------------------------------------------------
# Starting a daemon


class DaemonProcess:
    """A ``trellisd serve`` this process started. Its output goes to ``log_path``; ``READY
    <address>`` there means it accepts connections. Nothing here blocks unless asked to."""

    def __init__(self, proc: subprocess.Popen, log_path: str, address: str):
        self.proc = proc
        self.log_path = log_path
        self.address = address

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.log_path, "r", encoding="utf-8", errors="replace") as f:
                return "".join(f.readlines()[-lines:]).strip()
        except OSError:
            return ""

    def ready(self) -> bool:
        """True once the daemon printed ``READY``; raises DaemonUnavailable if it has exited."""
        try:
            with open(self.log_path, "r", encoding="utf-8", errors="replace") as f:
                for line in f:
                    if line.startswith("READY "):
                        self.address = line[len("READY "):].strip() or self.address
                        return True
        except OSError:
            pass
        code = self.proc.poll()
        if code is not None:
            raise DaemonUnavailable(
                f"the daemon exited with status {code} before it was ready: "
                f"{self.log_tail() or '(no output)'}"
            )
        return False

    def wait_ready(self, timeout: float = 60.0) -> str:
        start = time.monotonic()
        while not self.ready():
            if time.monotonic() - start > timeout:
                raise DaemonUnavailable(
                    f"the daemon did not report READY within {timeout} s: {self.log_tail()}"
                )
            time.sleep(0.05)
        return self.address

    def stop(self, timeout: float = 10.0) -> Optional[int]:
        """Asks the process to stop (SIGTERM) and waits; kills it after ``timeout``."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_daemon(
    binary: str,
    models: Sequence[str] = (),
    args: Sequence[str] = (),
    address: Optional[str] = None,
    log_path: Optional[str] = None,
    env: Optional[Mapping[str, str]] = None,
) -> DaemonProcess:
    """Starts ``binary serve --model M ... args`` detached from this process (it keeps running
    after the caller exits), its output in ``log_path``. Returns at once; use
    :meth:`DaemonProcess.wait_ready` or poll :meth:`DaemonProcess.ready`."""
    if not binary:
        raise DaemonUnavailable("no daemon binary configured (the path to `trellisd`)")
    if not os.path.isfile(binary):
        raise DaemonUnavailable(f"the daemon binary {binary} does not exist")
    cmd = [binary, "serve"]
    for m in models:
        if m:
            cmd += ["--model", m]
    cmd += list(args)
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    address = address or None
    if address:
        full_env[SOCKET_ENV] = address
    if log_path is None:
        fd, log_path = tempfile.mkstemp(prefix="trellisd-", suffix=".log")
        os.close(fd)
    kwargs: Dict[str, Any] = {}
    if sys.platform == "win32":
        kwargs["creationflags"] = getattr(subprocess, "DETACHED_PROCESS", 0) | getattr(
            subprocess, "CREATE_NEW_PROCESS_GROUP", 0
        )
    else:
        kwargs["start_new_session"] = True
    with open(log_path, "wb") as log:
        try:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=full_env,
                close_fds=True,
                **kwargs,
            )
        except OSError as e:
            raise DaemonUnavailable(f"cannot start {binary}: {e}") from e
    return DaemonProcess(proc, log_path, address or default_address())
