"""Property tests (hypothesis) of the pure tree code: random shapes, drafts and targets."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_respsp.tree import verify
from vllm_respsp.tree.build import build_trees
from vllm_respsp.tree.shape import TreeShape
from vllm_respsp_triton import build_tree_metadata, unpack_ancestor_bits

VOCAB = 12


@st.composite
def shapes(draw):
    depth = draw(st.integers(1, 5))
    top_k = draw(st.integers(1, 4))
    cap = TreeShape(1, depth, top_k).capacity
    total = draw(st.integers(depth, min(cap, 24)))
    return TreeShape(total, depth, top_k)


@st.composite
def batches(draw):
    batch_shapes = draw(st.lists(shapes(), min_size=1, max_size=5))
    seed = draw(st.integers(0, 2**16))
    return batch_shapes, seed


def random_batch(batch_shapes, seed):
    g = torch.Generator().manual_seed(seed)
    table = torch.log_softmax(torch.randn(VOCAB, VOCAB, generator=g, dtype=torch.float64), -1)
    roots = torch.randint(0, VOCAB, (len(batch_shapes),), generator=g)
    tree = build_trees(batch_shapes, roots, table[roots], lambda f, b: table[f.token])
    return tree, g


@settings(max_examples=60, deadline=None)
@given(batches())
def test_trees_are_breadth_first_with_ancestor_masks(batch):
    batch_shapes, seed = batch
    tree, _ = random_batch(batch_shapes, seed)
    sizes = (tree.cu_nodes[1:] - tree.cu_nodes[:-1]).tolist()
    assert sizes == [s.total_tokens + 1 for s in batch_shapes]
    meta = build_tree_metadata(tree.parents, tree.cu_nodes, max(sizes))
    assert torch.equal(meta.depths, tree.depths)
    for b, shape in enumerate(batch_shapes):
        s, e = int(tree.cu_nodes[b]), int(tree.cu_nodes[b + 1])
        parents = tree.parents[s:e].tolist()
        mask = unpack_ancestor_bits(meta.ancestor_bits[s:e], e - s)
        for i, p in enumerate(parents):
            assert p < i and (i == 0) == (p < 0)
            ancestors, node = set(), i
            while node >= 0:
                ancestors.add(node)
                node = parents[node]
            assert set(torch.nonzero(mask[i]).flatten().tolist()) == ancestors
        depths = tree.depths[s:e].tolist()
        assert depths == sorted(depths) and max(depths) <= shape.depth
        # Siblings carry distinct tokens (they are one distribution's top-k).
        seen = {}
        for i in range(1, e - s):
            key = (parents[i], int(tree.tokens[s + i]))
            assert key not in seen
            seen[key] = i


@settings(max_examples=60, deadline=None)
@given(batches(), st.integers(0, 2**16))
def test_accepted_path_is_a_root_path_and_greedy_is_longest(batch, target_seed):
    batch_shapes, seed = batch
    tree, _ = random_batch(batch_shapes, seed)
    g = torch.Generator().manual_seed(target_seed)
    target = torch.randint(0, VOCAB, (tree.tokens.numel(),), generator=g)
    agree = torch.rand(tree.tokens.numel(), generator=g) < 0.6
    # Make the target agree with some draft children so that paths get accepted.
    for i in torch.nonzero(agree).flatten().tolist():
        b = int(torch.searchsorted(tree.cu_nodes, i, right=True)) - 1
        s, e = int(tree.cu_nodes[b]), int(tree.cu_nodes[b + 1])
        kids = [j for j in range(s, e) if int(tree.parents[j]) == i - s]
        if kids:
            target[i] = tree.tokens[kids[int(torch.randint(len(kids), (1,), generator=g))]]
    acc = verify.accept_greedy(tree, target)
    outputs = acc.output_tokens(tree)
    for b in range(tree.num_requests):
        s = int(tree.cu_nodes[b])
        n = int(acc.accepted_len[b])
        nodes = acc.accepted_nodes[b, : n + 1].tolist()
        assert nodes[0] == 0
        for parent, child in zip(nodes, nodes[1:]):
            assert int(tree.parents[s + child]) == parent
            assert int(tree.tokens[s + child]) == int(target[s + parent])
        last = nodes[-1]
        # Longest: no child of the last accepted node matches the target there.
        e = int(tree.cu_nodes[b + 1])
        assert all(int(tree.tokens[j]) != int(target[s + last])
                   for j in range(s, e) if int(tree.parents[j]) == last)
        assert outputs[b][-1] == int(target[s + last])
        assert outputs[b][:-1] == [int(tree.tokens[s + x]) for x in nodes[1:]]


@settings(max_examples=60, deadline=None)
@given(batches(), st.integers(0, 2**16), st.lists(st.integers(0, 50), min_size=5, max_size=5))
def test_step_layout_positions_and_compaction_preserve_the_accepted_path(batch, target_seed, prefixes):
    """Through the runtime's own step code: trees laid over token rows (with other requests'
    rows in between), RoPE positions = prefix + depth, and after compaction the slot right
    after each root holds the accepted path's tokens in order."""
    from vllm_respsp.runtime.sampler import compaction_moves
    from vllm_respsp.tree.step_trees import ProposedTree, StepTrees

    tree, _ = random_batch(*batch)
    g = torch.Generator().manual_seed(target_seed)
    acceptance = verify.accept_greedy(tree, torch.randint(0, VOCAB, (tree.tokens.numel(),), generator=g))
    req_ids, spec, proposed, query_start, rows = [], {}, {}, [], 0
    for b in range(tree.num_requests):
        part = tree.request(b)
        req_ids += [f"plain{b}", f"tree{b}"]  # a request without drafts before each tree
        proposed[f"tree{b}"] = ProposedTree(part.tokens.tolist(), part.parents.tolist(), part.depths.tolist())
        spec[f"tree{b}"] = part.tokens[1:].tolist()
        query_start += [rows, rows + 3]
        rows += 3 + part.tokens.numel()
    query_start.append(rows)
    num_computed = [p for p in prefixes[:tree.num_requests] for _ in (0, 1)]
    slot_mapping = torch.randperm(4 * rows, generator=g)[:rows]  # any injective row -> slot map
    trees = StepTrees.build(req_ids, spec, proposed, query_start, num_computed, slot_mapping)
    if trees is None:  # chains only: vLLM's own positions, attention and rejection sampler verify them
        assert all(p.depths == list(range(len(p.depths))) for p in proposed.values())
        return
    positions = torch.full((rows,), -7, dtype=torch.long)
    trees.rewrite_positions(positions)
    cache = torch.full((4 * rows,), -1, dtype=torch.long)
    for b in range(tree.num_requests):
        start, n = query_start[2 * b + 1], int(tree.cu_nodes[b + 1] - tree.cu_nodes[b])
        expect = num_computed[2 * b + 1] + tree.depths[int(tree.cu_nodes[b]):int(tree.cu_nodes[b + 1])].long()
        assert torch.equal(positions[start:start + n], expect)
        cache[slot_mapping[start:start + n]] = tree.tokens[int(tree.cu_nodes[b]):int(tree.cu_nodes[b + 1])]
    accepted = [acceptance.accepted_nodes[b, :int(acceptance.accepted_len[b]) + 1].tolist()
                for b in range(tree.num_requests)]
    src, dst = compaction_moves(trees, accepted)
    cache[dst] = cache[src].clone()  # gather, then scatter
    for b, nodes in enumerate(accepted):
        start = query_start[2 * b + 1]
        path = [int(tree.tokens[int(tree.cu_nodes[b]) + j]) for j in nodes]
        assert cache[slot_mapping[start:start + len(nodes)]].tolist() == path
