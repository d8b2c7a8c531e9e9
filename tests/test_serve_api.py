"""The local API (`hearth serve`): the official openai client against a real server on 127.0.0.1,
backed by llama.cpp running the bundled SmolLM2-135M."""

from __future__ import annotations

import http.client
import json

import pytest

from serving.api import HOST, MAX_BODY_BYTES, ApiSettings, ChatServer, ensure_token
from training.catalog import find_entry
from training.engines import LlamaCppEngine, SamplingSettings

TOKEN = "test-token-0123456789"


@pytest.fixture(scope="module")
def server():
    gguf = find_entry("smollm2-135m").bundled_path()
    assert gguf is not None, "the bundled SmolLM2 GGUF is not installed"
    engine = LlamaCppEngine(str(gguf), context_length=1024, threads=2, name="smollm2-135m")
    srv = ChatServer(engine, ApiSettings(TOKEN, "smollm2-135m", 0, SamplingSettings(temperature=0.0, max_tokens=48)))
    srv.start()
    yield srv
    srv.stop()
    engine.close()


def _raw(server, method: str, path: str, body: bytes | None = None, token: str | None = TOKEN,
         headers: dict | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(HOST, server.port, timeout=60)
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    if token is not None:
        all_headers["Authorization"] = f"Bearer {token}"
    conn.request(method, path, body=body, headers=all_headers)
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, json.loads(data) if data else {}


def _client(server, token: str = TOKEN):
    from openai import OpenAI

    return OpenAI(base_url=server.url, api_key=token, max_retries=0, timeout=120)


def test_server_listens_on_loopback_only(server):
    assert server.httpd.server_address[0] == "127.0.0.1"


@pytest.mark.slow
def test_openai_client_gets_a_streamed_answer(server):
    stream = _client(server).chat.completions.create(
        model="smollm2-135m",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        stream=True,
        max_tokens=24,
    )
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert len([p for p in pieces if p]) > 3, pieces   # really streamed, piece by piece
    assert "Paris" in "".join(pieces)


@pytest.mark.slow
def test_openai_client_gets_a_whole_answer_and_models(server):
    client = _client(server)
    reply = client.chat.completions.create(
        model="smollm2-135m",
        messages=[{"role": "system", "content": "Answer briefly."},
                  {"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24,
    )
    assert "Paris" in reply.choices[0].message.content
    assert reply.usage.completion_tokens > 0
    assert [m.id for m in client.models.list().data] == ["smollm2-135m"]


def test_wrong_token_gets_401(server):
    from openai import AuthenticationError

    with pytest.raises(AuthenticationError) as caught:
        _client(server, "wrong-token").chat.completions.create(
            model="smollm2-135m", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 401
    status, body = _raw(server, "GET", "/v1/models", token=None)
    assert status == 401 and "token" in body["error"]["message"]


def test_malformed_requests_get_4xx_with_a_reason_and_the_server_keeps_serving(server):
    cases = [
        (b"{not json", 400, "not valid JSON"),
        (json.dumps({"model": "smollm2-135m"}).encode(), 400, "messages"),
        (json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(), 400, "role"),
        (json.dumps({"messages": [{"role": "user", "content": 5}]}).encode(), 400, "content"),
        (json.dumps({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}).encode(), 400, "temperature"),
        (json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": -3}).encode(), 400, "max_tokens"),
        (json.dumps({"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}).encode(), 404, "not served"),
    ]
    for body, status, reason in cases:
        got, payload = _raw(server, "POST", "/v1/chat/completions", body)
        assert got == status, (body, payload)
        assert reason in payload["error"]["message"], payload
    assert _raw(server, "POST", "/v1/nowhere", b"{}")[0] == 404
    assert _raw(server, "DELETE", "/v1/models")[0] == 405
    assert _raw(server, "GET", "/v1/chat/completions")[0] == 405
    # An oversized body is refused from its Content-Length alone, before any of it is read; the
    # client declares it and waits (a client that kept sending would meet a closed socket).
    conn = http.client.HTTPConnection(HOST, server.port, timeout=60)
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("Authorization", f"Bearer {TOKEN}")
    conn.putheader("Content-Length", str(MAX_BODY_BYTES + 1))
    conn.endheaders()
    response = conn.getresponse()
    payload = json.loads(response.read())
    conn.close()
    assert response.status == 413 and "limit" in payload["error"]["message"]
    # Still serving: a good request after all the bad ones.
    got, payload = _raw(server, "POST", "/v1/chat/completions", json.dumps(
        {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4}).encode())
    assert got == 200 and payload["choices"][0]["message"]["content"]
    assert payload["choices"][0]["finish_reason"] == "length"      # cut at 4 tokens, and says so


def test_a_client_that_hangs_up_mid_stream_frees_the_server(server):
    import socket

    body = json.dumps({"messages": [{"role": "user", "content": "Write a long story about a dragon."}],
                       "stream": True, "max_tokens": 400}).encode()
    sock = socket.create_connection((HOST, server.port), timeout=30)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode()
                 + b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode()
                 + b"\r\n\r\n" + body)
    assert b"200" in sock.recv(200)
    sock.close()
    # The next request is answered: the abandoned reply released the model.
    got, payload = _raw(server, "POST", "/v1/chat/completions", json.dumps(
        {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}).encode())
    assert got == 200


def test_serve_token_is_made_and_saved_once(hearth_home):
    from core.config import load_config

    token, made = ensure_token()
    assert made and len(token) >= 32
    assert load_config().get("serve.token") == token
    assert ensure_token() == (token, False)


def test_server_refuses_to_start_without_a_token():
    from core.errors import HearthError

    with pytest.raises(HearthError, match="authentication"):
        ChatServer(object(), ApiSettings("", "m", 0))   # never reaches the engine


def test_stopping_mid_reply_cancels_it_and_waits_for_it_before_the_engine_closes():
    # Closing llama.cpp under a thread that is decoding with it crashes the process (it once
    # took this suite down at teardown); stop() must cancel the reply and wait for its end.
    import socket

    gguf = find_entry("smollm2-135m").bundled_path()
    engine = LlamaCppEngine(str(gguf), context_length=1024, threads=2, name="smollm2-135m")
    srv = ChatServer(engine, ApiSettings(TOKEN, "smollm2-135m", 0, SamplingSettings(temperature=0.0, max_tokens=48)))
    srv.start()
    body = json.dumps({"messages": [{"role": "user", "content": "Write a long story about a dragon."}],
                       "stream": True, "max_tokens": 800}).encode()
    sock = socket.create_connection((HOST, srv.port), timeout=30)
    try:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode()
                     + b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode()
                     + b"\r\n\r\n" + body)
        received = b""
        while received.count(b'"content"') < 4:       # the reply is streaming words
            received += sock.recv(4096)
        srv.stop()
        # stop() returned: the reply is over, so its stream is complete before the engine goes.
        sock.settimeout(5)
        while chunk := sock.recv(65536):
            received += chunk
    finally:
        sock.close()
        engine.close()
    assert received.rstrip().endswith(b"data: [DONE]")
    assert received.count(b'"content"') < 400        # cut short, not decoded to the end


def test_usage_counts_real_tokens_with_the_torch_engine():
    """The torch engine (PAC and PEFT models, HF folders) once lacked the token counters, so the
    API counted words, and the prompt without its chat template; and "length" was guessed by
    counting the reply's text again, which can tokenise shorter than what was generated."""
    from tests.training_helpers import tiny_llama_dir
    from training.engines import ChatMessage, open_engine

    engine = open_engine(str(tiny_llama_dir()), context_length=512, threads=2)
    assert type(engine).__name__ == "TorchEngine"
    srv = ChatServer(engine, ApiSettings(TOKEN, "tiny", 0, SamplingSettings(temperature=0.0, max_tokens=6)))
    srv.start()
    try:
        messages = [{"role": "user", "content": "Tell me about the garden, please."}]
        status, body = _raw(srv, "POST", "/v1/chat/completions", json.dumps(
            {"model": "tiny", "messages": messages, "max_tokens": 6, "temperature": 0}).encode())
    finally:
        srv.stop()
    assert status == 200, body
    reply = body["choices"][0]["message"]["content"]
    prompt = engine.prompt_tokens([ChatMessage("user", messages[0]["content"])])
    assert body["usage"]["prompt_tokens"] == len(prompt) > engine.count_tokens(messages[0]["content"])
    assert body["usage"]["completion_tokens"] == engine.count_tokens(reply) > 0
    # Random weights run on past 6 tokens: the reply is cut, and says so (its text, a run of new
    # lines, tokenises shorter: the old guess said "stop").
    assert body["choices"][0]["finish_reason"] == "length"
    engine.close()


@pytest.mark.slow
def test_a_served_model_retrained_or_exported_is_loaded_again_before_the_next_reply(hearth_home):
    """`hearth serve family` kept the engine it started with: after the family retrained the
    model it went on answering with the old weights (and an export's GGUF never ran) until it
    was restarted. A model that changes on disk into something that does not load leaves the
    server answering with the one it had."""
    from core.paths import hearth_paths
    from serving.reload import Reload
    from tests.training_helpers import HOUSEHOLD, tiny_llama_dir
    from training.engines import open_engine
    from training.export_gguf import export_model
    from training.job import JobSpec
    from training.model_store import MANIFEST
    from training.trainer import train

    def retrain() -> None:
        train(JobSpec("family", [str(HOUSEHOLD / "train.jsonl")], str(tiny_llama_dir()), method="lora", epochs=1))

    def load():
        return open_engine("family", context_length=512, threads=2)

    def ask() -> dict:
        status, body = _raw(srv, "POST", "/v1/chat/completions", json.dumps(
            {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 3}).encode())
        assert status == 200, body
        return body

    retrain()
    notes: list[str] = []
    reload = Reload("family", load, lambda message, loaded: notes.append(message))
    first = reload.open()
    srv = ChatServer(first, ApiSettings(TOKEN, "family", 0), reload)
    srv.start()
    try:
        ask()
        assert srv.engine is first and notes == []          # nothing changed: nothing loaded
        retrain()
        ask()
        retrained = srv.engine
        assert retrained is not first and "loaded again" in notes[-1]
        export_model("family", "q8_0")
        ask()
        assert type(srv.engine).__name__ == "LlamaCppEngine" != type(retrained).__name__
        exported = srv.engine
        (hearth_paths().models_dir / "family" / MANIFEST).write_text("{not json")
        assert ask()["usage"]["completion_tokens"] > 0     # still answering, with the export
        assert srv.engine is exported and "did not load" in notes[-1]
    finally:
        srv.stop()
        srv.engine.close()
