"""EAGLE-3 draft head for the testbed model (SmolLM2-135M-Instruct): data, model, training,
export and evaluation. `python -m vllm_respsp.draft` runs the whole pipeline; the head it
produced ships in vllm_respsp/assets/smollm2-135m-eagle3/ (see its MODEL_CARD.md)."""

from pathlib import Path

SHIPPED_HEAD_NAME = "smollm2-135m-eagle3"


def shipped_head_path() -> Path:
    """Folder of the shipped EAGLE-3 head (config.json + model.safetensors), for
    speculative_config={"method": "eagle3", "model": str(shipped_head_path()), ...}."""
    return Path(__file__).resolve().parents[1] / "assets" / SHIPPED_HEAD_NAME


def shipped_head_if_present() -> str | None:
    """The shipped head's folder as a string, or None when no head has been exported there."""
    path = shipped_head_path()
    return str(path) if (path / "config.json").is_file() else None
