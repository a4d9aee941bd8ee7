"""The learned shape policy (issue 6): trace tables, cost model, exact simulator, RL training,
policy files and the batched in-engine policy.

Everything here is engine-independent: traces and cost profiles are plain files, so policies
can be trained and compared offline (design.md §6) before the engine seam exists.
"""
