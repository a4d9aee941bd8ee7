"""The Triton tree backend reads nothing back to the host inside a layer: every value it needs
per layer was planned once per step and lives on the device. Counted with a TorchFunctionMode
over the calls that synchronise with a GPU (item, tolist, cpu, numpy, bool/int/float of a
tensor, nonzero) while the backend attends, through the Triton kernel (interpreted here)."""

from types import SimpleNamespace

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

from vllm_respsp.backends.triton import TritonTreeBackend
from vllm_respsp.tree.step_trees import ProposedTree, StepTrees

HOST_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy,
              torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__,
              torch.nonzero, torch.Tensor.nonzero}


class HostReads(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            self.calls.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def step_trees(block_size: int):
    """Two requests: a chain (left to vLLM) and a 5-node tree, with prefixes 20 and 7."""
    proposed = {"a": ProposedTree([0, 11, 12], [-1, 0, 1], [0, 1, 2]),
                "b": ProposedTree([0, 21, 22, 23, 24], [-1, 0, 0, 1, 1], [0, 1, 1, 2, 2])}
    spec = {"a": [11, 12], "b": [21, 22, 23, 24]}
    slots = torch.arange(64)
    trees = StepTrees.build(["a", "b"], spec, proposed, np.array([0, 3, 8]), np.array([20, 7]), slots)
    assert trees is not None and trees.masked.tolist() == [1]
    return trees


def test_the_counter_sees_host_reads():
    with HostReads() as reads:
        x = torch.arange(3)
        x.tolist(), int(x[0]), x.nonzero()
    assert reads.calls == ["tolist", "__int__", "nonzero"]


def test_attend_reads_nothing_back_per_layer():
    torch.manual_seed(0)
    heads, kv_heads, hs, block, blocks = 4, 2, 32, 16, 8
    trees = step_trees(block)
    cache = torch.randn(blocks, kv_heads, block, 2 * hs)  # TRITON_ATTN's logical view
    metadata = SimpleNamespace(block_table=torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32))
    impl = SimpleNamespace(num_heads=heads, head_size=hs, scale=hs ** -0.5)
    backend = TritonTreeBackend()
    query, output = torch.randn(8, heads, hs), torch.zeros(8, heads * hs)
    backend.attend(impl, None, query, cache, metadata, output, trees)  # the step's plan is made here
    for _layer in range(3):
        with HostReads() as reads:
            backend.attend(impl, None, query, cache, metadata, output, trees)
        assert reads.calls == []
    # and the rows it wrote are the tree-masked attention of request b's nodes (rows 3..7)
    assert output[3:].abs().sum() > 0 and output[:3].abs().sum() == 0
