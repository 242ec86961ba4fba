"""The Python client's framing and array handling, against the byte layout of
`ipc-protocol/src/lib.rs` and a small fake daemon on a Unix socket (no trellisd needed)."""

from __future__ import annotations

import json
import os
import socket
import struct
import threading

import numpy as np
import pytest

import client as trellis


def test_header_layout_matches_the_rust_crate():
    # The Rust test header_round_trip_and_layout: json 300, binary 70 000.
    b = trellis.encode_header(300, 70_000)
    assert len(b) == 20
    assert b[0:4] == b"TRLS"
    assert struct.unpack("<H", b[4:6])[0] == trellis.PROTOCOL_VERSION == 1
    assert struct.unpack("<H", b[6:8])[0] == 0
    assert struct.unpack("<I", b[8:12])[0] == 300
    assert b[12] == 70_000 & 0xFF
    assert struct.unpack("<Q", b[12:20])[0] == 70_000
    assert trellis.decode_header(b) == (300, 70_000)


@pytest.mark.parametrize(
    "patch, words",
    [
        ((0, b"X"), "magic"),
        ((4, b"\x09"), "version 9"),
        ((6, b"\x01"), "flags"),
    ],
)
def test_header_errors_are_specific(patch, words):
    b = bytearray(trellis.encode_header(10, 10))
    at, value = patch
    b[at:at + len(value)] = value
    with pytest.raises(trellis.ProtocolError, match=words):
        trellis.decode_header(bytes(b))


def test_header_limits_and_truncation():
    b = trellis.encode_header(10, 10)
    with pytest.raises(trellis.ProtocolError, match="truncated"):
        trellis.decode_header(b[:7])
    with pytest.raises(trellis.ProtocolError, match="JSON section of 10 bytes"):
        trellis.decode_header(b, max_json=5)
    with pytest.raises(trellis.ProtocolError, match="binary section of 10 bytes"):
        trellis.decode_header(b, max_binary=5)
    huge = b[:12] + struct.pack("<Q", 2**64 - 1)
    with pytest.raises(trellis.ProtocolError, match="exceeds"):
        trellis.decode_header(huge)


def test_arrays_are_aligned_like_binary_builder():
    arrays = {
        "a": np.array([1, 2, 3], dtype=np.uint8),
        "b": np.array([1.5, -2.0], dtype=np.float32),
        "c": np.arange(6, dtype=">i4").reshape(2, 3),  # big-endian input is converted
    }
    descs, pieces, total = trellis.pack_arrays(arrays)
    blob = b"".join(bytes(p) for p in pieces)
    assert len(blob) == total
    # Same offsets as the Rust BinaryBuilder test: "b" at 16.
    assert [d["offset"] for d in descs] == [0, 16, 32]
    assert [d["dtype"] for d in descs] == ["u8", "f32", "i32"]
    assert descs[2]["shape"] == [2, 3]
    for d in descs:
        got = trellis.unpack_array(d, blob)
        np.testing.assert_array_equal(got, arrays[d["name"]])
    assert struct.unpack("<f", blob[20:24])[0] == -2.0
    with pytest.raises(TypeError, match="cannot be sent"):
        trellis.pack_arrays({"x": np.zeros(2, dtype=np.complex64)})


def test_array_descriptors_are_bounds_and_alignment_checked():
    blob = bytes(32)
    d = {"name": "x", "dtype": "f32", "shape": [4], "offset": 16}
    assert trellis.unpack_array(d, blob).shape == (4,)
    with pytest.raises(trellis.ProtocolError, match="outside"):
        trellis.unpack_array(dict(d, shape=[5]), blob)
    with pytest.raises(trellis.ProtocolError, match="multiple of the element size"):
        trellis.unpack_array(dict(d, offset=2, shape=[1]), blob)
    with pytest.raises(trellis.ProtocolError, match="unknown dtype"):
        trellis.unpack_array(dict(d, dtype="f128"), blob)
    with pytest.raises(trellis.ProtocolError, match="bad shape"):
        trellis.unpack_array(dict(d, shape=[-1]), blob)


def test_bf16_is_widened_to_f32():
    values = np.array([1.0, -2.5, 3.140625], dtype=np.float32)
    bf16 = (values.view(np.uint32) >> 16).astype("<u2").tobytes()
    got = trellis.unpack_array({"name": "h", "dtype": "bf16", "shape": [3], "offset": 0}, bf16)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, values)


