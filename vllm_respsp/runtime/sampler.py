"""Tree verification of one engine step, returned in vLLM's chain format.

Greedy rows accept the longest root path whose tokens equal the target's argmax; sampled rows
use recursive rejection over siblings (`vllm_respsp.tree.verify`), which is lossless. The
result is what vLLM's rejection sampler returns, `[num_reqs, max_drafts + 1]` token ids padded
with -1 (accepted tokens, then the bonus token), so vLLM's bookkeeping, stop checks, rollback
and acceptance metrics run unchanged. Then the accepted path's KV moves into the slots right
after the root, where vLLM's rollback (`num_computed_tokens -= rejected`) expects it.

The tree path covers temperature, top-k, top-p and seeds (a seeded request draws from its own
generator, and its bonus token as vLLM's sampler on this platform draws it, so its tokens do not
depend on the batch nor on which sampler handled a step). vLLM's -1 placeholder drafts (a new
one-token request padded to the batch's draft length) are never accepted and take no draws.
A request whose sampling needs more of vLLM's sampler (penalties, logprobs, bad words, logit
bias, min-p, min-tokens, allowed tokens, structured output, custom logits processors:
`upstream_reason`) drafts chains, and its rows are verified by vLLM's own rejection sampler;
the other requests of the step keep their trees.
"""

from __future__ import annotations

import torch

from vllm_respsp.tree.build import DraftTree
from vllm_respsp.tree.step_trees import StepTrees
from vllm_respsp.tree.verify import SeededSampler, accept_greedy, accept_sampled, exponential_race, sample_rows
from vllm_respsp_triton import compaction_slots
from vllm_respsp_triton.tree_metadata import node_requests

PLACEHOLDER = -1
SAMPLING_EPS = 1e-5  # vLLM's: temperatures below it are greedy


def upstream_reason(params) -> str | None:
    """Why a request's sampling needs vLLM's own sampler (None when a tree can verify it)."""
    checks = [
        ("logprobs", params.logprobs is not None or params.prompt_logprobs is not None
         or getattr(params, "logprob_token_ids", None)),
        ("penalties", params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
         or params.repetition_penalty != 1.0),
        ("min_p", params.min_p > SAMPLING_EPS),
        ("min_tokens", params.min_tokens > 0),
        ("logit_bias", bool(params.logit_bias)),
        ("allowed_token_ids", bool(params.allowed_token_ids)),
        ("bad_words", bool(params.bad_words)),
        ("structured_outputs", params.structured_outputs is not None),
        ("extra_args", bool(getattr(params, "extra_args", None))),
    ]
    return next((name for name, hit in checks if hit), None)


def gumbel_from_seed(p: torch.Tensor, generator: torch.Generator) -> int:
    """vLLM's CPU seeded sampling: one seed drawn from the request's generator, then its fused
    Gumbel-max kernel (noise from (seed, token)) over the log-probabilities."""
    seed = torch.randint(0, 2**31, (1,), generator=generator, dtype=torch.long)
    return int(torch.ops._C.fused_gumbel_argmax(p.float().log()[None], seed)[0])


def seeded_sampler_of(vllm_sampler) -> SeededSampler:
    """How the engine's own sampler (vLLM's `Sampler`) samples a seeded request on this platform."""
    from vllm.v1.sample.ops.topk_topp_sampler import TopKTopPSampler

    topk_topp = vllm_sampler.topk_topp_sampler
    if getattr(topk_topp.forward, "__func__", None) is TopKTopPSampler.forward_cpu and \
            not topk_topp.use_fp64_gumbel:
        return gumbel_from_seed
    return exponential_race


def _target_probs(logits: torch.Tensor, rows_per_request: torch.Tensor, sampling_metadata,
                  request_of_batch: torch.Tensor) -> torch.Tensor:
    """Sampling distribution after each row: temperature, then top-k / top-p, as vLLM's sampler."""
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p

    def expand(per_request: torch.Tensor | None):
        if per_request is None:
            return None
        return torch.repeat_interleave(per_request[request_of_batch], rows_per_request)

    temperature = expand(sampling_metadata.temperature).float()
    greedy = temperature < SAMPLING_EPS
    scaled = logits.float() / torch.where(greedy, 1.0, temperature)[:, None]
    scaled = apply_top_k_top_p(scaled, expand(sampling_metadata.top_k), expand(sampling_metadata.top_p))
    probs = scaled.softmax(-1)
    if bool(greedy.any()):  # a greedy row is the one-hot argmax: sampling it is greedy decoding
        one_hot = torch.zeros_like(probs[greedy])
        one_hot.scatter_(1, logits[greedy].argmax(-1, keepdim=True), 1.0)
        probs[greedy] = one_hot
    return probs


