"""Where the draft head's keys and values of verified positions live.

- `PagedHeadKV` (every engine whose attention has a respsp backend): in vLLM's own paged KV
  cache, in the cache of the head's attention layer, which vLLM allocates for an EAGLE-3 head
  in its memory plan exactly as for its own EAGLE-3 drafter. Each request's positions sit in its
  own blocks (the block table of the layer's KV-cache group), so the memory is budgeted by vLLM,
  freed with the request, and kept by the prefix cache: a prompt that starts in the prefix cache
  drafts from its whole context, the cached part included. Rows are written and read through
  the tree-attention backend, which knows the cache's layout.
- `DenseHeadKV` (no such cache: unit tests, an engine without a respsp backend): one tensor per
  request outside vLLM's cache. It holds only what this drafter computed, so a request whose
  first step starts in the prefix cache drafts from the rest of its context.

A cached block's last position holds the head's keys/values computed with the token that
followed it in the request that filled the block (a head row reads the next token); another
request sharing the block may continue differently. Like vLLM's EAGLE-3, which caches its draft
KV the same way, that only weakens a draft, never an output: verification is exact.
"""

from __future__ import annotations

from itertools import accumulate

import torch

from vllm_respsp.backends.base import TreeAttentionBackend


class HeadKV:
    """The store interface `TreeDrafter` uses; positions are absolute (0 = the prompt's first)."""

    # whether positions a request never ran the head over (vLLM's prefix cache hit them) are readable
    keeps_prefix: bool = False

    def locate(self, req_ids: list[str]):
        """The requests' places in the store, looked up once for a pass's `write` and `gather`."""
        return req_ids

    def write(self, place, starts: list[int], sizes: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [N, Hkv, D]: request i's `sizes[i]` rows, in request order, at positions
        starts[i], starts[i] + 1, ... (`place`: from `locate`)."""
        raise NotImplementedError

    def gather(self, place, firsts: list[int], lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of request i's positions firsts[i] .. firsts[i] + lengths[i] - 1, fp32,
        padded to [R, max(lengths), Hkv, D] each (padding columns hold finite values; callers
        mask them)."""
        raise NotImplementedError

    def forget(self, req_id: str) -> None:
        """The request is gone or restarts from its prompt."""


class DenseHeadKV(HeadKV):
    """One tensor pair per request (grown by doubling), from the first position it wrote."""

    def __init__(self, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device):
        self.row_shape = (num_kv_heads, head_dim)
        self.dtype, self.device = dtype, device
        self.held: dict[str, tuple[int, torch.Tensor, torch.Tensor]] = {}  # req -> (first position, k, v)

    def write(self, req_ids, starts, sizes, k, v) -> None:
        offset = 0
        for req_id, start, n in zip(req_ids, starts, sizes):
            first, keys, values = self.held.get(req_id, (start, None, None))
            begin, end = start - first, start - first + n
            if keys is None or end > keys.shape[0]:
                cap = max(end, 64 if keys is None else 2 * keys.shape[0])
                grown = [torch.empty(cap, *self.row_shape, dtype=self.dtype, device=self.device) for _ in "kv"]
                if keys is not None:
                    grown[0][:begin], grown[1][:begin] = keys[:begin], values[:begin]
                keys, values = grown
            keys[begin:end], values[begin:end] = k[offset:offset + n], v[offset:offset + n]
            self.held[req_id] = (first, keys, values)
            offset += n

    def gather(self, req_ids, firsts, lengths):
        shape = (len(req_ids), max(lengths), *self.row_shape)
        keys, values = torch.zeros(shape), torch.zeros(shape)
        for r, (req_id, first, length) in enumerate(zip(req_ids, firsts, lengths)):
            held_from, k, v = self.held[req_id]
            rows = slice(first - held_from, first - held_from + length)
            keys[r, :length], values[r, :length] = k[rows], v[rows]
        return keys, values

    def forget(self, req_id: str) -> None:
        self.held.pop(req_id, None)


class PagedHeadKV(HeadKV):
    """The head's rows in vLLM's paged cache of its attention layer (see the module doc)."""

    keeps_prefix = True

    def __init__(self, runner, layer, group: int, backend: TreeAttentionBackend):
        self.runner, self.layer, self.group, self.backend = runner, layer, group, backend

    @staticmethod
    def unusable(runner, name: str, layer, group: int, backend: TreeAttentionBackend | None) -> str | None:
        """Why the head's rows cannot live in this layer's paged cache, or None."""
        if backend is None:
            return "no tree-attention backend reads this engine's KV cache"
        groups = runner.kv_cache_config.kv_cache_groups
        if not 0 <= group < len(groups) or name not in groups[group].layer_names:
            return f"vLLM's KV-cache plan has no group {group} holding {name}"
        cache = getattr(layer, "kv_cache", None)
        if not isinstance(cache, torch.Tensor) or cache.dim() != 4 or not cache.numel():
            return "vLLM allocated no KV cache for the head's attention layer"
        table = runner.input_batch.block_table[group]
        if table.block_size != cache.shape[2]:
            return f"the head's block table counts blocks of {table.block_size}, its cache {cache.shape[2]}"
        return None

    def _blocks(self) -> tuple[torch.Tensor, int]:
        """The head's block table (on the device) and its block size."""
        table = self.runner.input_batch.block_table[self.group]
        return table.block_table.gpu, table.block_size

    def locate(self, req_ids: list[str]) -> torch.Tensor:
        """The requests' rows in the head's block table (on its device)."""
        index = self.runner.input_batch.req_id_to_index
        return torch.tensor([index[r] for r in req_ids], device=self._blocks()[0].device)

    def write(self, rows, starts, sizes, k, v) -> None:
        table, size = self._blocks()
        total = sum(sizes)
        request = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes), output_size=total)
        # row j of request i is at position starts[i] + (j - its first row): one shift per request
        shift = torch.tensor([start - first for start, first in zip(starts, accumulate(sizes, initial=0))])
        positions = torch.arange(total) + shift[request]
        request, positions = request.to(table.device), positions.to(table.device)
        slots = table[rows[request], positions // size].long() * size + positions % size
        self.backend.write_rows(self.layer, slots, k, v)

    def gather(self, rows, firsts, lengths):
        """Read as whole blocks from position 0 up to the furthest end; a request whose context
        starts past 0 (it restarted after a long deferral, see drafter.Deferred) is shifted to
        its first position. Columns past a request's own length are masked by callers."""
        table, size = self._blocks()
        longest, furthest = max(lengths), max(f + n for f, n in zip(firsts, lengths))
        k, v = self.backend.read_blocks(self.layer, table[rows, :-(-furthest // size)].long())
        if any(firsts):
            index = (torch.tensor(firsts)[:, None] + torch.arange(longest)[None]).clamp(max=k.shape[1] - 1)
            index = index.to(k.device)
            request = torch.arange(len(firsts), device=k.device)[:, None]
            return k[request, index].float(), v[request, index].float()
        return k[:, :longest].float(), v[:, :longest].float()
