"""Lazy catch-up of the draft context: a request on NO_DRAFTS skips the head; when it drafts
again its skipped positions run in the same batched pass as the new ones. The head's keys,
values and root states must be what running it every step gives. A toy head with the
HeadAdapter interface (random maps, attention that matters) stands in for vLLM's."""

import pytest
import torch

from vllm_respsp.runtime.drafter import FEW_NEW_ROWS, NewRows, TreeDrafter
from vllm_respsp.runtime.head import StepInputs
from vllm_respsp.tree.shape import chain

H, HEADS, KV_HEADS, D, VOCAB, DRAFT_VOCAB = 16, 4, 2, 8, 50, 20


class ToyHead:
    num_heads, num_kv_heads, head_dim, scale, dtype = HEADS, KV_HEADS, D, D ** -0.5, torch.float32

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)

        def rand(*shape):
            return torch.randn(*shape, generator=g) * 0.5

        self.fc, self.emb, self.pos = rand(3 * H, H), rand(VOCAB, H), rand(256, HEADS * D)
        self.wq, self.wk, self.wv = rand(2 * H, HEADS * D), rand(2 * H, KV_HEADS * D), rand(2 * H, KV_HEADS * D)
        self.wo, self.lm = rand(HEADS * D, H), rand(H, DRAFT_VOCAB)
        self.draft_to_target = torch.arange(DRAFT_VOCAB)

    def combine(self, aux):
        return aux.float() @ self.fc

    def step(self, hidden, tokens, positions, attend, logit_rows=None):
        n = hidden.shape[0]
        x = torch.cat([self.emb[tokens], hidden], -1)
        q = (x @ self.wq + self.pos[positions]).view(n, HEADS, D)  # positions matter
        k = (x @ self.wk + self.pos[positions, :KV_HEADS * D]).view(n, KV_HEADS, D)
        inputs = StepInputs(q, k, (x @ self.wv).view(n, KV_HEADS, D), hidden)
        prenorm = hidden + attend(inputs).reshape(n, -1).float() @ self.wo
        logits = prenorm[logit_rows] if logit_rows is not None else prenorm
        return inputs, prenorm, torch.log_softmax(logits @ self.lm, -1)


def steps_of(seed=1):
    """Two requests over 6 steps: (per step) how many verified positions each adds."""
    return {"a": [5, 1, 2, 1, 3, 1], "b": [4, 2, 1, 1, 1, 2]}


def run(defer_steps: dict[str, set[int]], window: int = 256, only: dict[str, int] | None = None):
    """The six steps, deferring `defer_steps`; with `only`, request r's rows before position
    only[r] are left out altogether (what a restarted context never sees)."""
    torch.manual_seed(0)
    drafter = TreeDrafter(ToyHead(), defer_window=window)
    starts = {"a": 0, "b": 0}
    roots = None
    for step in range(6):
        counts = {r: steps_of()[r][step] for r in starts}
        aux = torch.randn(sum(counts.values()), 3 * H, generator=torch.Generator().manual_seed(100 + step))
        rows, offset = [], 0
        for r, n in counts.items():
            tokens = torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(step * 10 + n))
            rows.append(NewRows(r, starts[r], torch.arange(offset, offset + n), tokens))
            offset += n
            starts[r] += n
        if only:
            rows = [cut(x, only.get(x.req_id, 0)) for x in rows]
            rows = [x for x in rows if len(x.aux_rows)]
        deferred = [x for x in rows if step in defer_steps.get(x.req_id, set())]
        drafter.defer(aux, deferred)
        extended = [x for x in rows if x not in deferred]
        if extended:
            roots = (drafter.extend(aux, extended)[0], [x.req_id for x in extended])
    return drafter, roots


def cut(rows: NewRows, first: int) -> NewRows:
    """These rows without the positions before `first`."""
    drop = max(0, min(first - rows.start, len(rows.aux_rows)))
    return NewRows(rows.req_id, rows.start + drop, rows.aux_rows[drop:], rows.next_tokens[drop:])


