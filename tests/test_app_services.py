"""The app's headless services on real parts: a real history file and llama.cpp with stories260K."""

from __future__ import annotations

import threading

import pytest

from app_helpers import stories_chat, write_config


def _chat_service(stories_gguf):
    from app.services.chat import ChatService
    from core.config import load_config
    from serving.history import History

    return ChatService(History(), load_config())


@pytest.mark.slow
def test_closing_mid_stream_stops_the_answer_before_freeing_the_model(hearth_home, stories_gguf):
    """Quitting while an answer streams: the stream stops and is stored as stopped, and the
    model is freed only after (freeing it under a running decode crashes the process)."""
    write_config(hearth_home, chat=stories_chat(stories_gguf, max_tokens=400))
    chat = _chat_service(stories_gguf)
    conv = chat.new_conversation()
    chat.add_user_message(conv.id, "Once upon a time")
    first_piece, release = threading.Event(), threading.Event()
    result = {}

    def on_piece(piece: str) -> None:
        first_piece.set()
        release.wait(5)        # hold the stream here until close() has been called

    def answer() -> None:
        result["reply"] = chat.reply(conv.id, on_piece)

    worker = threading.Thread(target=answer)
    worker.start()
    assert first_piece.wait(30)
    closer = threading.Thread(target=chat.close)
    closer.start()
    closer.join(0.5)
    assert closer.is_alive()          # close() waits for the stream...
    release.set()
    worker.join(30)
    closer.join(30)
    assert not closer.is_alive()      # ...which stops at its next piece
    reply = result["reply"]
    assert reply.stopped and reply.message.stopped and reply.pieces == 1
    assert chat.history.messages(conv.id)[-1].stopped


def test_models_service_lists_the_bundled_model_as_active(hearth_home):
    from app.services.models import ModelsService
    from core.config import load_config
    from core.errors import HearthError

    models = ModelsService(load_config())
    rows = {m.name: m for m in models.models()}
    assert rows["smollm2-135m"].active and rows["smollm2-135m"].has_gguf and rows["smollm2-135m"].kind == "base"
    with pytest.raises(HearthError, match="base model"):
        models.delete("smollm2-135m")
    with pytest.raises(HearthError, match="unknown model"):
        models.set_active("no-such-model")


def test_train_plan_is_checked_and_the_data_statement_is_plain(hearth_home, tmp_path):
    from app.services.train import TrainPlan, TrainService, where_data_goes
    from core.errors import HearthError

    service = TrainService("living-room")
    data = tmp_path / "chats.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n')
    plan = TrainPlan("family", [str(data)], "smollm2-135m", devices=["living-room"])
    service.check(plan)
    assert "stays on this device (living-room)" in where_data_goes(plan, "living-room")
    assert "kitchen" in where_data_goes(TrainPlan("f", [str(data)], "m", devices=["living-room", "kitchen"]),
                                        "living-room")
    for bad, field in ((TrainPlan("a b", [str(data)], "m"), "name"), (TrainPlan("", [str(data)], "m"), "name"),
                       # a catalog name would hide the trained model behind the catalog's for ever
                       (TrainPlan("smollm2-360m", [str(data)], "m"), "name 'smollm2-360m' is a catalog model's name"),
                       (TrainPlan("f", [], "m"), "data"),
                       (TrainPlan("f", [str(data)], "m", epochs=0), "epochs"),
                       (TrainPlan("f", [str(tmp_path / "nope.jsonl")], "m"), "nope.jsonl")):
        with pytest.raises(HearthError, match=field):
            service.check(bad)


def test_devices_service_without_a_mesh_shows_this_device(hearth_home):
    import os

    from app.services.devices import DevicesService

    [row] = DevicesService().devices()
    assert row.this_device and row.paired and row.cores == os.cpu_count() and row.memory_gb > 0


def test_a_model_not_on_this_device_is_refused_not_downloaded(hearth_home, tmp_path, monkeypatch):
    """Chat and Train in the app never start a download behind the screen (the hub is made
    unreachable: a download attempt would fail with another message)."""
    from app.services.train import TrainPlan, TrainService
    from core.errors import HearthError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_config(hearth_home, chat={"model": "smollm2-360m"})
    with pytest.raises(HearthError, match="smollm2-360m is not on this device yet: download it on the Models"):
        _chat_service(None).engine("smollm2-360m")
    data = tmp_path / "chats.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n')
    with pytest.raises(HearthError, match="smollm2-360m is not on this device yet"):
        TrainService("here").check(TrainPlan("family", [str(data)], "smollm2-360m"))


@pytest.mark.slow
def test_chat_answers_with_a_model_as_it_is_on_disk_after_a_retrain_or_an_export(hearth_home):
    """Teach in Chat, retrain the active model, chat on: the chat kept the model it had loaded
    (the old weights) until the app restarted; an export's GGUF ran only after a restart too.
    A change that does not load left the chat with no model at all; now the one before answers
    and the screen is told (`take_notes`)."""
    from app.services.chat import ChatService
    from app.services.train import TrainPlan, TrainService
    from core.config import load_config
    from core.paths import hearth_paths
    from serving.history import History
    from tests.training_helpers import HOUSEHOLD, tiny_llama_dir
    from training.engines import LlamaCppEngine
    from training.export_gguf import export_model
    from training.model_store import MANIFEST

    def train() -> None:
        TrainService("here").run(TrainPlan("family", [str(HOUSEHOLD / "train.jsonl")], str(tiny_llama_dir()),
                                           method="lora", epochs=1), lambda status: None)

    train()
    chat = ChatService(History(), load_config())
    first = chat.engine("family")
    assert chat.engine("family") is first                  # loaded once while nothing changes
    assert chat.take_notes() == []
    train()
    retrained = chat.engine("family")
    assert retrained is not first
    assert [note.loaded for note in chat.take_notes()] == [True]
    export_model("family", "q8_0")
    exported = chat.engine("family")
    assert isinstance(exported, LlamaCppEngine) and not isinstance(retrained, LlamaCppEngine)
    assert chat.engine("family") is exported
    (hearth_paths().models_dir / "family" / MANIFEST).write_text("{not json")
    assert chat.engine("family") is exported               # the one before still answers
    notes = chat.take_notes()
    assert [note.loaded for note in notes] == [True, False] and "did not load" in notes[1].text
    assert chat.loaded_model == "family"
    chat.close()
