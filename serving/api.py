"""The local API: OpenAI's chat-completions protocol over HTTP, on 127.0.0.1 only.

Other programs on this computer talk to the household's model as they would to OpenAI:
`POST /v1/chat/completions` (streamed as server-sent events, or not) and `GET /v1/models`.
Every request needs `Authorization: Bearer <serve.token>` (made and saved on first serve).
Bad requests get a 4xx with an OpenAI-shaped JSON error saying why; the server keeps serving.
One reply is generated at a time (one model in memory); a client that hangs up mid-stream
cancels its reply. A served model retrained or exported while the server runs is loaded again
before the next reply (serving/reload.py).

What is not here: the engines (training/engines.py), chat history (serving/history.py).
"""

from __future__ import annotations

import hmac
import json
import secrets
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from core.errors import HearthError
from serving.reload import Reload
from training.engines import ChatEngine, ChatMessage, ReplyEnd, SamplingSettings

HOST = "127.0.0.1"           # never another interface: the API is for this computer only
MAX_BODY_BYTES = 1 << 20     # a chat request is text; 1 MiB is far more than a context window
READ_TIMEOUT_S = 30          # a client that stops sending mid-request is dropped
ROLES = ("system", "user", "assistant")


class ApiError(Exception):
    """A request the API refuses: HTTP status, OpenAI error type, message, offending field."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.param = status, kind, param


@dataclass
class ChatRequest:
    """A validated `POST /v1/chat/completions` body."""

    messages: list[ChatMessage]
    settings: SamplingSettings
    stream: bool = False
    model: str = ""


@dataclass
class ApiSettings:
    token: str
    model_id: str
    port: int = 0                         # 0: any free port (tests)
    defaults: SamplingSettings = field(default_factory=SamplingSettings)


def ensure_token() -> tuple[str, bool]:
    """The bearer token of `serve.token`, made and saved to the config on first use.

    Returns (token, newly_made)."""
    from core.config import load_config, set_value

    token = str(load_config().get("serve.token"))
    if token:
        return token, False
    token = secrets.token_urlsafe(32)
    set_value("serve.token", token)
    return token, True


def parse_chat_request(body: Any, defaults: SamplingSettings, model_id: str) -> ChatRequest:
    """Validate an OpenAI chat-completions body, or raise ApiError naming the bad field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model", model_id)
    if not isinstance(model, str):
        raise ApiError(400, "'model' must be a string", param="model")
    if model not in (model_id, ""):
        raise ApiError(404, f"model '{model}' is not served here (this server serves '{model_id}')",
                       kind="invalid_request_error", param="model")
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    messages = [_parse_message(i, m) for i, m in enumerate(raw)]
    settings = SamplingSettings(
        temperature=_number(body, "temperature", defaults.temperature, 0.0, 2.0),
        top_p=_number(body, "top_p", defaults.top_p, 0.0, 1.0),
        repeat_penalty=defaults.repeat_penalty,
        max_tokens=defaults.max_tokens,
        seed=None,
        stop=list(defaults.stop),
    )
    for key in ("max_completion_tokens", "max_tokens"):
        if body.get(key) is not None:
            value = body[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ApiError(400, f"'{key}' must be a positive whole number", param=key)
            settings.max_tokens = value
            break
    seed = body.get("seed")
    if seed is not None:
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ApiError(400, "'seed' must be a whole number", param="seed")
        settings.seed = seed
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
            raise ApiError(400, "'stop' must be a string or a list of up to 4 non-empty strings", param="stop")
        settings.stop = list(stops)
    n = body.get("n", 1)
    if n != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", param="stream")
    return ChatRequest(messages, settings, stream, model or model_id)


def _parse_message(index: int, message: Any) -> ChatMessage:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise ApiError(400, f"{where} must be an object with 'role' and 'content'", param=where)
    role = message.get("role")
    if role == "developer":   # OpenAI's newer name for the system role
        role = "system"
    if role not in ROLES:
        raise ApiError(400, f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}", param=f"{where}.role")
    content = message.get("content")
    if isinstance(content, list):   # content parts: only text is understood
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"{where}.content: only text parts are supported", param=f"{where}.content")
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        raise ApiError(400, f"{where}.content must be a string", param=f"{where}.content")
    return ChatMessage(role, content)