# ---------------------------------------------------------------------------------------------
# A fake daemon: reads frames with the client's own header checks, answers with a handler.


def _read_exact(conn, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _frame(message, binary=b""):
    body = json.dumps(message).encode()
    return trellis.encode_header(len(body), len(binary)) + body + binary


class FakeDaemon:
    def __init__(self, path, handler):
        self.path = path
        self.handler = handler
        self.requests = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(4)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                while True:
                    head = _read_exact(conn, 20)
                    if head is None:
                        break
                    jl, bl = trellis.decode_header(head)
                    msg = json.loads(_read_exact(conn, jl))
                    binary = _read_exact(conn, bl) if bl else b""
                    self.requests.append((msg, binary))
                    if msg["op"] == "hello":
                        conn.sendall(_frame({"id": msg["id"], "status": "ok", "result": {
                            "protocol": 1, "daemon": "fake", "capabilities": ["hello", "fetch"],
                            "limits": {"max_json": 1 << 20, "max_binary": 1 << 24}}}))
                        continue
                    out = self.handler(msg, binary)
                    if out is None:
                        break  # hang up
                    conn.sendall(out)

    def close(self):
        self.sock.close()


@pytest.fixture
def fake(tmp_path):
    made = []

    def make(handler):
        d = FakeDaemon(str(tmp_path / f"fake{len(made)}.sock"), handler)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


def test_request_uploads_arrays_and_reads_inline_replies(fake):
    def echo(msg, binary):
        # Echo the uploaded arrays back inline, after two progress replies.
        prog = b"".join(_frame({"id": msg["id"], "status": "progress", "job": 1,
                                "stage": "sparse_structure", "step": k, "total": 2})
                        for k in (1, 2))
        return prog + _frame({"id": msg["id"], "status": "ok", "result": {"n": len(binary)},
                              "arrays": msg["arrays"]}, binary)

    d = fake(echo)
    seen = []
    with trellis.Client(d.path) as c:
        assert c.info["daemon"] == "fake" and c.capable("fetch") and not c.capable("edit")
        assert c.max_upload == 1 << 24
        verts = np.random.default_rng(0).random((5, 3), dtype=np.float32)
        faces = np.array([[0, 1, 2], [2, 3, 4]], dtype=np.uint32)
        reply = c.request("variant", {"text": "x", "skip": None},
                          {"vertices": verts, "faces": faces}, on_progress=seen.append)
        np.testing.assert_array_equal(reply.array("vertices"), verts)
        np.testing.assert_array_equal(reply.array("faces"), faces)
        assert reply.result["n"] == 16 * 4 + 24  # vertices 60 B padded to 64, faces 24 B
    msg, _ = d.requests[-1]
    assert msg["op"] == "variant" and "skip" not in msg and msg["text"] == "x"
    assert msg["id"] > d.requests[0][0]["id"]
    assert [p["step"] for p in seen] == [1, 2]


def test_error_replies_raise_with_code_and_keep_the_connection(fake):
    def handler(msg, binary):
        if msg["op"] == "status":
            return _frame({"id": msg["id"], "status": "error", "code": "not_found",
                           "message": "no job 9"})
        return _frame({"id": msg["id"], "status": "ok", "result": {}})

    d = fake(handler)
    with trellis.Client(d.path) as c:
        with pytest.raises(trellis.TrellisError) as e:
            c.status(9)
        assert e.value.code == "not_found" and e.value.message == "no job 9"
        assert c.connected
        assert c.ping() == {}


def test_broken_streams_raise_protocol_errors_and_disconnect(fake):
    def wrong_id(msg, binary):
        return _frame({"id": msg["id"] + 100, "status": "ok"})

    with trellis.Client(fake(wrong_id).path) as c:
        with pytest.raises(trellis.ProtocolError, match="does not match"):
            c.ping()
        assert not c.connected

    def truncated(msg, binary):
        return _frame({"id": msg["id"], "status": "ok", "result": {}})[:-3]

    d = fake(lambda m, b: truncated(m, b) if m["op"] == "ping" else None)
    c = trellis.Client(d.path, timeout=0.5)
    with pytest.raises(trellis.ProtocolError, match="in time"):
        c.ping()
    assert not c.connected

    def hang_up(msg, binary):
        return None

    c = trellis.Client(fake(hang_up).path, timeout=5)
    with pytest.raises(trellis.ProtocolError, match="closed the connection"):
        c.ping()


def test_missing_daemon_is_unavailable(tmp_path):
    with pytest.raises(trellis.DaemonUnavailable, match="trellisd serve"):
        trellis.Client(str(tmp_path / "nobody.sock"))


def test_shm_fetch_maps_the_file_and_releases_it(fake, tmp_path):
    shm = tmp_path / "shm"
    shm.mkdir()
    verts = np.arange(12, dtype=np.float32).reshape(4, 3)
    descs, pieces, total = trellis.pack_arrays({"vertices": verts})

    def handler(msg, binary):
        if msg["op"] == "fetch":
            path = shm / "buf1"
            path.write_bytes(b"".join(bytes(p) for p in pieces))
            return _frame({"id": msg["id"], "status": "ok", "result": {
                "asset": msg["asset"], "what": msg["what"], "transport": "shm",
                "buffer": {"buffer": "buf1", "path": str(path), "size": total}},
                "arrays": descs})
        if msg["op"] == "release":
            (shm / msg["buffer"]).unlink()
            return _frame({"id": msg["id"], "status": "ok", "result": {}})
        return _frame({"id": msg["id"], "status": "error", "code": "unknown_op", "message": ""})

    d = fake(handler)
    with trellis.Client(d.path) as c:
        with c.fetch("a1", "mesh") as f:
            assert f.transport == "shm" and f.buffer == "buf1"
            v = f["vertices"]
            np.testing.assert_array_equal(v, verts)
            assert not v.flags.writeable
            kept = v.copy()
        assert f.closed
        with pytest.raises(ValueError, match="released"):
            f["vertices"]
        np.testing.assert_array_equal(kept, verts)
    assert [m["op"] for m, _ in d.requests] == ["hello", "fetch", "release"]
    assert list(shm.iterdir()) == []


def test_shm_reply_with_a_short_file_is_refused_and_released(fake, tmp_path):
    path = tmp_path / "short"
    path.write_bytes(bytes(8))

    def handler(msg, binary):
        if msg["op"] == "fetch":
            return _frame({"id": msg["id"], "status": "ok", "result": {
                "transport": "shm", "buffer": {"buffer": "b", "path": str(path), "size": 64}},
                "arrays": [{"name": "x", "dtype": "f32", "shape": [16], "offset": 0}]})
        return _frame({"id": msg["id"], "status": "ok", "result": {}})

    d = fake(handler)
    with trellis.Client(d.path) as c:
        with pytest.raises(trellis.ProtocolError, match="holds 8 bytes"):
            c.fetch("a", "mesh")
    assert [m["op"] for m, _ in d.requests] == ["hello", "fetch", "release"]


def test_image_inputs(tmp_path):
    p = tmp_path / "x.png"
    p.write_bytes(b"\x89PNG")
    img = np.zeros((4, 5, 4), np.uint8)
    refs, arrays = trellis.image_inputs([str(p), b"\x89PNG...", img])
    assert refs == [{"path": str(p)}, {"encoded": "image1"}, {"array": "image2"}]
    assert arrays["image1"].dtype == np.uint8 and arrays["image2"].shape == (4, 5, 4)
    with pytest.raises(ValueError, match="uint8"):
        trellis.image_inputs([np.zeros((4, 5), np.float32)])


def test_default_address_follows_the_override(monkeypatch, tmp_path):
    monkeypatch.setenv("TRELLIS_RS_SOCKET", str(tmp_path / "s"))
    assert trellis.default_address() == str(tmp_path / "s")
    monkeypatch.delenv("TRELLIS_RS_SOCKET")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert trellis.default_address() == os.path.join(str(tmp_path), "trellis-rs", "daemon.sock")


def test_an_unreadable_frame_error_with_id_0_raises_and_disconnects(fake):
    def handler(msg, binary):
        return _frame({"id": 0, "status": "error", "code": "too_large",
                       "message": "binary section over the limit"})

    c = trellis.Client(fake(handler).path)
    with pytest.raises(trellis.TrellisError) as e:
        c.ping()
    assert e.value.code == "too_large" and not c.connected


def test_shutdown_tolerates_a_daemon_that_exits_before_replying(fake):
    d = fake(lambda msg, binary: None if msg["op"] == "shutdown" else _frame(
        {"id": msg["id"], "status": "ok", "result": {}}))
    c = trellis.Client(d.path)
    assert c.shutdown() == {}
    assert not c.connected
