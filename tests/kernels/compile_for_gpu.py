"""Compile every kernel for a GPU target without a GPU (catches errors the
interpreter lets through: loop-carried types, unsupported ops, dtypes).

Run as a script in a process WITHOUT TRITON_INTERPRET; prints one line per
variant and exits non-zero on the first failure.
"""

import os
import sys
import time

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run without TRITON_INTERPRET"
# The source folder itself (installed, it is `vllm_respsp_triton`): this script also runs
# from a bare checkout, on a GPU machine with nothing installed.
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from vllm_respsp_triton.accept import _accept_greedy_kernel  # noqa: E402
from vllm_respsp_triton.compact_kv import _compact_kv_kernel  # noqa: E402
from vllm_respsp_triton.tree_attention import _tree_attention_kernel  # noqa: E402
from vllm_respsp_triton.tree_metadata import _tree_metadata_kernel  # noqa: E402


def signature(fn, types, constexprs):
    sig = {}
    for name in fn.arg_names:
        sig[name] = "constexpr" if name in constexprs else types.get(name, "i32")
    return sig


def variants():
    yield "tree_metadata", _tree_metadata_kernel, {
        "parents_ptr": "*i32", "cu_nodes_ptr": "*i32", "ancestor_bits_ptr": "*i32",
        "depths_ptr": "*i32", "first_child_ptr": "*i32", "next_sibling_ptr": "*i32",
    }, {"BLOCK_I": 32, "BLOCK_J": 32, "WORDS_P2": 8}, 4
    yield "accept_greedy", _accept_greedy_kernel, {
        "draft_tokens_ptr": "*i64", "target_argmax_ptr": "*i64", "first_child_ptr": "*i32",
        "next_sibling_ptr": "*i32", "cu_nodes_ptr": "*i32", "accepted_len_ptr": "*i32",
        "accepted_nodes_ptr": "*i32", "bonus_token_ptr": "*i64",
    }, {}, 1
    for dtype in ("bf16", "fp16"):
        yield f"compact_kv_{dtype}", _compact_kv_kernel, {
            "layer_base_ptr": "*i64", "any_layer_ptr": f"*{dtype}", "src_slots_ptr": "*i64",
            "dst_slots_ptr": "*i64", "stride_plane": "i64", "stride_block": "i64",
        }, {"NUM_PLANES": 2, "HEAD_SIZE": 128, "ROW_SIZE": 1024, "PAGE": 16,
            "COPIES_P2": 8, "BLOCK_ROW": 1024}, 4
    attn_types = {"q_ptr": "*T", "k_cache_ptr": "*T", "v_cache_ptr": "*T", "out_ptr": "*T",
                  "block_table_ptr": "*i32", "prefix_lens_ptr": "*i32", "cu_nodes_ptr": "*i32",
                  "ancestor_bits_ptr": "*i32", "scale_log2e": "fp32"}
    for dtype, head, group, block_q, block_n, precision in (
        ("bf16", 128, 4, 32, 32, "tf32"), ("bf16", 128, 4, 4, 64, "tf32"),
        ("fp16", 64, 3, 16, 64, "tf32"), ("fp32", 128, 4, 32, 32, "ieee"),
    ):
        types = {k: v.replace("T", dtype) for k, v in attn_types.items()}
        group_p2 = 1 << (group - 1).bit_length()
        yield f"tree_attention_{dtype}_d{head}_g{group}_q{block_q}", _tree_attention_kernel, types, {
            "GROUP": group, "GROUP_P2": group_p2, "BLOCK_Q": block_q, "BLOCK_N": block_n,
            "HEAD": head, "HEAD_P2": head, "PAGE": 16, "PRECISION": precision, "DOT_FP32": False,
        }, 8 if block_q * group_p2 >= 128 else 4


def main():
    target = GPUTarget("cuda", int(os.environ.get("COMPILE_SM", "90")), 32)
    for name, fn, types, constexprs, num_warps in variants():
        start = time.time()
        src = ASTSource(fn=fn, signature=signature(fn, types, constexprs), constexprs=constexprs)
        compiled = triton.compile(src, target=target, options={"num_warps": num_warps})
        assert "cubin" in compiled.asm or "ptx" in compiled.asm
        print(f"ok {name} ({time.time() - start:.1f}s)", flush=True)


if __name__ == "__main__":
    main()
