"""benchmarks.tree_shapes: its results table (its figures are measurements, not tests)."""


def test_tree_shapes_table_lists_only_the_depths_a_shape_drafts():
    """vLLM keeps an acceptance slot per drafted token (8 for T8/D3/K4); the table shows depths."""
    from benchmarks.tree_shapes import markdown

    row = {"acceptance_length": 1.9, "tok_s": 10.0, "speedup": 0.5, "identical": 1, "prompts": 2,
           "lossless": {"label": "identical"}}
    meta = {"command": "python -m benchmarks.tree_shapes", "date": "2026-12-06", "head": "h",
            "args": {"max_tokens": 8, "prompts": None, "dtype": "float32", "max_num_seqs": None}}
    rows = [{**row, "config": "none", "acceptance_length": None, "per_depth": [], "lossless": None},
            {**row, "config": "T8/D3/K4", "per_depth": [0.5, 0.25, 0.125, 0.0, 0.0, 0.0, 0.0, 0.0]},
            {**row, "config": "cycle:chain2,T4/D4/K1", "per_depth": [0.5, 0.2, 0.1, 0.05, 0.0]}]
    table = markdown(meta, rows).splitlines()
    assert table[-3].startswith("| none | - | - |")
    assert "| 0.50, 0.25, 0.12 |" in table[-2]
    assert "| 0.50, 0.20, 0.10, 0.05 |" in table[-1]
