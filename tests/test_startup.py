"""respsp's start-up on GPU platforms, with the platform faked (no CUDA vLLM runs here): the
attention backend it selects or refuses, the CUDA-graph mode it forces, the vLLM version check."""

import logging

import pytest

from vllm_respsp.backends import startup
from vllm_respsp.config import RespspConfigError
from vllm_respsp.patches import speculative_config, version


class FakePlatform:
    def __init__(self, kind: str):
        self.kind, self.device_name = kind, kind

    def is_cpu(self):
        return self.kind == "cpu"

    def is_cuda(self):
        return self.kind == "cuda"

    def is_rocm(self):
        return self.kind == "rocm"


def engine_args(fixture_models, **kwargs):
    from vllm.engine.arg_utils import EngineArgs

    spec = {"method": "respsp", "model": str(fixture_models["successor_head"]),
            "shape": {"total_tokens": 8, "depth": 4, "top_k": 2}}
    return EngineArgs(model=str(fixture_models["successor"]), speculative_config=spec, max_model_len=256,
                      **kwargs)


@pytest.fixture
def on_cuda(monkeypatch):
    monkeypatch.setattr(speculative_config, "current_platform", lambda: FakePlatform("cuda"))


def test_cuda_without_a_chosen_backend_gets_triton_attn_and_piecewise_graphs(fixture_models, on_cuda, caplog):
    from vllm.config.compilation import CUDAGraphMode

    args = engine_args(fixture_models)
    with caplog.at_level(logging.INFO, logger="vllm_respsp"):
        config = args.create_engine_config()
    assert config.speculative_config.respsp is not None
    assert config.attention_config.backend.name == "TRITON_ATTN"
    assert args.compilation_config.cudagraph_mode == CUDAGraphMode.PIECEWISE
    logged = [r.getMessage() for r in caplog.records if r.name == "vllm_respsp"]
    assert any("TRITON_ATTN selected" in m for m in logged) and any("PIECEWISE" in m for m in logged)


@pytest.mark.parametrize("mode", ["FULL", "FULL_AND_PIECEWISE", "FULL_DECODE_ONLY"])
def test_full_cuda_graphs_become_piecewise(fixture_models, on_cuda, mode):
    from vllm.config.compilation import CUDAGraphMode

    args = engine_args(fixture_models, attention_backend="TRITON_ATTN",
                       compilation_config={"cudagraph_mode": mode})
    decisions = startup.configure_engine(args, FakePlatform("cuda"))
    assert args.compilation_config.cudagraph_mode == CUDAGraphMode.PIECEWISE
    assert decisions[0] == "attention backend TRITON_ATTN (chosen by the user)"
    assert f"was {mode}" in decisions[1]


def test_flash_attn_chosen_by_the_user_is_kept(fixture_models, on_cuda):
    """FLASH_ATTN reads its KV cache as TRITON_ATTN does (tests/triton_layout_job.py): kept."""
    args = engine_args(fixture_models, attention_backend="FLASH_ATTN")
    config = args.create_engine_config()
    assert config.attention_config.backend.name == "FLASH_ATTN"
    decisions = startup.configure_engine(args, FakePlatform("cuda"))
    assert decisions[0] == "attention backend FLASH_ATTN (chosen by the user)"


def test_compilation_without_graph_splitting_turns_graphs_off(fixture_models):
    from vllm.config.compilation import CUDAGraphMode

    args = engine_args(fixture_models, compilation_config={"mode": 0})
    decisions = startup.configure_engine(args, FakePlatform("rocm"))
    assert args.compilation_config.cudagraph_mode == CUDAGraphMode.NONE and "off" in decisions[1]
    eager = engine_args(fixture_models, enforce_eager=True)
    assert startup.configure_engine(eager, FakePlatform("cuda"))[1] == "CUDA graphs off (enforce_eager)"


def test_an_unsupported_backend_is_refused_naming_it_and_the_supported_ones(fixture_models, on_cuda):
    args = engine_args(fixture_models, attention_backend="FLASHINFER")
    allowed = r"allowed: \['CPU_ATTN', 'TRITON_ATTN', 'FLASH_ATTN'\]"
    with pytest.raises(RespspConfigError, match=r"attention_backend=FLASHINFER: .*" + allowed):
        args.create_engine_config()


def test_an_unsupported_platform_is_refused(fixture_models, monkeypatch):
    monkeypatch.setattr(speculative_config, "current_platform", lambda: FakePlatform("tpu"))
    with pytest.raises(RespspConfigError, match="CPU, CUDA and ROCm platforms; this platform is 'tpu'"):
        engine_args(fixture_models).create_engine_config()


def test_cpu_is_left_to_vllm(fixture_models):
    args = engine_args(fixture_models)
    assert startup.configure_engine(args, FakePlatform("cpu")) == []
    assert args.attention_config.backend is None


@pytest.mark.parametrize("text, ok", [("0.32.0", True), ("0.32.3+cpu", True), ("0.33.0", False),
                                      ("0.31.2", False), ("1.0.0", False), ("dev", False)])
def test_version_lines(text, ok):
    assert version.is_supported(text) is ok


def test_an_unsupported_vllm_refuses_respsp_and_leaves_the_rest(fixture_models, monkeypatch, caplog):
    """On another vLLM: one warning, no patch but the refusal, `method: respsp` refused clearly,
    every other speculative config passed to vLLM unchanged."""
    from vllm.engine.arg_utils import EngineArgs

    monkeypatch.setattr(version, "vllm_version", lambda: "0.40.1")
    with caplog.at_level(logging.WARNING, logger="vllm_respsp"):
        assert version.check_version() is False
    assert sum("0.40.1 is not supported" in r.getMessage() for r in caplog.records) == 1
    refusal = version.RefuseRespsp()
    seen = []
    wrapped = refusal.replacement(lambda args, *a, **k: seen.append(args.speculative_config) or "vllm's")
    with pytest.raises(RespspConfigError, match=r"supports vLLM 0\.32\.x; this is vLLM 0\.40\.1"):
        wrapped(engine_args(fixture_models))
    eagle = EngineArgs(model="m", speculative_config={"method": "eagle3", "model": "h"})
    assert wrapped(eagle) == "vllm's" and seen == [{"method": "eagle3", "model": "h"}]
    monkeypatch.setenv("VLLM_RESPSP_ALLOW_ANY_VLLM", "1")
    assert version.check_version() is True
