"""A model hub on loopback, for downloads that never reach the internet.

A real HTTP server serves files in the hub's layout, answering what huggingface_hub 2.x asks for
a `snapshot_download`:
- `GET /api/models/{repo}/revision/{rev}`: the commit sha;
- `GET /api/models/{repo}/tree/{sha}?recursive=...`: the file list (no xet hashes, so plain HTTP);
- `HEAD /{repo}/resolve/{sha}/{file}`: X-Repo-Commit, ETag, Content-Length;
- `GET /{repo}/resolve/{sha}/{file}`: the bytes, honouring `Range: bytes=N-` (206).
An unknown repository gets 404 with `X-Error-Code: RepoNotFound`, as the hub does.
Downloads run in a subprocess (`hub_env` is its environment) because huggingface_hub reads
HF_ENDPOINT when imported. The `hub_model_dir` and `hub_mirror` fixtures are in conftest.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

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
    # seconds to pause after each MB sent (0: full speed)
    slow: float = 0.0
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
            if mirror.slow:
                # A slow link: 1 MB at a time, a pause between (a client can stop half-way).
                for offset in range(0, len(body), 1 << 20):
                    try:
                        self.wfile.write(body[offset:offset + (1 << 20)])
                        self.wfile.flush()
                    except OSError:          # the client stopped: what the tests do on purpose
                        self.close_connection = True
                        return
                    request.bytes_sent = min(offset + (1 << 20), len(body))
                    time.sleep(mirror.slow)
                return
            self.wfile.write(body)
            request.bytes_sent = len(body)

        def do_GET(self):
            self._route()

        def do_HEAD(self):
            self._route()

    return Handler


@contextmanager
def serve_mirror(files: dict[str, bytes]) -> Iterator[HubMirror]:
    mirror = HubMirror(HUB_ID, files)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(mirror))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    mirror.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield mirror
    finally:
        server.shutdown()
        server.server_close()


def make_hub_model(folder: Path, stories_hf_dir: Path) -> None:
    """A small Llama (random weights, 23 MB: more than huggingface_hub's 10 MiB download chunk, so
    a broken transfer can resume in the middle) with stories260K's tokenizer, saved in `folder`."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=384, intermediate_size=1024, num_hidden_layers=3,
                         num_attention_heads=6, num_key_value_heads=6, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(stories_hf_dir / name, folder / name)


def hub_env(endpoint: str, offline: bool = False) -> dict[str, str]:
    """The hub settings a download from `endpoint` needs: plain HTTP, short timeouts, no token."""
    env = dict(HF_ENDPOINT=endpoint, HF_HUB_DISABLE_XET="1", HF_HUB_ETAG_TIMEOUT="5",
               HF_HUB_DOWNLOAD_TIMEOUT="5", HF_HUB_DISABLE_TELEMETRY="1", HF_TOKEN="")
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env


def hearth_env(home: Path, endpoint: str, offline: bool = False) -> dict[str, str]:
    """The environment of a `hearth` process with `home` as HEARTH_HOME and the hub at `endpoint`."""
    env = dict(os.environ, HEARTH_HOME=str(home), NO_COLOR="1")
    env.pop("HF_HUB_OFFLINE", None)
    env.update(hub_env(endpoint, offline))
    return env


def hearth(home: Path, *args: str, endpoint: str, offline: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app", *args], env=hearth_env(home, endpoint, offline),
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
