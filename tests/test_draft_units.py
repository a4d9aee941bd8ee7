"""Fast checks (seconds, no vLLM engine) of the pure parts of the draft-head pipeline."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F

from vllm_respsp.draft import data as draft_data
from vllm_respsp.draft.model import Eagle3Head, HeadConfig, draft_vocab_from_counts, export_head, rope
from vllm_respsp.draft.train import make_batches, offline_acceptance

TINY_TARGET = {"hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4, "num_key_value_heads": 2,
               "head_dim": 8, "rms_norm_eps": 1e-5, "rope_parameters": {"rope_theta": 100000.0},
               "vocab_size": 50, "max_position_embeddings": 256}


def tiny_head(seed: int = 0) -> Eagle3Head:
    torch.manual_seed(seed)
    cfg = HeadConfig.from_target(TINY_TARGET, draft_vocab_size=20, aux_layers=(0, 1, 2))
    draft_to_target = torch.sort(torch.randperm(50)[:20]).values
    head = Eagle3Head(cfg, torch.randn(50, 32), draft_to_target)
    for p in head.parameters():
        p.data.normal_(0, 0.3)
    return head


def reference_draft_chain(head: Eagle3Head, ids, aux, i: int, steps: int) -> list[torch.Tensor]:
    """Drafting after row i the way vLLM does it, one step at a time with an explicit KV list:
    step-0 keys for every j <= i, then one new key per step at position i + k."""
    cfg, layer = head.cfg, head.midlayer

    def qkv(token, hidden, pos):
        x = torch.cat([layer.input_layernorm(head.embed_tokens[token]), layer.hidden_norm(hidden)], -1)
        q = layer.self_attn.q_proj(x).view(cfg.num_heads, 1, cfg.head_dim)
        k = layer.self_attn.k_proj(x).view(cfg.num_kv_heads, 1, cfg.head_dim)
        v = layer.self_attn.v_proj(x).view(cfg.num_kv_heads, 1, cfg.head_dim)
        p = torch.tensor([pos])
        return rope(q, p, cfg.rope_theta), rope(k, p, cfg.rope_theta), v

    keys, values = [], []
    for j in range(i + 1):
        _, k, v = qkv(ids[j + 1], head.combine_aux(aux[j]), j)
        keys.append(k)
        values.append(v)
    hidden, outs = head.combine_aux(aux[i]), []
    for step in range(steps):
        q, k, v = qkv(ids[i + step + 1], hidden, i + step)
        if step > 0:
            keys.append(k)
            values.append(v)
        group = cfg.num_heads // cfg.num_kv_heads
        K = torch.cat(keys, 1).repeat_interleave(group, 0)
        V = torch.cat(values, 1).repeat_interleave(group, 0)
        attn = F.softmax(q @ K.transpose(-1, -2) / cfg.head_dim ** 0.5, -1) @ V  # [H, 1, D]
        residual = hidden + layer.self_attn.o_proj(attn.reshape(-1))
        hidden = residual + layer.mlp(layer.post_attention_layernorm(residual))
        outs.append(hidden)
    return outs


def test_unrolled_steps_match_step_by_step_drafting():
    """The training-time-test attention pattern equals vLLM-style sequential drafting."""
    head = tiny_head()
    T, steps = 12, 4
    ids = torch.randint(0, 50, (T,))
    aux = torch.randn(T, 96)
    with torch.no_grad():
        # Batch of two with padding, to also check the length mask.
        batch_ids = torch.stack([ids, torch.cat([ids[:9], torch.zeros(3, dtype=torch.long)])])
        batch_aux = torch.stack([aux, torch.cat([aux[:9], torch.zeros(3, 96)])])
        outputs = head.unrolled(batch_ids, batch_aux, torch.tensor([T, 9]), steps)
        assert [o.shape for o in outputs] == [torch.Size([2, T, 32])] * steps
        for i in (0, 3, T - steps - 2):
            ref = reference_draft_chain(head, ids, aux, i, steps)
            for k in range(steps):
                torch.testing.assert_close(outputs[k][0, i], ref[k], atol=1e-5, rtol=1e-4)
                if i + k + 2 < 9:  # the padded copy agrees where its labels exist
                    torch.testing.assert_close(outputs[k][1, i], ref[k], atol=1e-5, rtol=1e-4)


def test_labels_shift_by_step_and_mask_prompt_and_out_of_vocab():
    head = tiny_head()
    ids = torch.arange(10)[None] * 5 % 50
    labels = head.labels(ids, torch.tensor([10]), torch.tensor([4]), steps=3)
    for k, lab in enumerate(labels):
        for i in range(10):
            pos = i + k + 2
            expected = -100
            if 4 <= pos < 10 and bool((head.draft_to_target == ids[0, pos]).any()):
                expected = int((head.draft_to_target == ids[0, pos]).nonzero())
            assert lab[0, i].item() == expected


def test_draft_vocab_and_d2t_t2d_round_trip(tmp_path):
    counts = torch.zeros(50, dtype=torch.long)
    counts[[7, 3, 41, 12]] = torch.tensor([9, 5, 7, 1])
    vocab = draft_vocab_from_counts(counts, 3)
    assert vocab.tolist() == [3, 7, 41]  # the 3 most frequent, ascending
    head = tiny_head()
    head.draft_to_target = vocab
    head.cfg.draft_vocab_size = 3
    head.lm_head = torch.nn.Linear(32, 3, bias=False)
    export_head(head, TINY_TARGET, tmp_path)
    from safetensors.torch import load_file

    t = load_file(str(tmp_path / "model.safetensors"))
    assert (t["d2t"] + torch.arange(3)).tolist() == [3, 7, 41]  # vLLM: target = draft + d2t
    assert t["t2d"].dtype == torch.bool and t["t2d"].nonzero().flatten().tolist() == [3, 7, 41]
    assert "embed_tokens.weight" not in t  # vLLM shares the target's embedding
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["draft_vocab_size"] == 3 and cfg["eagle_aux_hidden_state_layer_ids"] == [0, 1, 2]
    assert cfg["fc_norm"] and {f"fc_norm.{i}.weight" for i in range(3)} <= set(t)


def test_shard_resume_skips_finished_and_redoes_partial(tmp_path):
    draft_data.write_atomically(draft_data.shard_path(tmp_path, 0, ".json"), lambda p: p.write_text("[]"))
    (tmp_path / ".tmp-shard-00001.json").write_text("[")  # an interrupted write
    assert draft_data.pending_shards(tmp_path, 3, ".json") == [1, 2]


def test_batches_cover_every_sequence_once_within_budget():
    lengths = [random.Random(i).randint(10, 300) for i in range(200)]
    batches = make_batches(lengths, 1024, random.Random(0))
    assert sorted(i for b in batches for i in b) == list(range(200))
    assert all(len(b) * max(lengths[i] for i in b) <= 1024 or len(b) == 1 for b in batches)


def test_offline_acceptance_counts_a_perfect_and_a_useless_head():
    head = tiny_head()
    ids = torch.randint(0, 50, (30,))
    seq = [draft_data.FeatureSequence(ids, torch.randn(30, 96), 5)]
    res = offline_acceptance(head, seq, chain=3)
    assert 1.0 <= res["acceptance_length"] <= 4.0 and len(res["per_position_rate"]) == 3
    # Rates are non-increasing: a later position can only be accepted after the earlier ones.
    rates = res["per_position_rate"]
    assert all(a >= b for a, b in zip(rates, rates[1:]))


def test_deep_steps_on_a_row_subset_equal_the_full_unroll_on_those_rows():
    head = tiny_head()
    T, steps = 14, 4
    ids = torch.randint(0, 50, (2, T))
    aux = torch.randn(2, T, 96)
    lengths = torch.tensor([T, 10])
    rows = torch.tensor([0, 3, 4, 9])
    with torch.no_grad():
        full = head.unrolled(ids, aux, lengths, steps)
        part = head.unrolled(ids, aux, lengths, steps, deep_rows=rows)
    torch.testing.assert_close(part[0], full[0])
    for k in range(1, steps):
        assert part[k].shape == (2, len(rows), 32)
        torch.testing.assert_close(part[k], full[k][:, rows], atol=1e-5, rtol=1e-4)


def test_soft_label_ce_is_the_hard_ce_for_a_one_hot_target_and_skips_outside_tokens():
    from vllm_respsp.draft.train import soft_label_ce

    head = tiny_head()
    logits = torch.randn(3, 20)
    label_draft = torch.tensor([4, 0, 19])
    outside = int(next(t for t in range(50) if t not in head.draft_to_target.tolist()))
    soft_ids = torch.stack([head.draft_to_target[label_draft], torch.full((3,), outside)], -1)
    # The outside-vocabulary token carries most of the mass: renormalised over the draft
    # vocabulary the target is one-hot on the label.
    soft_logp = torch.log(torch.tensor([[0.3, 0.7]] * 3))
    torch.testing.assert_close(soft_label_ce(head, logits, soft_ids, soft_logp),
                               F.cross_entropy(logits, label_draft))


def test_ttt_loss_mixes_soft_labels_and_needs_them_when_asked():
    import pytest

    from vllm_respsp.draft.train import collate, ttt_loss

    head = tiny_head()
    T = 16
    ids = head.draft_to_target[torch.randint(0, 20, (T,))]
    soft_ids = torch.stack([torch.roll(ids, -1), torch.roll(ids, -2)], -1).to(torch.int32)
    soft_logp = torch.log(torch.tensor([[0.9, 0.1]] * T)).half()
    seq = draft_data.FeatureSequence(ids, torch.randn(T, 96).bfloat16(), 3, soft_ids, soft_logp)
    batch = collate([seq])
    hard, _ = ttt_loss(head, batch, 3, 0.8)
    soft, stats = ttt_loss(head, batch, 3, 0.8, soft_weight=1.0, deep_row_fraction=0.5)
    assert torch.isfinite(soft) and soft.item() != hard.item()
    assert len(stats) == 3 and all(n > 0 for _, n in stats)
    soft.backward()
    assert head.fc.weight.grad is not None
    with pytest.raises(ValueError, match="soft_label_weight"):
        ttt_loss(head, collate([draft_data.FeatureSequence(ids, seq.aux, 3)]), 1, 0.8, soft_weight=1.0)


def test_reply_plans_are_frozen_and_shards_checked_against_them(tmp_path, monkeypatch):
    """A plan is made once, reused as written, refused when the config it depends on changed;
    a shard that does not hold its plan slice is refused."""
    from vllm_respsp.draft import replies
    from vllm_respsp.testbed import prompts as prompt_sets

    fake = [prompt_sets.Prompt(f"x/{i}", "w " * (i % 40 + 1)) for i in range(50)]
    monkeypatch.setitem(prompt_sets.PROMPT_SETS, "fake-set", lambda: list(fake))

    class Tok:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": text.split()}

        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
            return messages[0]["content"]

    cfg = replies.ReplyConfig(max_prompt_tokens=30, prompts_per_shard=8)
    plan = replies.load_or_make_plan(tmp_path / "fake-set", "fake-set", Tok(), cfg)
    assert all(8 <= len(next(p for p in fake if p.id == pid).text.split()) <= 30 for pid in plan)
    assert sorted(plan) != plan and len(plan) == len(set(plan))  # a seeded shuffle of what fits
    fake.reverse()  # the source changes order: the written plan still wins
    assert replies.load_or_make_plan(tmp_path / "fake-set", "fake-set", Tok(), cfg) == plan
    with pytest.raises(ValueError, match="planned with"):
        replies.load_or_make_plan(tmp_path / "fake-set", "fake-set", Tok(), replies.ReplyConfig(max_prompt_tokens=31))
    slices = replies.plan_slices(plan, cfg, limit=20)
    assert [len(s) for s in slices] == [8, 8, 4]
    shard = replies.shard_file(tmp_path / "fake-set", 1)
    replies.write_gz_json(shard, [{"id": pid, "prompt_ids": [1], "reply_ids": [2]} for pid in slices[1]])
    replies.check_shard(shard, slices[1])
    with pytest.raises(ValueError, match="does not hold its plan slice"):
        replies.check_shard(shard, slices[0])
    with pytest.raises(ValueError, match="benchmark or held-out"):
        replies.check_source("mt-bench")
    # what a policy's traces must leave out (`record --unseen-by-head`): every planned prompt
    assert replies.planned_prompt_ids(tmp_path) == set(plan)


def test_sources_interleave_in_proportion():
    from vllm_respsp.draft.replies import interleaved

    shards = [("a", i, 4) for i in range(4)] + [("b", i, 2) for i in range(2)]
    order = [shards[i] for i in interleaved(shards, ["a", "b"])]
    assert [s[0] for s in order] == ["a", "b", "a", "a", "b", "a"]
    # every prefix of the order mixes the sources like the whole: the data fractions do too
    assert order[:3] == [("a", 0, 4), ("b", 0, 2), ("a", 1, 4)]


def test_data_fractions_keep_the_held_out_slice_fixed():
    from vllm_respsp.draft.train import TrainConfig, split_sequences

    seqs = list(range(100))
    train_all, held = split_sequences(seqs, TrainConfig(heldout_sequences=10))
    train_eighth, held_eighth = split_sequences(seqs, TrainConfig(heldout_sequences=10, data_fraction=0.125))
    assert held == held_eighth == list(range(10))
    assert train_all == list(range(10, 100)) and train_eighth == train_all[:11]
    # a run on a fraction may load only the leading sequences it reads, and splits them alike
    assert split_sequences(seqs[:21], TrainConfig(heldout_sequences=10, data_fraction=0.125), total=100) == \
        (train_eighth, held)
    with pytest.raises(ValueError, match="only 20 were loaded"):
        split_sequences(seqs[:20], TrainConfig(heldout_sequences=10, data_fraction=0.125), total=100)


def test_a_data_fraction_needs_only_its_leading_reply_shards():
    from vllm_respsp.draft.data import DataConfig, count_sequences, leading_shards
    from vllm_respsp.draft.replies import default_replies_dir, read_gz_json, reply_shards
    from vllm_respsp.draft.train import TrainConfig, sequences_read

    cfg, replies = DataConfig(), default_replies_dir()  # the committed replies
    total = count_sequences(replies, cfg)
    needed = sequences_read(total, TrainConfig(data_fraction=0.125))
    shards = leading_shards(replies, cfg, needed)
    every = reply_shards(replies, cfg.sources, cfg.replies)
    assert shards == every[:len(shards)] and len(shards) < len(every) / 4
    sizes = [len(read_gz_json(path)) for _, _, path in shards]
    assert sum(sizes) >= needed > sum(sizes[:-1])  # the fewest that hold them
    assert leading_shards(replies, cfg, total) == every


def test_scaling_curve_plot_and_ablation_names(tmp_path):
    from vllm_respsp.draft import scaling
    from vllm_respsp.draft.plots import plot_curve
    from vllm_respsp.draft.train import TrainConfig

    points = [{"train_tokens": t, "heldout_acc": [0.3 + a, 0.2 + a, 0.1 + a], "offline_acceptance_length": 1.5 + a,
               "vllm_mtbench": {"acceptance_length": 1.4 + a}} for t, a in ((5e5, 0.0), (1e6, 0.05), (4e6, 0.1))]
    plot_curve(points, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 1000
    fields = set(TrainConfig.__dataclass_fields__)
    assert all(set(o) <= fields for o in scaling.ABLATIONS.values())  # every lever is a real field


def test_the_curve_reading_extrapolates_todays_recipe_only():
    from dataclasses import asdict

    from vllm_respsp.draft.card import curve_reading
    from vllm_respsp.draft.train import TrainConfig

    def point(tokens, length, first, **recipe):
        return {"train_tokens": tokens, "train": asdict(TrainConfig(**recipe)),
                "vllm_mtbench": {"acceptance_length": length, "per_position_rate": [first, 0.1]}}

    # +0.1 per doubling from 1.5 at 1M: 2.0 at 32M; the first position +0.05 from 0.4: 0.55 at 8M
    points = [point(2 ** k * 1e6, 1.5 + 0.1 * k, 0.4 + 0.05 * k) for k in range(3)]
    lines = curve_reading(points + [point(8e6, 3.0, 0.9, epochs=1)], train_seconds_per_token=3600 / 1e6)
    assert "+0.100 per doubling" in lines[2] and "2.0 at ~32M training tokens (8.0x the most here), ~32 h" in lines[2]
    assert "+0.050 per doubling" in lines[3] and "0.55 at ~8M" in lines[3]
    assert curve_reading(points[:1], None) == []  # one point is no line


def test_scaling_points_are_kept_merged_by_name_and_reused_without_features(tmp_path, monkeypatch):
    """The next session has no features: points kept in the committed folder are not measured
    again, a new ablation is added beside them, and the head's card gets both tables."""
    from dataclasses import asdict, replace

    from vllm_respsp.draft import scaling
    from vllm_respsp.draft.train import TrainConfig

    head = tmp_path / "head"
    head.mkdir()
    summary = {  # what the pipeline writes beside a head it exported (before any scaling run)
        "data": {"aux_layers": [2, 15, 27], "replies": {"seed": 0, "max_prompt_tokens": 768, "max_new_tokens": 512},
                 "sources": [{"source": "sharegpt-train", "prompts": 10, "prompt_tokens": 900, "reply_tokens": 2000}],
                 "tokens": 2900, "sequences": 10, "draft_vocab_coverage": 0.97},
        "train": asdict(TrainConfig()), "train_log_tail": "{}",
        "heldout_curve": [{"step": 1000, "tokens": 5e5, "heldout_acc": [0.4, 0.2]}],
        "offline_estimate": {"rounds": 100, "acceptance_length": 1.7, "per_position_rate": [0.5, 0.2]}}
    (head / "pipeline_summary.json").write_text(json.dumps(summary))
    monkeypatch.setattr(scaling, "shipped_head_path", lambda: head)
    measured = []

    def fake_measure(name, overrides, work, mtbench):  # training a point takes minutes to an hour
        measured.append(name)
        return {"name": name, "overrides": overrides, "train": asdict(replace(scaling.TrainConfig(), **overrides)),
                "train_tokens": 1000 * (len(measured) + 1),
                "heldout_acc": [0.5, 0.3], "offline_acceptance_length": 1.7,
                "vllm_mtbench": {"prompts": mtbench, "acceptance_length": 1.6, "per_position_rate": [0.4, 0.1]}}

    monkeypatch.setattr(scaling, "measure", fake_measure)
    kept = tmp_path / "scaling"
    scaling.main(["curve", "--fractions", "0.125", "0.25", "--mtbench", "4", "--out", str(kept)])
    scaling.main(["ablate", "--only", "baseline", "ttt_7_steps", "--mtbench", "4", "--out", str(kept)])
    assert measured == ["fraction-0.125", "fraction-0.25", "ablate-ttt_7_steps-0.125"]  # baseline reused
    scaling.main(["ablate", "--only", "epochs_1", "--mtbench", "4", "--out", str(kept)])
    scaling.main(["curve", "--fractions", "0.125", "--mtbench", "8", "--out", str(kept)])  # other prompt count
    assert measured[3:] == ["ablate-epochs_1-0.125", "fraction-0.125"]
    kept_points = scaling.load_scaling(kept)
    assert [p["name"] for p in kept_points["ablations"]] == [
        "fraction-0.125", "ablate-ttt_7_steps-0.125", "ablate-epochs_1-0.125"]
    card = (head / "MODEL_CARD.md").read_text()
    assert "## Scaling curve" in card and "| ttt_7_steps | `ttt_steps=7` |" in card
    assert card.index("| baseline | the curve's point |") < card.index("| ttt_7_steps |")
    assert "Against the baseline" not in card  # one recipe, one table
    # a point trained before a default of the recipe changed is stale: measured again, and the
    # old one kept under a name that says how its recipe differs from today's
    from vllm_respsp.draft import train

    epochs_3 = lambda **kw: replace(TrainConfig(epochs=3), **kw)  # noqa: E731
    monkeypatch.setattr(scaling, "TrainConfig", epochs_3)
    monkeypatch.setattr(train, "TrainConfig", epochs_3)
    scaling.main(["curve", "--fractions", "0.25", "--mtbench", "4", "--out", str(kept)])
    scaling.main(["ablate", "--only", "baseline", "--mtbench", "4", "--out", str(kept)])
    assert measured[5:] == ["fraction-0.25", "fraction-0.125"]
    kept_points = scaling.load_scaling(kept)
    assert [p["name"] for p in kept_points["curve"]] == ["fraction-0.125", "fraction-0.25", "fraction-0.25 (epochs=2)"]
    assert [p["name"] for p in kept_points["ablations"]] == [
        "fraction-0.125", "ablate-ttt_7_steps-0.125", "ablate-epochs_1-0.125", "fraction-0.125 (epochs=2)"]
    card = (head / "MODEL_CARD.md").read_text()
    assert "| epochs=2 | 0.25 |" in card and "| TrainConfig defaults | 0.25 |" in card
    # each lever sits under the baseline it differs least from: the old ones under the old recipe
    old_table = card.index("Against the baseline of recipe: epochs=2")
    new_table = card.index("Against the baseline of recipe: TrainConfig defaults")
    assert new_table < old_table < card.index("| ttt_7_steps |")
    assert (head / "scaling_curve.png").stat().st_size > 1000
    monkeypatch.setattr(scaling, "TrainConfig", TrainConfig)
    monkeypatch.setattr(train, "TrainConfig", TrainConfig)
    # a head from before the per-source data pipeline keeps its own card (it cannot be rendered
    # anew) and gets the scaling section appended once, then replaced in place
    del summary["data"]["sources"]
    (head / "pipeline_summary.json").write_text(json.dumps(summary))
    (head / "MODEL_CARD.md").write_text("# the old card\n\nits results\n")
    scaling.refresh_shipped_card(kept_points)
    scaling.refresh_shipped_card({"curve": kept_points["curve"]})
    card = (head / "MODEL_CARD.md").read_text()
    assert card.startswith("# the old card\n\nits results\n\n" + scaling.SCALING_BEGIN)
    assert card.count("## Scaling curve") == 1 and "epochs_1" not in card
    assert card.rstrip().endswith(scaling.SCALING_END)