@pytest.mark.parametrize("defer_steps", [
    {"a": {1, 2, 3}, "b": {4}},  # one request at a time; one-row and several-row steps
    {"a": {1, 3, 4}, "b": {2, 3, 4}},  # both in one step: one-row rows share a copy (step 3)
])
def test_deferred_positions_catch_up_to_what_every_step_gives(defer_steps):
    eager, (eager_roots, _) = run({})
    lazy, (lazy_roots, ids) = run(defer_steps)
    assert ids == ["a", "b"] and not lazy.deferred  # the last step extended both
    for r in ("a", "b"):
        e, lz = eager.contexts[r], lazy.contexts[r]
        assert e.end == lz.end == sum(steps_of()[r])
        ours, theirs = eager.kv.gather([r], [e.first], [e.length]), lazy.kv.gather([r], [lz.first], [lz.length])
        assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(ours, theirs))
    for field in ("fused", "hidden", "logprobs"):
        assert torch.allclose(getattr(eager_roots, field), getattr(lazy_roots, field), atol=1e-5)


def test_a_batch_extends_each_request_as_it_would_alone():
    """Steps that mix a decode step's few new rows for some requests and many for another (a
    prompt joining) run the extend pass's attention as two padded groups
    (`TreeDrafter._attend_new_rows`); every request's keys, values and roots must be what
    extending it alone gives. Request c joins at steps 0 and 3 with many rows; a and b add
    1-5 rows a step, padded together."""
    steps = {**steps_of(), "c": [FEW_NEW_ROWS + 4, 1, 1, FEW_NEW_ROWS + 1, 1, 1]}
    together, alone = TreeDrafter(ToyHead()), {r: TreeDrafter(ToyHead()) for r in steps}
    starts = dict.fromkeys(steps, 0)
    for step in range(6):
        rows, offset = [], 0
        aux = torch.randn(sum(n[step] for n in steps.values()), 3 * H, generator=torch.Generator().manual_seed(step))
        for r, n in ((r, counts[step]) for r, counts in steps.items()):
            tokens = torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(step * 10 + n))
            rows.append(NewRows(r, starts[r], torch.arange(offset, offset + n), tokens))
            offset, starts[r] = offset + n, starts[r] + n
        roots = together.extend(aux, rows)[0]
        for i, x in enumerate(rows):
            own = alone[x.req_id].extend(aux, [x])[0]
            for field in ("fused", "hidden", "logprobs"):
                # fp32 sums in another order: states of magnitude ~100 differ by up to ~1e-3
                assert torch.allclose(getattr(roots, field)[i], getattr(own, field)[0], rtol=1e-5, atol=2e-3), \
                    (step, x.req_id)
    for r, drafter in alone.items():
        ours = together.kv.gather([r], [0], [starts[r]])
        assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(ours, drafter.kv.gather([r], [0], [starts[r]])))


def test_context_length_counts_deferred_positions_and_a_restart_drops_them():
    lazy, _ = run({"a": {4, 5}})
    assert lazy.context_length("a") == sum(steps_of()["a"]) and lazy.deferred_length("a") == 4
    assert lazy.contexts["a"].end == sum(steps_of()["a"][:4])
    aux = torch.randn(2, 3 * H)
    lazy.defer(aux, [NewRows("a", 0, torch.arange(2), torch.tensor([1, 2]))])  # recomputed from 0
    assert lazy.deferred["a"].start == 0 and lazy.deferred_length("a") == 2
    lazy.forget({"b"})
    assert "a" not in lazy.deferred and "a" not in lazy.contexts and "a" not in lazy.kv.held


