"""Kernel tests run the Triton kernels through the CPU interpreter.

``triton.jit`` decides at decoration time whether a kernel is interpreted, so
TRITON_INTERPRET=1 must be set before ``vllm_respsp_triton`` is imported.  This
conftest sets it; if the package was imported earlier in this process without
it, the run stops rather than silently testing only the references.
"""

import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

if os.environ["TRITON_INTERPRET"] != "1":
    raise pytest.UsageError("tests/kernels needs TRITON_INTERPRET=1 (or unset)")
_dispatch = sys.modules.get("vllm_respsp_triton._dispatch")
if _dispatch is not None and not _dispatch.INTERPRET:
    raise pytest.UsageError(
        "vllm_respsp_triton was imported before TRITON_INTERPRET=1 was set; "
        "run tests/kernels in its own pytest process"
    )
