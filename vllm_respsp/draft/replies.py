"""Stage 1 of the draft-head data: the target's own greedy replies to training prompts.

The replies are what is expensive to recreate (about an hour of vLLM on two cores per million
tokens) and small as token ids, so they live in the repository, compressed, under
`data/draft-head/replies/` (`default_replies_dir`); the aux-state features are recomputed from
them (data.py). Layout, one folder per prompt source:

    replies/<source>/plan.json.gz       the source's prompts, in their seeded order, that fit
                                        `max_prompt_tokens` once rendered: {"config", "ids"}
    replies/<source>/shard-00000.json.gz  [{id, prompt_ids, reply_ids}, ...] for plan slice 0

A plan is written once and never reshuffled: later runs (and later sessions) only add the
shards still missing, and every shard is checked against its slice of the plan, so a config
change can never mix two different orders. Sources are independent, so a source can be added
without touching the replies of the others. Sources are prompt-set names of
`vllm_respsp.testbed.prompts` (never MT-Bench, HumanEval, GSM8K or a held-out slice:
`FORBIDDEN_SOURCES`).
"""

from __future__ import annotations

import gzip
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

# Benchmarks and held-out slices: training on them would make every figure we report a lie.
FORBIDDEN_SOURCES = ("mt-bench", "humaneval", "gsm8k", "sharegpt", "sharegpt-heldout")


@dataclass(frozen=True)
class ReplyConfig:
    max_prompt_tokens: int = 256
    max_new_tokens: int = 512
    prompts_per_shard: int = 256
    seed: int = 0

    def plan_key(self) -> dict:
        """What a plan depends on (a plan made with other values is refused, not reused)."""
        return {"max_prompt_tokens": self.max_prompt_tokens, "seed": self.seed}


def default_replies_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "data" / "draft-head" / "replies"


def read_gz_json(path: Path):
    with gzip.open(path, "rt") as f:
        return json.load(f)


def write_gz_json(path: Path, obj) -> None:
    """Atomically: a half-written file never looks finished."""
    tmp = path.with_name(".tmp-" + path.name)
    with gzip.open(tmp, "wt", compresslevel=9) as f:
        json.dump(obj, f, separators=(",", ":"))
    tmp.rename(path)


def shard_file(folder: Path, index: int) -> Path:
    return folder / f"shard-{index:05d}.json.gz"


def check_source(source: str) -> None:
    if source in FORBIDDEN_SOURCES:
        raise ValueError(f"prompt source {source!r} is a benchmark or held-out set; training sources "
                         f"must not be one of {list(FORBIDDEN_SOURCES)}")


def fits(text_ids_len: int, cfg: ReplyConfig) -> bool:
    return 8 <= text_ids_len <= cfg.max_prompt_tokens


def make_plan(source: str, tokenizer, cfg: ReplyConfig) -> list[str]:
    """The source's prompt ids in a seeded shuffle, keeping those whose rendered prompt fits."""
    from vllm_respsp.testbed.prompts import load_prompts, render

    prompts = load_prompts(source)
    random.Random(cfg.seed).shuffle(prompts)
    kept = []
    for prompt in tqdm(prompts, desc=f"plan {source}", unit="prompt"):
        # A prompt of more than 16 characters per allowed token cannot fit: skip the tokenizer
        # (a few ShareGPT prompts are 100k characters long).
        if len(prompt.text) > 16 * cfg.max_prompt_tokens:
            continue
        ids = tokenizer(render([prompt], tokenizer)[0], add_special_tokens=False)["input_ids"]
        if fits(len(ids), cfg):
            kept.append(prompt.id)
    return kept


def load_or_make_plan(folder: Path, source: str, tokenizer, cfg: ReplyConfig) -> list[str]:
    path = folder / "plan.json.gz"
    if path.exists():
        plan = read_gz_json(path)
        if plan["config"] != cfg.plan_key():
            raise ValueError(f"{path} was planned with {plan['config']}, not {cfg.plan_key()}: move the "
                             f"folder away to plan again (its replies belong to the old plan)")
        return plan["ids"]
    folder.mkdir(parents=True, exist_ok=True)
    ids = make_plan(source, tokenizer, cfg)
    write_gz_json(path, {"config": cfg.plan_key(), "source": source, "ids": ids})
    return ids


def plan_slices(ids: list[str], cfg: ReplyConfig, limit: int | None) -> list[list[str]]:
    """The plan cut into shards of `prompts_per_shard` (the first `limit` prompts only)."""
    ids = ids[:limit] if limit is not None else ids
    step = cfg.prompts_per_shard
    return [ids[i:i + step] for i in range(0, len(ids), step)]