def test_chain_attention_equals_the_tree_attention_it_shortcuts():
    """A step of chains (one frontier row per request) attends without padding rows per request;
    the result is the general tree attention's (forced here by a larger row bound)."""
    drafter = TreeDrafter(ToyHead())
    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(3, 11, KV_HEADS, D, generator=g), torch.randn(3, 11, KV_HEADS, D, generator=g)
    padded = (keys, values, torch.tensor([11, 5, 7]))
    q = torch.randn(3, HEADS, D, generator=g)
    path_k, path_v = torch.randn(3, 2, KV_HEADS, D, generator=g), torch.randn(3, 2, KV_HEADS, D, generator=g)
    chains = drafter._attend_tree(q, torch.arange(3), padded, path_k, path_v, max_rows=1)
    general = drafter._attend_tree(q, torch.arange(3), padded, path_k, path_v, max_rows=2)
    assert torch.allclose(chains, general, atol=1e-6)


def test_a_deferral_longer_than_the_window_restarts_the_context_at_the_window():
    """Past `defer_window` deferred rows the oldest steps are dropped (whole, no copy) and the
    context restarts at the oldest kept position: the same keys, values and roots as a drafter
    that never saw the dropped positions."""
    # a: positions 0-4 extended at step 0, then steps 1-4 deferred (positions 5 | 6-7 | 8 | 9-11);
    # window 4 drops the steps of 5 and 6-7 and keeps 8..11; step 5 (position 12) restarts at 8
    windowed, (roots, ids) = run({"a": {1, 2, 3, 4}}, window=4)
    assert windowed.restarts == 1 and windowed.contexts["a"].first == 8 and windowed.contexts["a"].end == 13
    fresh, (fresh_roots, fresh_ids) = run({"a": {0, 1, 2, 3, 4}}, only={"a": 8})
    assert ids == fresh_ids == ["a", "b"] and fresh.restarts == 0 and fresh.contexts["a"].first == 8
    ours = windowed.kv.gather(["a"], [8], [5])
    theirs = fresh.kv.gather(["a"], [8], [5])
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(ours, theirs))
    for field in ("fused", "hidden", "logprobs"):
        assert torch.allclose(getattr(roots, field)[0], getattr(fresh_roots, field)[0], atol=1e-5)
    # within the window nothing is dropped: the exact catch-up of the test above
    assert run({"a": {1, 2, 3, 4}}, window=8)[0].restarts == 0


@pytest.mark.parametrize("shapes", [
    [chain(1), chain(1)], [chain(3), chain(3)],  # vLLM's chains of K
    # what a policy mixes: depths, confidence bounds
    [chain(1), chain(3)], [chain(4, 0.3), chain(2)], [chain(5, 0.1), chain(3, 0.5)], [chain(5, 0.2), chain(4, 0.05)],
    # verify bounds: a chain may lose its first draft (no drafts), or end before a weak one
    [chain(1, 0, 0.3), chain(1)], [chain(4, 0, 0.1), chain(3, 0.2, 0.05)],
], ids=str)
def test_chains_are_what_the_tree_builder_grows(shapes):
    """The runtime's path for a step of chains only (any depths, confidence bounds) proposes what
    growing them through the tree builder proposes (over several root states, so that a wrong
    position, path or bound would change some draft)."""
    drafter, (_, ids) = run({})
    g = torch.Generator().manual_seed(3)
    lengths = set()
    for _ in range(24):
        hidden = torch.randn(2, H, generator=g) * 6
        logprobs = torch.log_softmax(torch.randn(2, DRAFT_VOCAB, generator=g) * 2, -1)
        tree = drafter.draft(ids, shapes, torch.tensor([7, 8]), hidden, logprobs)
        cu = tree.cu_nodes.tolist()
        grown = [tree.tokens[cu[b] + 1:cu[b + 1]].tolist() for b in range(2)]
        assert drafter.draft_chains(ids, shapes, hidden, logprobs) == grown
        lengths |= {len(chain) for chain in grown}
    if any(s.bounded for s in shapes):  # the bound cut some chains and not others
        assert len(lengths) > 1
    if any(s.verify_min_prob and s.depth == 1 for s in shapes):
        assert 0 in lengths  # a first draft below its verify bound is dropped