def verify_trees(trees: StepTrees, logits: torch.Tensor, spec_decode_metadata, sampling_metadata,
                 num_reqs: int, seeded: SeededSampler = exponential_race,
                 generator: torch.Generator | None = None):
    """Returns (sampled_token_ids [num_reqs, max_drafts + 1], accepted node lists per tree request).
    `seeded`: how a seeded request samples a token (`seeded_sampler_of` the engine's sampler).

    `logits` holds, per request, one row per scheduled token when it has drafts and one row
    otherwise (vLLM's `logits_indices`), in input-batch order."""
    num_draft = torch.tensor(spec_decode_metadata.num_draft_tokens, dtype=torch.long)
    rows_per_request = num_draft + 1
    first_row = torch.cumsum(rows_per_request, 0) - rows_per_request
    max_len = int(num_draft.max()) + 1
    out = torch.full((num_reqs, max_len), PLACEHOLDER, dtype=torch.int32)

    # Requests without drafts (a prefill's last chunk, or no drafts this step): one row each.
    plain = (num_draft == 0).nonzero().squeeze(1)
    tree_reqs = trees.batch_index
    generators = sampling_metadata.generators or {}
    # Only the rows read are converted (a bf16 -> fp32 copy of every row cost ms at batch 8);
    # argmax is the same on either dtype (the conversion is exact).
    if sampling_metadata.all_greedy:
        out[plain, 0] = logits[first_row[plain].to(logits.device)].argmax(-1).int().to(out.device)
    else:
        probs = _target_probs(logits[first_row[plain].to(logits.device)].float(), torch.ones_like(plain),
                              sampling_metadata, plain)
        own = {i: generators[b] for i, b in enumerate(plain.tolist()) if b in generators}
        out[plain, 0] = sample_rows(probs, generator, own, seeded).int()

    sizes = (trees.cu_nodes[1:] - trees.cu_nodes[:-1]).long()
    node_rows = torch.repeat_interleave(first_row[tree_reqs], sizes) + (
        torch.arange(int(trees.cu_nodes[-1])) - torch.repeat_interleave(trees.cu_nodes[:-1].long(), sizes))
    tree = DraftTree(trees.tokens, trees.parents, trees.depths,
                     torch.zeros(trees.tokens.numel()), trees.cu_nodes)
    node_logits = logits[node_rows.to(logits.device)]
    if sampling_metadata.all_greedy:
        acceptance = accept_greedy(tree, node_logits.argmax(-1), trees.metadata)
    else:
        probs = _target_probs(node_logits, sizes, sampling_metadata, tree_reqs)
        own = {r: generators[b] for r, b in enumerate(tree_reqs.tolist()) if b in generators}
        acceptance = accept_sampled(tree, probs, generator, own, seeded, trees.metadata)
    accepted = []
    paths = acceptance.accepted_nodes.tolist()
    for b, tokens, path in zip(tree_reqs.tolist(), acceptance.output_tokens(tree), paths):
        out[b, :len(tokens)] = torch.tensor(tokens, dtype=torch.int32)
        accepted.append(path[:len(tokens)])
    return out, accepted


def compaction_moves(trees: StepTrees, accepted: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(src, dst) KV slots that put each accepted path right after its root: `compaction_slots`
    over each request's node slots (a block table of one-slot blocks, positions = node index)."""
    sizes = (trees.cu_nodes[1:] - trees.cu_nodes[:-1]).long()
    request, root_row = node_requests(trees.cu_nodes)
    node_slots = torch.zeros(len(accepted), int(sizes.max()), dtype=torch.long)
    node_slots[request, torch.arange(request.numel()) - root_row] = trees.slots
    path = torch.full((len(accepted), max(map(len, accepted))), -1, dtype=torch.long)
    for r, nodes in enumerate(accepted):
        path[r, :len(nodes)] = torch.tensor(nodes)
    lengths = torch.tensor([len(nodes) - 1 for nodes in accepted])
    src, dst = compaction_slots(torch.zeros(len(accepted)), path, lengths, node_slots, 1)
    moved = src >= 0
    return src[moved], dst[moved]