def test_a_point_is_measured_in_vllm_once_per_head(tmp_path, monkeypatch):
    """The main run's point takes the shipped head's own evaluation; another point's vLLM figure
    is cached per prompt count and training config (a retrained point has a new head)."""
    from dataclasses import asdict

    from vllm_respsp.draft import scaling
    from vllm_respsp.draft.train import TrainConfig

    def summary(**overrides):
        return {"train": scaling.point_config(overrides), "data": {"train_tokens": 1000},
                "heldout_curve": [{"heldout_acc": [0.5]}], "offline_estimate": {"acceptance_length": 1.5}}

    head = tmp_path / "head"
    head.mkdir()
    shipped = {**summary(), "vllm_eval": {"mt_bench": {"prompts": 80, "acceptance_length": 1.9}}}
    (head / "pipeline_summary.json").write_text(json.dumps(shipped))
    monkeypatch.setattr(scaling, "shipped_head_path", lambda: head)
    trained, measured = [], []
    epochs = {"value": 1}
    monkeypatch.setattr(scaling, "run_point", lambda name, o, work: trained.append(name) or summary(
        **o, epochs=epochs["value"]))
    monkeypatch.setattr(scaling, "vllm_acceptance", lambda h, n: measured.append(h) or {"acceptance_length": 1.4})
    main_point = scaling.measure("fraction-1", {"data_fraction": 1.0}, tmp_path, 80)
    assert main_point["vllm_mtbench"]["acceptance_length"] == 1.9 and trained == measured == []
    assert main_point["train"] == asdict(TrainConfig())
    eighth = {"data_fraction": 0.125}
    for _ in range(2):
        assert scaling.measure("fraction-0.125", eighth, tmp_path, 80)["vllm_mtbench"] == {
            "prompts": 80, "acceptance_length": 1.4}
    assert measured == [tmp_path / "runs" / "fraction-0.125" / "head"]
    epochs["value"] = 3  # retrained with another recipe: a new head, measured again
    scaling.measure("fraction-0.125", eighth, tmp_path, 80)
    assert len(measured) == 2


