"""The shipped shape policies: one per kind of CPU, picked for the CPU respsp runs on.

What a draft costs next to a decode step follows the CPU's matrix units. With AMX tiles the
head's and the verifier's small matmuls are cheap, and the policy trained on that CPU's cost
profile drafts chains that do not pay on a CPU with AVX-512 alone: there it ran at 0.92x /
0.85x the best configuration at 4 in flight (MT-Bench / HumanEval,
benchmarks/results/throughput-20261206m). So each kind has its own measured cost profile and
its own policy, and `make policy` trains the one of the CPU it runs on.

    python -m vllm_respsp.policy.shipped [kind|policy|profile]   # for the Makefile
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

POLICY_ASSETS = Path(__file__).resolve().parents[1] / "assets" / "policy"


@dataclass(frozen=True)
class ShippedPolicy:
    """The policy trained for the testbed model and its head on one kind of CPU."""

    cpu_kind: str
    folder: str  # under vllm_respsp/assets/policy/
    profile: str  # its cost profile, in vllm_respsp/policy/profiles/

    @property
    def path(self) -> Path:
        return POLICY_ASSETS / self.folder / "bandit.json"


# The AMX names predate the split (their files are quoted in committed results).
SHIPPED = {
    "amx": ShippedPolicy("amx", "smollm2-135m-cpu", "cpu-smollm2-135m-measured"),
    "avx512": ShippedPolicy("avx512", "smollm2-135m-cpu-avx512", "cpu-avx512-smollm2-135m-measured"),
}


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo is not there or has none)."""
    if not cpuinfo.is_file():
        return set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def cpu_kind(flags: set[str] | None = None) -> str:
    """"amx" with AMX tiles, otherwise "avx512": a CPU with neither is nearer the AVX-512 one
    (drafting costs it at least as much next to a step), so it gets that policy."""
    flags = cpu_flags() if flags is None else flags
    return "amx" if "amx_tile" in flags else "avx512"


def shipped_policy(kind: str | None = None) -> ShippedPolicy:
    kind = cpu_kind() if kind is None else kind
    if kind not in SHIPPED:
        raise ValueError(f"cpu kind {kind!r}: allowed {list(SHIPPED)}")
    return SHIPPED[kind]


def shipped_policy_if_present(kind: str | None = None) -> str | None:
    """This CPU's shipped policy file for the testbed model and its head, if shipped."""
    path = shipped_policy(kind).path
    return str(path) if path.is_file() else None


def main(argv: list[str]) -> None:
    what = argv[0] if argv else "kind"
    chosen = shipped_policy()
    answers = {"kind": chosen.cpu_kind, "policy": f"vllm_respsp/assets/policy/{chosen.folder}",
               "profile": chosen.profile}
    if what not in answers:
        raise SystemExit(f"usage: python -m vllm_respsp.policy.shipped [{'|'.join(answers)}]")
    print(answers[what])


if __name__ == "__main__":
    main(sys.argv[1:])