def _number(body: dict, key: str, default: float, lo: float, hi: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not lo <= value <= hi:
        raise ApiError(400, f"'{key}' must be a number from {lo} to {hi}", param=key)
    return float(value)


class ChatServer:
    """An OpenAI-compatible HTTP server for one engine, bound to 127.0.0.1."""

    def __init__(self, engine: ChatEngine, settings: ApiSettings, reload: Reload | None = None):
        """`reload`: the engine's model followed on disk (None: `engine` answers until the end)."""
        if not settings.token:
            raise HearthError("serve.token is empty: the local API never runs without authentication")
        self.engine, self.settings, self._reload = engine, settings, reload
        self.generate_lock = threading.Lock()   # one reply at a time: one model in memory
        handler = type("Handler", (_Handler,), {"server_ref": self})
        self.httpd = ThreadingHTTPServer((HOST, settings.port), handler)
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None
        self._replies: set[threading.Event] = set()   # the cancel events of replies in progress
        self._idle = threading.Condition()
        self._stopping = False

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/v1"

    def start(self) -> None:
        """Serve on a background thread (tests, the app)."""
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="hearth-api", daemon=True)
        self._thread.start()

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    @contextmanager
    def turn(self, cancel: threading.Event) -> Iterator[ChatEngine | None]:
        """The engine, to one reply at a time; None when the server stopped while it waited.
        Everything a reply asks of the engine (tokens counted too) happens inside its turn: a
        reload closes the engine it replaces."""
        with self.generate_lock:
            yield None if cancel.is_set() else self._current_engine()

    def _current_engine(self) -> ChatEngine:
        if self._reload is not None:
            self.engine = self._reload.fresh(self.engine)
        return self.engine

    @contextmanager
    def reply(self):
        """A reply in progress, as its cancel event: `stop` cancels it and waits for it to end."""
        cancel = threading.Event()
        with self._idle:
            if self._stopping:
                cancel.set()
            self._replies.add(cancel)
        try:
            yield cancel
        finally:
            with self._idle:
                self._replies.discard(cancel)
                self._idle.notify_all()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop serving; replies in progress are cancelled and waited for, because the engine is
        closed after this returns and llama.cpp must not be freed under a thread decoding with it."""
        self.httpd.shutdown()
        with self._idle:
            self._stopping = True
            for cancel in self._replies:
                cancel.set()
            self._idle.wait_for(lambda: not self._replies, timeout)
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)


class _Handler(BaseHTTPRequestHandler):
    server_ref: ChatServer
    protocol_version = "HTTP/1.1"
    timeout = READ_TIMEOUT_S
    server_version = "hearth"

    def log_message(self, format: str, *args: Any) -> None:
        # Request lines only (never bodies: they hold the family's words); quiet by default.
        pass

    # --- plumbing ------------------------------------------------------------------------------

    def _send_json(self, status: int, payload: Any, extra: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, error: ApiError) -> None:
        extra = {"WWW-Authenticate": "Bearer"} if error.status == 401 else {}
        if error.status in (400, 413):
            extra["Connection"] = "close"   # the rest of a refused body may still be on the wire
            self.close_connection = True
        self._send_json(error.status, {"error": {
            "message": str(error), "type": error.kind, "param": error.param, "code": error.status}}, extra)

    def _authorised(self) -> bool:
        header = self.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        expected = self.server_ref.settings.token
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), expected.encode())

    def _guard(self) -> bool:
        if self._authorised():
            return True
        self.close_connection = True
        self._send_error(ApiError(401, "missing or wrong bearer token (see serve.token in the Hearth config)",
                                  kind="authentication_error"))
        return False

    def _read_json(self) -> Any:
        length_text = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked" or length_text is None:
            raise ApiError(411 if length_text is None else 400, "send the body with a Content-Length header")
        try:
            length = int(length_text)
        except ValueError:
            raise ApiError(400, "Content-Length is not a number") from None
        if length < 0:
            raise ApiError(400, "Content-Length is negative")
        if length > MAX_BODY_BYTES:
            raise ApiError(413, f"request body of {length} bytes is over the {MAX_BODY_BYTES}-byte limit")
        raw = self.rfile.read(length)
        if len(raw) < length:
            raise ApiError(400, "request body ended early")
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ApiError(400, f"request body is not valid JSON ({str(exc).splitlines()[0][:120]})") from None

    # --- routes --------------------------------------------------------------------------------

    def do_GET(self) -> None:  # noqa: N802 (the standard library's naming)
        if not self._guard():
            return
        model_id = self.server_ref.settings.model_id
        card = {"id": model_id, "object": "model", "created": 0, "owned_by": "hearth"}
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/v1/models":
            self._send_json(200, {"object": "list", "data": [card]})
        elif path == f"/v1/models/{model_id}":
            self._send_json(200, card)
        elif path.startswith("/v1/models/"):
            self._send_error(ApiError(404, f"no model '{path.rsplit('/', 1)[-1]}' here", param="model"))
        elif path == "/v1/chat/completions":
            self._send_error(ApiError(405, "use POST for /v1/chat/completions"))
        else:
            self._send_error(ApiError(404, f"no such endpoint: {path or '/'}"))

    def do_POST(self) -> None:  # noqa: N802
        if not self._guard():
            return
        path = self.path.split("?", 1)[0].rstrip("/")
        try:
            if path == "/v1/models":
                raise ApiError(405, "use GET for /v1/models")
            if path != "/v1/chat/completions":
                raise ApiError(404, f"no such endpoint: {path or '/'}")
            settings = self.server_ref.settings
            request = parse_chat_request(self._read_json(), settings.defaults, settings.model_id)
        except ApiError as error:
            self._send_error(error)
            return
        with self.server_ref.reply() as cancel:
            if request.stream:
                self._stream(request, cancel)
            else:
                self._complete(request, cancel)

    def _refuse_method(self) -> None:
        if self._guard():
            self._send_error(ApiError(405, f"method {self.command} is not allowed here"))

    do_PUT = do_DELETE = do_PATCH = _refuse_method  # noqa: N815

    # --- generation ----------------------------------------------------------------------------

    def _pieces(self, request: ChatRequest, cancel: threading.Event, end: ReplyEnd):
        with self.server_ref.turn(cancel) as engine:
            if engine is not None:
                yield from engine.stream(request.messages, request.settings, cancel, end)

    def _complete(self, request: ChatRequest, cancel: threading.Event) -> None:
        end = ReplyEnd()
        text, prompt_tokens, completion_tokens = "", 0, 0
        try:
            with self.server_ref.turn(cancel) as engine:
                if engine is not None:
                    text = "".join(engine.stream(request.messages, request.settings, cancel, end))
                    completion_tokens = int(engine.count_tokens(text))
                    prompt_tokens = len(engine.prompt_tokens(request.messages))
        except HearthError as exc:
            self._send_error(ApiError(500, str(exc), kind="server_error"))
            return
        self._send_json(200, {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": end.finish}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        })

    def _stream(self, request: ChatRequest, cancel: threading.Event) -> None:
        ident = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())

        def event(delta: dict, finish: str | None = None) -> bytes:
            chunk = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": request.model,
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return b"data: " + json.dumps(chunk).encode("utf-8") + b"\n\n"

        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")   # the end of the stream is the end of the body
        self.end_headers()
        self.close_connection = True
        end = ReplyEnd()
        pieces = self._pieces(request, cancel, end)
        try:
            self.wfile.write(event({"role": "assistant", "content": ""}))
            self.wfile.flush()
            for piece in pieces:
                self.wfile.write(event({"content": piece}))
                self.wfile.flush()
            self.wfile.write(event({}, end.finish))
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            cancel.set()   # the client hung up: stop generating for it
        except HearthError as exc:
            error = {"error": {"message": str(exc), "type": "server_error", "param": None, "code": 500}}
            try:
                self.wfile.write(b"data: " + json.dumps(error).encode("utf-8") + b"\n\n")
            except OSError:
                pass
        finally:
            cancel.set()
            pieces.close()   # frees the generation lock at once, even when the client left
