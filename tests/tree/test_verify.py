"""Tree verification: greedy walk, and lossless sampling checked with a chi-square test."""

import pytest
import torch

from vllm_respsp.tree import verify
from vllm_respsp.tree.build import build_trees
from vllm_respsp.tree.shape import TreeShape, chain

# Children's log-probs for the hand-built tree: one row per frontier node.
LOGP = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.2, 0.3, 0.4, 0.1]]))

V = 4
SHAPES = [chain(1), chain(3), TreeShape(6, 3, 2), TreeShape(4, 1, 4), TreeShape(9, 3, 3)]


def markov(seed: int, sharpness: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(V, V, generator=g) * sharpness, dim=-1)


TARGET = markov(0, 1.5)  # p(next | last token)
DRAFT = markov(1, 1.5)  # a different model: many rejections


def speculative_generate(roots: torch.Tensor, n_tokens: int, seed: int, shapes) -> torch.Tensor:
    """Run tree speculation (draft trees from DRAFT, verified against TARGET) for every root
    until each has produced n_tokens; return the first n_tokens of each [B, n_tokens]."""
    gen = torch.Generator().manual_seed(seed)
    produced = [[] for _ in range(roots.numel())]
    last = roots.clone()
    while min(len(p) for p in produced) < n_tokens:
        tree = build_trees(shapes, last, DRAFT[last].log(),
                           lambda f, b: DRAFT[f.token].log())
        acceptance = verify.accept_sampled(tree, TARGET[tree.tokens], gen)
        for b, toks in enumerate(acceptance.output_tokens(tree)):
            produced[b] += toks
            last[b] = toks[-1]
    return torch.tensor([p[:n_tokens] for p in produced])


def chi_square_p_value(samples: torch.Tensor, root: int) -> float:
    n = samples.shape[0]
    codes = samples[:, 0] * V * V + samples[:, 1] * V + samples[:, 2]
    observed = torch.bincount(codes, minlength=V**3).double()
    a, b, c = torch.meshgrid(torch.arange(V), torch.arange(V), torch.arange(V), indexing="ij")
    expected = (TARGET[root, a] * TARGET[a, b] * TARGET[b, c]).double().flatten() * n
    stat = ((observed - expected) ** 2 / expected).sum()
    dof = torch.tensor((V**3 - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(dof, stat / 2))


def ragged_shapes(n: int) -> list[TreeShape]:
    return [SHAPES[i % len(SHAPES)] for i in range(n)]


@pytest.mark.parametrize("seed", [11])
def test_sampled_output_distribution_equals_target(seed):
    n = 20_000
    samples = speculative_generate(torch.zeros(n, dtype=torch.long), 3, seed, ragged_shapes(n))
    assert chi_square_p_value(samples, root=0) > 0.01


def test_chi_square_catches_a_biased_sampler(monkeypatch):
    """Forgetting to remove a rejected token from the residual must fail the same test."""
    monkeypatch.setattr(verify, "remove_rejected", lambda p, rows, tokens: None)
    n = 20_000
    samples = speculative_generate(torch.zeros(n, dtype=torch.long), 3, 11, ragged_shapes(n))
    assert chi_square_p_value(samples, root=0) < 0.01


def test_greedy_equals_sampling_from_one_hot_targets():
    torch.manual_seed(0)
    shapes = ragged_shapes(40)
    roots = torch.randint(0, V, (40,))
    tree = build_trees(shapes, roots, DRAFT[roots].log(), lambda f, b: DRAFT[f.token].log())
    # A target that agrees with the draft's top choice only sometimes.
    target_argmax = torch.randint(0, V, (tree.tokens.numel(),))
    target_argmax[::2] = DRAFT[tree.tokens[::2]].argmax(-1)
    greedy = verify.accept_greedy(tree, target_argmax)
    sampled = verify.accept_sampled(tree, torch.nn.functional.one_hot(target_argmax, V).float())
    assert greedy.output_tokens(tree) == sampled.output_tokens(tree)
    assert torch.equal(greedy.accepted_len, sampled.accepted_len)
    assert int(greedy.accepted_len.sum()) > 0


def test_greedy_walk_by_hand():
    # root 0 -> children a(tok 1), b(tok 2); a -> c(tok 3); b -> d(tok 1)
    tree = build_trees([TreeShape(4, 2, 2)], torch.tensor([0]),
                       torch.log(torch.tensor([[0.1, 0.5, 0.4, 0.0]])),
                       lambda f, b: LOGP[:f.token.numel()])
    paths = tree.paths(0)
    node_of = {p: i for i, p in enumerate(paths)}
    argmax = torch.zeros(tree.tokens.numel(), dtype=torch.long)
    argmax[node_of[()]] = 2  # target wants token 2 first: the second sibling
    child = [p for p in paths if len(p) == 2 and p[0] == 2][0]
    argmax[node_of[(2,)]] = child[1]
    argmax[node_of[child]] = 3
    acc = verify.accept_greedy(tree, argmax)
    assert acc.output_tokens(tree) == [[2, child[1], 3]]


def test_placeholder_drafts_are_never_accepted_and_take_no_draws():
    """vLLM pads a new one-token request's drafts with -1 when it joins running requests: the
    step must sample exactly what a step without drafts samples (the whole target distribution,
    last vocabulary entry included, and the same draws from a seeded request's generator)."""
    from vllm_respsp.tree.build import DraftTree

    n = 4000
    placeholders = DraftTree(torch.tensor([0, -1, -1] * n), torch.tensor([-1, 0, 1] * n, dtype=torch.int32),
                             torch.tensor([0, 1, 2] * n, dtype=torch.int32), torch.zeros(3 * n),
                             torch.arange(0, 3 * n + 1, 3, dtype=torch.int32))
    root_p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    p = root_p.repeat(3 * n, 1)
    acc = verify.accept_sampled(placeholders, p, torch.Generator().manual_seed(0))
    assert int(acc.accepted_len.sum()) == 0
    counts = torch.bincount(acc.bonus_token, minlength=V).double()
    expected = root_p.double() * n
    assert float(((counts - expected) ** 2 / expected).sum()) < 16.3  # chi-square, 3 dof, p = 0.001
    # A seeded request: the same token and generator state as sampling its root row alone.
    own, alone = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    first = DraftTree(*(t[:3] for t in (placeholders.tokens, placeholders.parents, placeholders.depths,
                                        placeholders.scores)), placeholders.cu_nodes[:2])
    bonus = verify.accept_sampled(first, p[:3], None, {0: own}).bonus_token
    assert int(bonus[0]) == int(verify.sample_rows(root_p[None], None, {0: alone})[0])
    assert torch.equal(own.get_state(), alone.get_state())
