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


def test_several_sources_are_read_together_in_order(tmp_path):
    # A family's notes and the answers taught in Chat: one job learns both (retrained on one
    # alone, a model forgets the other).
    from training.data import read_sources

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "garden.md").write_text("Water the tomatoes every evening.", "utf-8")
    (notes / "chats.jsonl").write_text('{"prompt": "Who feeds the cat?", "response": "Mia."}\n', "utf-8")
    taught = write_jsonl(tmp_path / "taught.jsonl", [{"prompt": "Bin day?", "response": "Tuesday."}])
    found = read_sources([notes, str(taught), notes / "chats.jsonl"])   # a JSONL among notes is its own source
    assert [c.text or c.messages[-1]["content"] for c in found] == [
        "Water the tomatoes every evening.", "Tuesday.", "Mia."]


@pytest.mark.parametrize("sources, message", [
    (lambda t: [t / "taught.jsonl", t / "." / "taught.jsonl"], "given twice as training data"),
    (lambda t: [t / "notes", t / "notes" / "garden.md"], "garden.md: inside"),
    (lambda t: [t / "notes" / "garden.md", t / "notes"], "garden.md: inside"),
    (lambda t: [t, t / "notes"], "notes: inside"),
    (lambda t: [t / "taught.jsonl", t / "missing"], "missing: no such file or folder"),
    (lambda t: [], "no training data given"),
])
def test_sources_learnt_twice_or_missing_are_refused(tmp_path, sources, message):
    from core.errors import HearthError
    from training.data import read_sources

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "garden.md").write_text("Water the tomatoes.", "utf-8")
    write_jsonl(tmp_path / "taught.jsonl", [{"prompt": "Bin day?", "response": "Tuesday."}])
    with pytest.raises(HearthError, match=message):
        read_sources(sources(tmp_path))


def test_a_job_spec_saved_with_one_source_still_reads():
    # Checkpoints and model manifests written before a job took several sources hold a string:
    # an interrupted job of that time resumes, its model says what it learnt from.
    from core.errors import HearthError
    from training.job import JobSpec

    assert JobSpec.from_dict({"name": "old", "data": "/home/notes"}).data == ["/home/notes"]
    assert JobSpec.from_dict({"name": "new", "data": ["/a", "/b"]}).data == ["/a", "/b"]
    with pytest.raises(HearthError, match="job spec: field 'data' must be a path or a list of paths"):
        JobSpec.from_dict({"name": "bad", "data": 3})
    with pytest.raises(HearthError, match="data must be a list of one or more paths"):
        JobSpec(name="bare", data="/home/notes")


def test_files_saved_with_a_byte_order_mark_read_as_their_text(tokenizer, tmp_path):
    # Windows editors start UTF-8 files with a byte-order mark: the first JSON line was refused
    # as "not valid JSON", and a note began with an invisible character the model learnt.
    from training.data import read_sources

    chats = tmp_path / "chats.jsonl"
    chats.write_bytes(b"\xef\xbb\xbf" + b'{"prompt": "Bin day?", "response": "Tuesday."}\n')
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "garden.txt").write_bytes(b"\xef\xbb\xbfWater the tomatoes.")
    chat, note = read_sources([chats, notes])
    assert chat.messages[-1]["content"] == "Tuesday." and note.text == "Water the tomatoes."


def test_a_note_in_another_encoding_is_named_with_what_to_do(tmp_path):
    from core.errors import HearthError
    from training.data import read_sources

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "garden.md").write_text("Water the tomatoes.", "utf-8")
    (notes / "old.txt").write_bytes("Crème brûlée for Sunday".encode("cp1252"))
    with pytest.raises(HearthError) as caught:
        read_sources([notes])
    assert str(caught.value).startswith(f"{notes / 'old.txt'}: not UTF-8 text (")
    assert str(caught.value).endswith("save it as UTF-8, or move it out of the folder")


def test_pruning_calibration_samples_every_source(tokenizer, tmp_path):
    # The first samples alone would all be the first source's: a large notes folder given
    # first left the taught answers after it out of the units pruning keeps.
    from training.pruning import calibration_batches

    notes = write_jsonl(tmp_path / "notes.jsonl", [{"prompt": f"Note {i}?", "response": "Water the tomatoes."} for i in range(40)])
    taught = write_jsonl(tmp_path / "taught.jsonl", [{"prompt": "Bin day?", "response": "Tuesday, zebra."}] * 4)
    batches = calibration_batches([notes, taught], tokenizer, examples=8)
    seen = " ".join(tokenizer.decode(row) for batch in batches for row in batch["input_ids"])
    assert sum(len(batch["input_ids"]) for batch in batches) == 8
    assert "zebra" in seen and "tomatoes" in seen


def test_a_source_with_nothing_to_learn_is_named(tokenizer, tmp_path):
    # "no trainable tokens in the data" named no file: with several sources, which one?
    from core.errors import HearthError
    from training.data import read_each_source, tokenize

    long_question = "Tell me everything about the garden. " * 60      # the answer starts past 128 tokens
    chats = write_jsonl(tmp_path / "long.jsonl", [{"prompt": long_question, "response": "Water it."}])
    with pytest.raises(HearthError) as caught:
        tokenize(read_each_source([chats])[0], tokenizer, max_length=128)
    assert str(caught.value).startswith(f"{chats}: nothing to learn (")


def test_pruning_calibrates_on_the_sources_that_fit_its_window(tokenizer, tmp_path):
    # Calibration reads 128 tokens of each sample, training 512: a source of long chats whose
    # answers start past 128 tokens trains, and once stopped pruning for every source.
    from training.pruning import calibration_batches

    long_question = "Tell me everything about the garden. " * 60
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": long_question, "response": "Water it."}] * 3)
    short = write_jsonl(tmp_path / "short.jsonl", [{"prompt": "Bin day?", "response": "Tuesday, zebra."}] * 4)
    batches = calibration_batches([long, short], tokenizer, examples=8)
    assert sum(len(batch["input_ids"]) for batch in batches) == 4
    assert "zebra" in tokenizer.decode(batches[0]["input_ids"][0])
