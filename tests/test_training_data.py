"""Personal data loading (training/data.py): four input shapes, the chat template, assistant-only
labels, and bad lines named by file and line."""

from __future__ import annotations

import pytest

from tests.training_helpers import HOUSEHOLD, smollm2_tokenizer, write_jsonl


@pytest.fixture(scope="module")
def tokenizer():
    return smollm2_tokenizer()


def _trained_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != -100])


def test_chat_messages_train_on_assistant_tokens_only(tokenizer):
    from training.data import load_examples

    examples = load_examples(HOUSEHOLD / "train.jsonl", tokenizer)
    assert len(examples) == 20
    first = examples[0]
    assert _trained_text(tokenizer, first) == "The guest Wi-Fi password is lemon-otter-42.<|im_end|>\n"
    # the prompt is the chat template up to the generation prompt, as the chat engine renders it
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the guest Wi-Fi password?"}],
                                           tokenize=False, add_generation_prompt=True)
    n = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert first.input_ids[:n] == tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert all(label == -100 for label in first.labels[:n])
    assert first.source.endswith("train.jsonl:1")


def test_prompt_response_guanaco_and_multi_turn_chats(tokenizer, tmp_path):
    from training.data import load_examples

    data = write_jsonl(tmp_path / "mixed.jsonl", [
        {"prompt": "Who feeds the cat?", "response": "Mia feeds the cat."},
        {"text": "### Human: Where are the keys? ### Assistant: On the hook. ### Human: Which hook? ### Assistant: By the door."},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
                      {"role": "assistant", "content": "Goodbye."}]},
    ])
    pair, guanaco, chat = load_examples(data, tokenizer)
    assert _trained_text(tokenizer, pair) == "Mia feeds the cat.<|im_end|>\n"
    assert _trained_text(tokenizer, guanaco) == "On the hook.<|im_end|>\nBy the door.<|im_end|>\n"
    assert _trained_text(tokenizer, chat) == "Hello.<|im_end|>\nGoodbye.<|im_end|>\n"
    assert "Be brief." in tokenizer.decode(chat.input_ids)


def test_notes_folder_is_chunked_for_causal_lm(tokenizer, tmp_path):
    from training.data import load_examples

    notes = tmp_path / "notes"
    (notes / "kitchen").mkdir(parents=True)
    (notes / "garden.md").write_text("# Garden\nWater the tomatoes every evening. " * 40, "utf-8")
    (notes / "kitchen" / "recipes.txt").write_text("Grandma's soup needs three carrots.", "utf-8")
    (notes / "ignored.pdf").write_bytes(b"%PDF")
    examples = load_examples(notes, tokenizer, max_length=64)
    assert len(examples) > 3
    assert all(len(e.input_ids) <= 64 for e in examples)
    assert all(e.labels == e.input_ids for e in examples)
    assert any("three carrots" in tokenizer.decode(e.input_ids) for e in examples)


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ('{"prompt": "hi"}', "field 'response'"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "role must be"),
    ('{"messages": [{"role": "user", "content": "only a question"}]}', "no assistant message"),
    ('{"text": "no markers here"}', "### Human"),
    ('{"something": 1}', "expected a 'messages'"),
])
def test_bad_line_names_file_and_line(tmp_path, line, message):
    from core.errors import HearthError
    from training.data import read_conversations

    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok", "response": "fine"}\n\n' + line + "\n", "utf-8")
    with pytest.raises(HearthError) as caught:
        read_conversations(path)
    assert f"{path}:3:" in str(caught.value) and message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_bad_data_trains_nothing(hearth_home, tmp_path, capsys):
    from app.cli import main
    from core.paths import hearth_paths
    from tests.training_helpers import tiny_llama_dir

    path = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "a", "response": "b"}])
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"prompt": "a"}\n')
    code = main(["train", "--data", str(path), "--model", str(tiny_llama_dir()), "--out", "broken", "--epochs", "1"])
    assert code == 2
    assert f"{path}:2:" in capsys.readouterr().err
    assert not (hearth_paths().models_dir / "broken").exists()
