"""Per-step draft-tree operations: Triton kernels beside PyTorch references.

Every public function dispatches in one place (:func:`use_triton`): the Triton
kernel for CUDA tensors or under ``TRITON_INTERPRET=1`` (set before import),
else the PyTorch reference of the same name plus ``_ref``, which is the CPU
production path and the test oracle.  Batch layout, local indexing and the
ancestor-bitmask packing are documented in :mod:`vllm_respsp_triton.tree_metadata`.
"""

from ._dispatch import HAS_TRITON, INTERPRET, use_triton
from .accept import accept_greedy, accept_greedy_ref
from .compact_kv import compact_kv, compact_kv_ref, compaction_slots
from .tree_attention import tree_attention, tree_attention_ref
from .tree_metadata import (
    BITS_PER_WORD,
    MAX_TREE_NODES,
    TreeMetadata,
    build_tree_metadata,
    build_tree_metadata_ref,
    num_words,
    unpack_ancestor_bits,
)

__all__ = [
    "BITS_PER_WORD",
    "HAS_TRITON",
    "INTERPRET",
    "MAX_TREE_NODES",
    "TreeMetadata",
    "accept_greedy",
    "accept_greedy_ref",
    "build_tree_metadata",
    "build_tree_metadata_ref",
    "compact_kv",
    "compact_kv_ref",
    "compaction_slots",
    "num_words",
    "tree_attention",
    "tree_attention_ref",
    "unpack_ancestor_bits",
    "use_triton",
]
