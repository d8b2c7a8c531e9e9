"""Hub downloads against a real HTTP server on loopback that serves files in the hub's layout.

The server answers what huggingface_hub 2.x asks for a `snapshot_download`:
- `GET /api/models/{repo}/revision/{rev}`: the commit sha;
- `GET /api/models/{repo}/tree/{sha}?recursive=...`: the file list (no xet hashes, so plain HTTP);
- `HEAD /{repo}/resolve/{sha}/{file}`: X-Repo-Commit, ETag, Content-Length;
- `GET /{repo}/resolve/{sha}/{file}`: the bytes, honouring `Range: bytes=N-` (206).
An unknown repository gets 404 with `X-Error-Code: RepoNotFound`, as the hub does.
The downloads run in a subprocess because huggingface_hub reads HF_ENDPOINT when imported.
Nothing here reaches the internet.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
HUB_ID = "hearth-test/tiny-stories"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    bytes_sent: int = 0


@dataclass
class HubMirror:
    """A minimal hub: one repository, a request log, and a fault to inject."""

    repo_id: str
    files: dict[str, bytes]
    log: list[Request] = field(default_factory=list)
    # file name -> bytes to send on the first GET before dropping the connection
    drop_after: dict[str, int] = field(default_factory=dict)
    # files whose GET answers 500 (the hub failing)
    failing: set[str] = field(default_factory=set)
    url: str = ""

    def gets(self, name: str) -> list[Request]:
        return [r for r in self.log if r.method == "GET" and r.path.endswith("/resolve/" + COMMIT + "/" + name)]


def _etag(name: str, data: bytes) -> str:
    if name.endswith(".safetensors"):  # LFS files: the hub's ETag is their sha256
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git blob id


def _handler(mirror: HubMirror):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep pytest output clean
            pass

        def _json(self, body, status=200, headers=None):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _not_found(self):
            self._json({"error": "Repository not found"}, 404, {"X-Error-Code": "RepoNotFound"})

        def _route(self):
            request = Request(self.command, self.path, self.headers.get("Range"))
            mirror.log.append(request)
            path = self.path.split("?")[0]
            m = re.fullmatch(r"/api/models/(.+)/revision/([^/]+)", path)
            if m:
                if m.group(1) != mirror.repo_id:
                    return self._not_found()
                return self._json({
                    "id": mirror.repo_id, "modelId": mirror.repo_id, "sha": COMMIT, "private": False,
                    "siblings": [{"rfilename": n} for n in mirror.files],
                })
            m = re.fullmatch(r"/api/models/(.+)/tree/([^/]+)", path)
            if m:
                if m.group(1) != mirror.repo_id:
                    return self._not_found()
                entries = []
                for name, data in mirror.files.items():
                    entry = {"type": "file", "path": name, "size": len(data), "oid": _etag("x", data)}
                    if name.endswith(".safetensors"):
                        entry["lfs"] = {"oid": _etag(name, data), "size": len(data), "pointerSize": 134}
                    entries.append(entry)
                return self._json(entries)
            m = re.fullmatch(r"/(.+)/resolve/([^/]+)/(.+)", path)
            if m and m.group(1) == mirror.repo_id and m.group(3) in mirror.files:
                return self._file(request, m.group(3))
            return self._not_found()

        def _file(self, request: Request, name: str):
            if name in mirror.failing and self.command == "GET":
                return self._json({"error": "Internal Error"}, 500)
            data = mirror.files[name]
            start = 0
            if request.range:
                start = int(re.fullmatch(r"bytes=(\d+)-\d*", request.range).group(1))
            body = data[start:]
            self.send_response(206 if start else 200)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("ETag", f'"{_etag(name, data)}"')
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("Accept-Ranges", "bytes")
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if self.command == "HEAD":
                return
            cut = mirror.drop_after.pop(name, None)
            if cut is not None:
                # A broken connection in the middle of the file: send part of it, then hang up.
                self.wfile.write(body[:cut])
                self.wfile.flush()
                request.bytes_sent = cut
                self.close_connection = True
                self.connection.shutdown(2)
                return
            self.wfile.write(body)
            request.bytes_sent = len(body)

        def do_GET(self):
            self._route()

        def do_HEAD(self):
            self._route()

    return Handler


@pytest.fixture(scope="module")
def hub_model_dir(stories_hf_dir: Path, tmp_path_factory) -> Path:
    """A small Llama (random weights, 23 MB: more than huggingface_hub's 10 MiB download chunk, so
    a broken transfer can resume in the middle) with stories260K's tokenizer."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=384, intermediate_size=1024, num_hidden_layers=3,
                         num_attention_heads=6, num_key_value_heads=6, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2)
    folder = tmp_path_factory.mktemp("hub-model")
    LlamaForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(stories_hf_dir / name, folder / name)
    return folder


@pytest.fixture
def hub_mirror(hub_model_dir: Path):
    files = {p.name: p.read_bytes() for p in sorted(hub_model_dir.iterdir()) if p.is_file()}
    mirror = HubMirror(HUB_ID, files)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(mirror))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    mirror.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield mirror
    server.shutdown()
    server.server_close()


def hearth(home: Path, *args: str, endpoint: str, offline: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, HEARTH_HOME=str(home), HF_ENDPOINT=endpoint, HF_HUB_DISABLE_XET="1",
               HF_HUB_ETAG_TIMEOUT="5", HF_HUB_DOWNLOAD_TIMEOUT="5", HF_HUB_DISABLE_TELEMETRY="1",
               HF_TOKEN="", NO_COLOR="1")
    env.pop("HF_HUB_OFFLINE", None)
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([sys.executable, "-m", "app", *args], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)