def test_the_default_recipe_point_shares_the_main_training(tmp_path):
    from vllm_respsp.draft import scaling

    scaling.share_main_training("fraction-1", {"data_fraction": 1.0}, tmp_path)
    scaling.share_main_training("fraction-0.5", {"data_fraction": 0.5}, tmp_path)
    linked = tmp_path / "runs" / "fraction-1" / "train"
    assert linked.is_symlink() and linked.resolve() == (tmp_path / "train").resolve()
    (tmp_path / "train" / "checkpoint.pt").write_bytes(b"x")  # what the main run writes, the point reads
    assert (linked / "checkpoint.pt").read_bytes() == b"x"
    assert not (tmp_path / "runs" / "fraction-0.5").exists()  # another recipe trains on its own


def test_training_interrupted_between_checkpoints_resumes_to_the_same_head(tmp_path, monkeypatch):
    """A run killed after its step-2 checkpoint and started again ends with the weights, token
    count and log of a run that was never interrupted (weights, optimizer, data position, RNG)."""
    from safetensors.torch import save_file

    from vllm_respsp.draft import train as draft_train
    from vllm_respsp.draft.data import FeatureSequence

    target = tmp_path / "target"
    target.mkdir()
    (target / "config.json").write_text(json.dumps(TINY_TARGET))
    save_file({"model.embed_tokens.weight": torch.randn(50, 32, generator=torch.Generator().manual_seed(1))},
              str(target / "model.safetensors"))
    gen = torch.Generator().manual_seed(0)
    sequences = [FeatureSequence(torch.randint(0, 50, (n,), generator=gen), torch.randn(n, 96, generator=gen)
                                 .to(torch.bfloat16), 3) for n in (12, 9, 14, 10, 11, 13, 8, 12, 10, 9)]
    cfg = draft_train.TrainConfig(draft_vocab_size=40, ttt_steps=2, tokens_per_batch=16, heldout_sequences=2,
                                  checkpoint_every=2, eval_every=1000, single_step_epochs=0.5, epochs=2,
                                  init_midlayer_from_target=False)  # the tiny target has only embeddings
    vocab = torch.arange(40)

    def run(out):
        head = draft_train.train(sequences, target, out, cfg, vocab, (0, 1, 2))
        log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
        return head.state_dict(), log

    real_save = draft_train.torch.save

    def save_after_the_log(obj, path):  # a checkpoint is written only with its steps already logged
        logged = (path.parent / "train_log.jsonl").read_text().splitlines()
        assert json.loads(logged[-1])["step"] == obj["step"]
        real_save(obj, path)

    monkeypatch.setattr(draft_train.torch, "save", save_after_the_log)
    reference, reference_log = run(tmp_path / "whole")
    real_loss, calls = draft_train.ttt_loss, {"n": 0}

    def killed_after_three_steps(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt  # as a session end does, between checkpoints (step 2 written)
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(draft_train, "ttt_loss", killed_after_three_steps)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed")
    monkeypatch.setattr(draft_train, "ttt_loss", real_loss)
    resumed, log = run(tmp_path / "resumed")
    assert reference_log[-1]["step"] > 4
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
    assert log[-1]["tokens"] == reference_log[-1]["tokens"] == 2 * sum(len(s.ids) for s in sequences[2:])
    assert log[-1]["heldout_acc"] == reference_log[-1]["heldout_acc"]
    # the killed run's step 3 (after its last checkpoint) was trained again, and logged once
    untimed = [[{k: v for k, v in r.items() if k != "seconds"} for r in rows] for rows in (log, reference_log)]
    assert untimed[0] == untimed[1]
