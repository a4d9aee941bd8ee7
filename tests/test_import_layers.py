"""Parts depend one way: no package of vllm_respsp imports another that imports it back,
function-local imports counted (an import that dodges a cycle at run time is still a cycle)."""

from __future__ import annotations

import ast
from pathlib import Path

from vllm_respsp import envs

ROOT = Path(__file__).resolve().parents[1] / "vllm_respsp"


def package_of(module: str) -> str | None:
    """vllm_respsp.runtime.drafter -> runtime; top-level modules (vllm_respsp.config) are their
    own part."""
    parts = module.split(".")
    if parts[0] != "vllm_respsp" or len(parts) < 2:
        return None
    return parts[1]


def imports_of(path: Path) -> set[str]:
    """Every vllm_respsp module a file imports, at any depth of its code."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m.startswith("vllm_respsp.")}


def part_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        me = package_of(".".join(rel.parts))
        if me is None:
            continue
        deps = {package_of(m) for m in imports_of(path)} - {None, me}
        # `from vllm_respsp import envs` names the module envs, not the package root.
        graph.setdefault(me, set()).update(d for d in deps if (ROOT / d).exists() or (ROOT / f"{d}.py").exists())
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_no_import_cycles_between_parts():
    assert cycles(part_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_only_envs_reads_respsp_variables():
    """Every VLLM_RESPSP_* variable is read through vllm_respsp.envs."""
    offenders = []
    for path in ROOT.rglob("*.py"):
        if path.name == "envs.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and node.value.startswith("VLLM_RESPSP_"):
                offenders.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} {node.value}")
    assert offenders == []


def test_readme_lists_every_respsp_variable():
    """The README's table of variables is the one envs.py declares (regenerate it with
    `python -m vllm_respsp.envs`)."""
    assert envs.markdown_table() in (ROOT.parent / "README.md").read_text()