def test_hub_download_shows_progress_and_resumes_a_broken_transfer(
    hub_mirror: HubMirror, hub_model_dir: Path, tmp_path, monkeypatch
):
    weights = hub_mirror.files["model.safetensors"]
    cut = 15 * 1024 * 1024
    hub_mirror.drop_after["model.safetensors"] = cut
    home = tmp_path / "home"

    done = hearth(home, "models", "pull", HUB_ID, endpoint=hub_mirror.url)
    assert done.returncode == 0, done.stderr
    folder = Path(done.stdout.strip())
    assert (folder / "model.safetensors").read_bytes() == weights
    assert str(folder).startswith(str(home / "cache" / "hub"))
    # the byte counter of the progress bar (tqdm, on stderr) reached the whole size
    assert "Downloading bytes" in done.stderr and "100%" in done.stderr, done.stderr

    # The first transfer broke after `cut` bytes; the retry asked for the rest only.
    first, second = hub_mirror.gets("model.safetensors")
    assert first.range is None and first.bytes_sent == cut
    start = int(re.fullmatch(r"bytes=(\d+)-", second.range).group(1))
    assert 0 < start <= cut  # huggingface_hub resumes from the last 10 MiB chunk it wrote
    assert second.bytes_sent == len(weights) - start

    # The downloaded model resolves without the server and loads into transformers.
    monkeypatch.setenv("HEARTH_HOME", str(home))
    import torch
    from transformers import AutoModelForCausalLM

    from training.model_store import load_torch, resolve

    ref = resolve(HUB_ID)
    assert ref.kind == "hf_dir" and ref.path == folder
    model, tokenizer = load_torch(ref)
    ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
    source = AutoModelForCausalLM.from_pretrained(hub_model_dir)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, source(ids).logits)

    # Offline mode uses the cache and sends nothing.
    requests_before = len(hub_mirror.log)
    offline = hearth(home, "models", "pull", HUB_ID, endpoint=hub_mirror.url, offline=True)
    assert offline.returncode == 0 and Path(offline.stdout.strip()) == folder, offline.stderr
    assert len(hub_mirror.log) == requests_before

    # A second pull finds everything in the cache: no file is fetched again.
    requests_before = len(hub_mirror.log)
    again = hearth(home, "models", "pull", HUB_ID, endpoint=hub_mirror.url)
    assert again.returncode == 0 and Path(again.stdout.strip()) == folder
    assert not [r for r in hub_mirror.log[requests_before:] if r.method == "GET" and "/resolve/" in r.path]


def test_interrupted_download_keeps_finished_files(hub_mirror: HubMirror, tmp_path):
    """A run that fails part-way keeps the files it finished; the next run fetches only the rest."""
    hub_mirror.failing.add("model.safetensors")
    home = tmp_path / "home"
    broken = hearth(home, "models", "pull", HUB_ID, endpoint=hub_mirror.url)
    assert broken.returncode == 2
    # Besides the progress bars, stderr holds one line naming the model and the failure.
    errors = [line for line in broken.stderr.splitlines() if line.startswith("hearth:")]
    assert len(errors) == 1 and HUB_ID in errors[0] and "500" in errors[0], broken.stderr
    finished = {r.path.rsplit("/", 1)[1] for r in hub_mirror.log if r.method == "GET" and r.bytes_sent}
    assert "config.json" in finished and "model.safetensors" not in finished

    hub_mirror.failing.clear()
    log_start = len(hub_mirror.log)
    done = hearth(home, "models", "pull", HUB_ID, endpoint=hub_mirror.url)
    assert done.returncode == 0, done.stderr
    assert (Path(done.stdout.strip()) / "model.safetensors").read_bytes() == hub_mirror.files["model.safetensors"]
    fetched_again = {r.path.rsplit("/", 1)[1] for r in hub_mirror.log[log_start:]
                     if r.method == "GET" and "/resolve/" in r.path}
    assert fetched_again == {"model.safetensors"}


def test_unknown_hub_id_is_one_line_error(hub_mirror: HubMirror, tmp_path):
    done = hearth(tmp_path / "home", "models", "pull", "hearth-test/no-such-model", endpoint=hub_mirror.url)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "hearth-test/no-such-model" in lines[0] and "no such model" in lines[0]
    assert hub_mirror.url in lines[0]


def test_offline_mode_is_one_line_error(hub_mirror: HubMirror, tmp_path):
    done = hearth(tmp_path / "home", "models", "pull", HUB_ID, endpoint=hub_mirror.url, offline=True)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert HUB_ID in lines[0] and "offline mode" in lines[0] and "HF_HUB_OFFLINE" in lines[0]
    assert not hub_mirror.log  # offline means no request at all


def test_unreachable_hub_is_one_line_error(tmp_path):
    import socket

    with socket.socket() as s:  # a loopback port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = hearth(tmp_path / "home", "models", "pull", HUB_ID, endpoint=f"http://127.0.0.1:{port}")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert HUB_ID in lines[0] and "cannot be reached" in lines[0]


def test_catalog_name_downloads_its_hub_id_and_becomes_available(hub_mirror: HubMirror, tmp_path):
    # The mirror serves the small model under the catalog entry's hub id.
    hub_mirror.repo_id = "HuggingFaceTB/SmolLM2-360M-Instruct"
    home = tmp_path / "home"
    done = hearth(home, "models", "pull", "smollm2-360m", endpoint=hub_mirror.url)
    assert done.returncode == 0, done.stderr
    assert "models--HuggingFaceTB--SmolLM2-360M-Instruct" in done.stdout

    listed = hearth(home, "models", "list", "--json", endpoint=hub_mirror.url, offline=True)
    row = next(r for r in json.loads(listed.stdout)["models"] if r["name"] == "smollm2-360m")
    assert row["available"] and row["path"] == done.stdout.strip()