def check_shard(path: Path, expected_ids: list[str]) -> None:
    got = [row["id"] for row in read_gz_json(path)]
    if got != expected_ids:
        raise ValueError(f"{path} does not hold its plan slice (first ids {got[:2]} vs {expected_ids[:2]}); "
                         f"the plan changed under it: delete the source's folder to regenerate")


def interleaved(shards: list[tuple[str, int, int]], sources: list[str]) -> list[int]:
    """Order (source, index, shards of that source) so that every prefix mixes the sources in
    proportion: by index / shards, ties in source order. Replies are generated in this order
    and training reads them in it, so a partial run and a data fraction see the same mix."""
    rank = {s: i for i, s in enumerate(sources)}
    return sorted(range(len(shards)), key=lambda i: (shards[i][1] / shards[i][2], rank[shards[i][0]]))


def generate_replies(root: Path, sources: dict[str, int | None], cfg: ReplyConfig, model_path: Path,
                     max_num_seqs: int = 128) -> None:
    """Write every missing reply shard of every source (`sources`: name -> prompt limit or None
    for the whole plan). One vLLM engine serves all shards; greedy, as the head is trained on
    the target's argmax. Progress: shards and tokens, with an ETA over the whole job."""
    from transformers import AutoTokenizer

    from vllm_respsp.testbed.prompts import load_prompts, render

    for source in sources:
        check_source(source)
    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    todo, order = [], []  # (source, index, ids), (source, index, shards of the source)
    for source, limit in sources.items():
        folder = root / source
        slices = plan_slices(load_or_make_plan(folder, source, tokenizer, cfg), cfg, limit)
        for index, ids in enumerate(slices):
            path = shard_file(folder, index)
            if path.exists():
                check_shard(path, ids)
            else:
                todo.append((source, index, ids))
                order.append((source, index, len(slices)))
    todo = [todo[i] for i in interleaved(order, list(sources))]
    if not todo:
        return
    from vllm_respsp.testbed.engine_run import generate, make_llm, prepare_cpu_env

    prepare_cpu_env(kv_cache_gib=4)
    llm = make_llm(str(model_path), max_model_len=cfg.max_prompt_tokens + cfg.max_new_tokens,
                   max_num_seqs=max_num_seqs)
    sampling = {"temperature": 0.0, "max_tokens": cfg.max_new_tokens}
    texts: dict[str, dict] = {}
    bar = tqdm(todo, desc="replies (shards)", unit="shard")
    tokens, start = 0, time.perf_counter()
    for source, index, ids in bar:
        if source not in texts:
            texts[source] = {p.id: p for p in load_prompts(source)}
        prompts = [texts[source][pid] for pid in ids]
        prompt_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in render(prompts, tokenizer)]
        result = generate(llm, prompt_ids, sampling)
        rows = [{"id": pid, "prompt_ids": p, "reply_ids": r} for pid, p, r in zip(ids, prompt_ids, result.token_ids)]
        write_gz_json(shard_file(root / source, index), rows)
        tokens += sum(len(p) + len(r) for p, r in zip(prompt_ids, result.token_ids))
        bar.set_postfix(source=source, tokens=f"{tokens / 1e6:.2f}M",
                        tok_s=f"{tokens / (time.perf_counter() - start):.0f}")
    del llm  # shuts the engine core down before the feature stage loads the model


def reply_shards(root: Path, sources: dict[str, int | None], cfg: ReplyConfig) -> list[tuple[str, int, Path]]:
    """(source, index, path) of every finished reply shard the config asks for, interleaved."""
    out, order = [], []
    for source, limit in sources.items():
        folder = root / source
        if not (folder / "plan.json.gz").exists():
            continue
        slices = plan_slices(read_gz_json(folder / "plan.json.gz")["ids"], cfg, limit)
        for index in range(len(slices)):
            path = shard_file(folder, index)
            if path.exists():
                out.append((source, index, path))
                order.append((source, index, len(slices)))
    return [out[i] for i in interleaved(order, list(sources))]


def planned_prompt_ids(root: Path | None = None) -> set[str]:
    """Every prompt any source's plan holds: a superset of what the draft head trained on (a
    source with a prompt limit trained on a prefix of its plan)."""
    root = root or default_replies_dir()
    return {pid for plan in sorted(root.glob("*/plan.json.gz")) for pid in read_gz_json(plan)["ids"]}


def data_table(root: Path, sources: dict[str, int | None], cfg: ReplyConfig) -> list[dict]:
    """Per source: prompts, prompt tokens and reply tokens in the finished shards."""
    table = {}
    for source, _, path in reply_shards(root, sources, cfg):
        row = table.setdefault(source, {"source": source, "prompts": 0, "prompt_tokens": 0, "reply_tokens": 0})
        for r in read_gz_json(path):
            row["prompts"] += 1
            row["prompt_tokens"] += len(r["prompt_ids"])
            row["reply_tokens"] += len(r["reply_ids"])
    return list(table.values())

