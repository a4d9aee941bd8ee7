"""The learned shape policy (issue 6): trace tables, cost model, exact simulator, RL training,
policy files and the batched in-engine policy.

Everything here is engine-independent: traces and cost profiles are plain files, so policies
can be trained and compared offline (design.md §6) before the engine seam exists.
"""

from pathlib import Path

SHIPPED_POLICY = Path(__file__).resolve().parents[1] / "assets" / "policy" / "smollm2-135m-cpu" / "bandit.json"


def shipped_policy_if_present() -> str | None:
    """The shape policy trained for the testbed model, its head and this CPU, if shipped."""
    return str(SHIPPED_POLICY) if SHIPPED_POLICY.is_file() else None
