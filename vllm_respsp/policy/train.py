"""Train shape policies on trace tables and write policy files.

    python -m vllm_respsp.policy.train --traces TRACES.json --profile cpu-smollm2-135m \\
        --out policy_dir [--algo bandit ppo] [--batch-loads 1 8 64] [--hold 1] [--seed 0]
    python -m vllm_respsp.policy.train --synthetic --out /tmp/p --ppo-steps 2000   # smoke run

Writes <out>/<algo>.json + .safetensors per algorithm (the JSON is the policy file) and
<out>/report.json: tokens/s on held-out generations for no speculation, the best static shape
(tuned on the training generations), EAGLE-3's default, the exact oracle and each policy, the
policy behind its load gate (`max_draft_load`, tuned on the training generations:
simulator.draft_load_limit).

(a) bandit: the trace table gives the outcome of *every* action at every position, so the
    contextual bandit has full feedback and reduces to regression: an MLP predicts, per action,
    y[a] = g(p, a) - ρ_B · t_B[a] (tokens gained minus the reference rate times seconds, the
    env's per-step reward) from the observation; the policy takes the argmax. It is myopic by
    construction (where a step lands is ignored), which is what PPO can improve on.
(b) ppo: stable-baselines3 PPO on TraceEnv with the same network as its actor (the
    observation encoder is SB3's features extractor), exported weight for weight.
Seeds are fixed (numpy, torch, SB3, env); one torch thread, so runs repeat exactly.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from vllm_respsp.policy.batch_sim import policy_chooser, simulate_batch
from vllm_respsp.policy.coordinate import Coordination
from vllm_respsp.policy.cost import CostModel, load_cost_model
from vllm_respsp.policy.network import PolicyNet
from vllm_respsp.policy.policy_file import save_policy
from vllm_respsp.policy.pools import pool_depths
from vllm_respsp.policy.shape_policy import ShapePolicy
from vllm_respsp.policy.simulator import (
    EXTRA_FEATURES,
    best_static,
    draft_load_limit,
    drafts_at,
    eagle3_default_rate,
    extra_features,
    no_speculation_rate,
    oracle,
    simulate,
    simulate_gated,
    step_costs,
    update_recent,
)
from vllm_respsp.policy.traces import FeatureSpec, TraceError, TraceSet, load_traces, synthetic_traces
from vllm_respsp.tree.shape import EAGLE3_DEFAULT, TreeShape, chain, resps_actions


def synthetic_action_set() -> list[TreeShape]:
    """Re-SpS's 177 actions (all >= 32 nodes) plus small trees, chains and EAGLE-3's default:
    on the CPU profile verified tokens are dear, so without small shapes a policy has nothing
    sensible to pick at batch 8-64."""
    small = [chain(1), chain(2), chain(3), chain(4), TreeShape(8, 3, 4), TreeShape(16, 5, 4),
             EAGLE3_DEFAULT]
    return small + [a for a in resps_actions() if a not in small]


# Analysis only, never served: what the drafted pools show (per pool, the best node's cumulative
# draft probability at each depth). A policy choosing a shape cannot see it, since it only
# exists after drafting every pool; a bandit trained with it bounds what draft-side confidence
# could buy a policy (benchmarks.policy_report's "drafted" runs). The engine refuses policy files
# that ask for it (features.feature_dims does not know it).
DRAFTED_SCORES = "drafted_scores"


def drafted_scores(g) -> np.ndarray:
    """float32 [P, sum of pool depths] for DRAFTED_SCORES."""
    blocks = []
    for pool in g.pools:
        depths = pool_depths(pool.shape)
        blocks += [np.exp(pool.scores[:, depths == d].max(-1)) for d in range(1, pool.shape.depth + 1)]
    return np.stack(blocks, -1).astype(np.float32)


def select_features(traces: TraceSet, names: list[str]) -> TraceSet:
    """The same trace set with only the named feature blocks, in the given order."""
    offsets, start = {}, 0
    for f in traces.feature_spec:
        offsets[f.name] = (start, start + f.dim, f)
        start += f.dim
    if DRAFTED_SCORES in names and traces.pool_shapes:
        offsets[DRAFTED_SCORES] = (start, start + sum(p.depth for p in traces.pool_shapes),
                                   FeatureSpec(DRAFTED_SCORES, sum(p.depth for p in traces.pool_shapes)))
        traces = dataclasses.replace(traces, generations=[
            dataclasses.replace(g, features=np.concatenate([g.features, drafted_scores(g)], 1))
            for g in traces.generations])
    missing = [n for n in names if n not in offsets]
    if missing:
        raise SystemExit(f"--features {missing}: not in the traces; they hold {list(offsets)}"
                         f"{'' if traces.pool_shapes else f' ({DRAFTED_SCORES} needs recorded pools)'}")
    cols = np.concatenate([np.arange(*offsets[n][:2]) for n in names]) if names else np.arange(0)
    gens = [dataclasses.replace(g, features=np.ascontiguousarray(g.features[:, cols])) for g in traces.generations]
    return dataclasses.replace(traces, feature_spec=[offsets[n][2] for n in names], generations=gens)


def make_net(traces: TraceSet, proj_dim: int, hidden: tuple[int, ...], activation: str,
             seed: int) -> PolicyNet:
    torch.manual_seed(seed)
    net = PolicyNet(traces.feature_dim, len(EXTRA_FEATURES), traces.num_actions, proj_dim, hidden,
                    activation)
    feats = np.concatenate([g.features for g in traces.generations])
    net.encoder.set_normalization(feats.mean(0), feats.std(0))
    return net


def bandit_dataset(traces: TraceSet, cost: CostModel, batch_loads, rates: dict[int, float]):
    """(observations [N, F+E], targets [N, A], {load: (mean, std)}) over every position and
    batch load; the targets of each load are standardized by its (mean, std).

    The recent-acceptance extra depends on the path; it is taken from a walk with the best
    static action (what an engine running the static fallback would have seen), carried
    forward over the positions that walk skips.
    """
    max_depth = max(a.depth for a in traces.actions)
    obs, targets, scales = [], [], {}
    for batch in batch_loads:
        static, _ = best_static(traces, cost, batch)
        block = []
        for g in traces.generations:
            costs = step_costs(traces, g, cost, batch)
            P = g.num_positions
            gains = np.minimum(g.accepted.astype(np.int64) + 1, (P - np.arange(P))[:, None])
            recent, next_visit = 0.0, 0
            extras = np.empty((P, len(EXTRA_FEATURES)), dtype=np.float32)
            for p in range(P):
                extras[p] = extra_features(batch, recent, max_depth)
                if p == next_visit:
                    recent = update_recent(recent, int(g.accepted[p, static]))
                    next_visit = p + gains[p, static]
            obs.append(np.concatenate([g.features, extras], axis=1))
            block.append(gains - rates[batch] * costs)
        # Standardize per batch load: at batch 64 the ρ·t term is tens of tokens, at batch 1
        # a few, and unscaled MSE would fit only the heavy loads. A shift and a positive scale
        # shared by all actions of a row leave the argmax unchanged.
        block = np.concatenate(block)
        scales[batch] = (float(block.mean()), float(block.std() + 1e-6))
        targets.append((block - scales[batch][0]) / scales[batch][1])
    return (torch.as_tensor(np.concatenate(obs), dtype=torch.float32),
            torch.as_tensor(np.concatenate(targets), dtype=torch.float32), scales)


def train_bandit(net: PolicyNet, traces: TraceSet, cost: CostModel, batch_loads,
                 rates: dict[int, float], epochs: int = 20, lr: float = 3e-3,
                 minibatch: int = 256, seed: int = 0) -> dict:
    x, y, scales = bandit_dataset(traces, cost, batch_loads, rates)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    losses = []
    for _ in tqdm(range(epochs), desc="bandit", unit="epoch"):
        order = torch.randperm(len(x), generator=gen)
        total = 0.0
        for i in range(0, len(x), minibatch):
            idx = order[i:i + minibatch]
            loss = torch.nn.functional.mse_loss(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        losses.append(total / len(x))
    net.eval()
    return {"algo": "bandit", "epochs": epochs, "lr": lr, "rows": len(x), "final_mse": losses[-1],
            "target_scale": scales}


def bandit_coordination(scales: dict[int, tuple[float, float]], rates: dict[int, float],
                        cost: CostModel) -> Coordination:
    """The units of a trained bandit's scores ({load: (mean, std)} of its targets, from
    `train_bandit`), for batch-coordinated choice in the engine."""
    loads = sorted(scales)
    pass_seconds = dict(zip(cost.terms, cost.coefficients)).get("draft_pass", 0.0)
    return Coordination(tuple(loads), tuple(scales[b][0] for b in loads), tuple(scales[b][1] for b in loads),
                        tuple(rates[b] for b in loads), float(pass_seconds))


def train_ppo(net: PolicyNet, traces: TraceSet, cost: CostModel, batch_loads, hold: int,
              rates: dict[int, float], steps: int, seed: int = 0, n_envs: int = 4,
              learning_rate: float = 1e-3, gamma: float = 0.95, gae_lambda: float = 0.5,
              episode_steps: int | None = 32, share_encoder: bool = False):
    """SB3 PPO; `net`'s encoder is the features extractor, its trunk/head the actor.

    Returns (training info, the SB3 model); `net` holds the exported actor afterwards.

    Settings, and why (checked on synthetic traces, where the SB3 defaults barely learned the
    batch-load dependence in 60k steps while these matched the best static shape in 20k):
    - short episodes (episode_steps windows from random positions, see env.py): the value of
      the rest of a generation depends on unobserved remaining length.
    - gamma 0.95, gae_lambda 0.5: a shape mostly affects its own step (its landing position
      only mildly the next ones), and long GAE sums add the reward noise of many later random
      actions to each advantage. Lower values trade a little bias for much less variance.
    - a separate critic encoder: value targets at batch 64 are far larger than at batch 1 and,
      through a shared encoder, the value loss swamps the actor's gradients.
    """
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.torch_layers import BaseFeaturesExtractor

    from vllm_respsp.policy.env import TraceEnv

    class Encoder(BaseFeaturesExtractor):
        # a copy per instance: with separate actor/critic extractors each gets its own
        def __init__(self, observation_space):
            super().__init__(observation_space, features_dim=net.encoder.out_dim)
            self.encoder = copy.deepcopy(net.encoder)

        def forward(self, obs):
            return self.encoder(obs)

    class Progress(BaseCallback):
        def _on_training_start(self):
            self.bar = tqdm(total=steps, desc="ppo", unit="step")

        def _on_step(self):
            self.bar.update(self.training_env.num_envs)
            return True

        def _on_training_end(self):
            self.bar.close()

    arch = net.architecture
    env = make_vec_env(TraceEnv, n_envs=n_envs, seed=seed, env_kwargs=dict(
        traces=traces, cost=cost, batch_loads=batch_loads, hold=hold, reference_rates=rates,
        episode_steps=episode_steps))
    n_steps = max(16, min(256, steps // n_envs))
    model = PPO("MlpPolicy", env, seed=seed, device="cpu", verbose=0, gamma=gamma,
                learning_rate=learning_rate, gae_lambda=gae_lambda,
                n_steps=n_steps, batch_size=min(64, n_steps * n_envs),
                policy_kwargs=dict(features_extractor_class=Encoder,
                                   share_features_extractor=share_encoder,
                                   net_arch=dict(pi=arch["hidden"], vf=arch["hidden"]),
                                   activation_fn={"tanh": torch.nn.Tanh,
                                                  "relu": torch.nn.ReLU}[arch["activation"]]))
    model.learn(total_timesteps=steps, callback=Progress())
    # export the actor: its features extractor, trunk and head
    net.encoder.load_state_dict(model.policy.pi_features_extractor.encoder.state_dict())
    net.trunk.load_state_dict(model.policy.mlp_extractor.policy_net.state_dict())
    net.head.load_state_dict(model.policy.action_net.state_dict())
    net.eval()
    return {"algo": "ppo", "timesteps": steps, "n_envs": n_envs, "n_steps": n_steps,
            "gamma": gamma, "gae_lambda": gae_lambda, "hold": hold, "share_encoder": share_encoder,
            "learning_rate": learning_rate, "episode_steps": episode_steps}, model


def evaluate(traces_train: TraceSet, traces_eval: TraceSet, cost: CostModel, batch_loads,
             policies: dict[str, tuple[PolicyNet, int, Coordination | None, int | None]]) -> dict:
    """Per batch load, tokens/s on `traces_eval` of the baselines and each policy. Fixed
    actions are tuned on `traces_train` only: the best static shape (or NO_DRAFTS), and where
    the action set has confidence-bounded shapes, the best one of those for every step.

    Above load 1, also in mixed batches (batch_sim: the deepest tree sets a step's draft
    passes): the best static shape and each policy as the engine runs it (`<name>_in_batch`),
    and a bandit that chooses per request without coordination (`<name>_in_batch_per_request`).
    Each policy runs behind its load gate (`<name>_drafts`: whether it drafts at that load).
    """
    out = {}
    bounded = any(a.bounded for a in traces_train.actions)
    for batch in batch_loads:
        static, _ = best_static(traces_train, cost, batch, kind="static")
        row = {"no_speculation": no_speculation_rate(cost, batch),
               "best_static": simulate(traces_eval, cost, static, batch).tokens_per_s,
               "best_static_action": str(traces_train.actions[static]),
               # the best per-step choices, or drafting nothing at all (the load gate's held steps)
               "oracle": max(oracle(traces_eval, cost, batch).tokens_per_s, no_speculation_rate(cost, batch))}
        if bounded:
            fixed, _ = best_static(traces_train, cost, batch, kind="bounded")
            row["best_bounded"] = simulate(traces_eval, cost, fixed, batch).tokens_per_s
            row["best_bounded_action"] = str(traces_train.actions[fixed])
        default = eagle3_default_rate(traces_eval, cost, batch)
        if default is not None:
            row["eagle3_default"] = default
        if batch > 1:
            row["best_static_in_batch"] = simulate_batch(traces_eval, cost, static, batch).tokens_per_s
        for name, (net, hold, coordination, max_draft_load) in policies.items():
            res = simulate_gated(traces_eval, cost, net.act, batch, hold, max_draft_load)
            row[name] = res.tokens_per_s
            row[f"{name}_acceptance_length"] = res.acceptance_length
            row[f"{name}_drafts"] = drafts_at(batch, max_draft_load)
            if batch > 1 and not drafts_at(batch, max_draft_load):  # held on NO_DRAFTS, however it runs
                row[f"{name}_in_batch"] = res.tokens_per_s
                if coordination is not None:
                    row[f"{name}_in_batch_per_request"] = res.tokens_per_s
            elif batch > 1:
                engine = ShapePolicy(net, traces_eval.actions, traces_eval.actions[static], hold,
                                     coordination=coordination)
                row[f"{name}_in_batch"] = simulate_batch(traces_eval, cost, policy_chooser(engine),
                                                         batch).tokens_per_s
                if coordination is not None:
                    engine.coordination = None
                    row[f"{name}_in_batch_per_request"] = simulate_batch(
                        traces_eval, cost, policy_chooser(engine), batch).tokens_per_s
        out[str(batch)] = row
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The arguments; `shapes`: --actions parsed (None: the traces' own)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--traces", help="trace set (<stem>.json + <stem>.safetensors)")
    src.add_argument("--synthetic", action="store_true", help="synthetic traces (smoke runs)")
    ap.add_argument("--eval-traces", nargs="*", default=[],
                    help="held-out trace sets, reported one by one (default: a split of --traces)")
    ap.add_argument("--features", nargs="*", default=None,
                    help=f"train on these feature blocks of the traces only (ablations; "
                         f"{DRAFTED_SCORES}: the drafted pools' confidence, for bounds, not servable)")
    ap.add_argument("--actions", nargs="+", default=None, metavar="SHAPE",
                    help="train with these actions: any the traces hold, or any shape their pools "
                         "cover, confidence-bounded ones included (e.g. chains only where a backend "
                         "has no tree attention and trees pay for their masks); default: the traces'")
    ap.add_argument("--no-drafts", choices=["on", "off"], default="on",
                    help="add the action that drafts nothing (NO_DRAFTS) to the traces' action set")
    ap.add_argument("--profile", default="cpu-smollm2-135m", help="profile name or path")
    ap.add_argument("--out", required=True, help="output folder for the policy files")
    ap.add_argument("--algo", nargs="+", choices=["bandit", "ppo"], default=["bandit", "ppo"])
    ap.add_argument("--batch-loads", nargs="+", type=int, default=[1, 8, 64])
    ap.add_argument("--hold", type=int, default=1, help="action persistence N (PPO and serving)")
    ap.add_argument("--gate-margin", type=float, default=0.03,
                    help="the load gate: draft only at loads where the simulated policy beats a batch "
                         "that drafts nothing by more than this share (simulator.draft_load_limit)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-fraction", type=float, default=0.2)
    ap.add_argument("--bandit-epochs", type=int, default=20)
    ap.add_argument("--bandit-rounds", type=int, default=1,
                    help="retrain the bandit with its own simulated rate as the price of a second")
    ap.add_argument("--ppo-steps", type=int, default=50_000)
    ap.add_argument("--proj-dim", type=int, default=32)
    ap.add_argument("--hidden", nargs="+", type=int, default=[64, 64])
    ap.add_argument("--synthetic-generations", type=int, default=32)
    ap.add_argument("--synthetic-positions", type=int, default=256)
    args = ap.parse_args(argv)
    try:
        args.shapes = [TreeShape.parse(a) for a in args.actions] if args.actions else None
    except ValueError as e:
        ap.error(f"--actions: {e}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)
    np.random.seed(args.seed)
    traces, train_set, eval_sets = training_sets(args)
    cost = load_cost_model(args.profile)
    rates = {b: best_static(train_set, cost, b)[1] for b in args.batch_loads}
    out = Path(args.out)
    common = dict(target=traces.target, head=traces.head,
                  cost_profile={"name": cost.profile_name, "digest": cost.profile_digest})
    policies, files = {}, {}
    for algo in args.algo:
        if algo == "bandit":
            net, info, coordination = fit_bandit(args, train_set, cost, rates)
            hold = 1  # a bandit decides every step
        else:
            net = make_net(train_set, args.proj_dim, tuple(args.hidden), "tanh", args.seed)
            info, _ = train_ppo(net, train_set, cost, args.batch_loads, args.hold, rates,
                                args.ppo_steps, seed=args.seed)
            coordination = None  # an actor's logits are not values: nothing to add up
            hold = args.hold
        max_draft_load = draft_load_limit(train_set, cost, net.act, hold, margin=args.gate_margin)
        info.update(seed=args.seed, batch_loads=args.batch_loads, reference_rates=rates,
                    traces=args.traces or "synthetic", gate_margin=args.gate_margin,
                    train_generations=len(train_set.generations))
        files[algo] = str(save_policy(out / algo, net, traces.actions, traces.feature_spec,
                                      hold=hold, training=info, coordination=coordination,
                                      max_draft_load=max_draft_load, **common))
        policies[algo] = (net, hold, coordination, max_draft_load)
    report = {"profile": cost.profile_name, "cost_model": cost.describe(), "files": files,
              "features": [f.name for f in traces.feature_spec],
              "tokens_per_s_on_eval": {name: evaluate(train_set, eval_set, cost, args.batch_loads, policies)
                                       for name, eval_set in eval_sets.items()}}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report["tokens_per_s_on_eval"], indent=1))
    return report


def training_sets(args) -> tuple[TraceSet, TraceSet, dict[str, TraceSet]]:
    """The traces (features, actions and NO_DRAFTS as the arguments ask), the part trained on,
    and the held-out sets by name (`--eval-traces`, or a split of the traces)."""
    traces = (load_traces(args.traces) if args.traces else synthetic_traces(
        synthetic_action_set(), args.synthetic_generations, args.synthetic_positions, seed=args.seed))

    def prepare(t: TraceSet) -> TraceSet:
        t = select_features(t, args.features) if args.features is not None else t
        try:
            t = t.with_actions(args.shapes) if args.shapes is not None else t
        except TraceError as e:
            raise SystemExit(f"--actions: {e}") from None
        return t.with_no_drafts() if args.no_drafts == "on" else t

    traces = prepare(traces)
    if args.eval_traces:
        return traces, traces, {Path(t).name.removesuffix(".json"): prepare(load_traces(t)) for t in args.eval_traces}
    train_set, eval_set = traces.split(args.eval_fraction, seed=args.seed)
    return traces, train_set, {"eval": eval_set if eval_set.generations else train_set}


def fit_bandit(args, train_set: TraceSet, cost, rates: dict[int, float]):
    """The bandit, its training info and its coordination block (`--bandit-rounds`: retrained
    with its own simulated rate as the price of a second)."""
    net = make_net(train_set, args.proj_dim, tuple(args.hidden), "tanh", args.seed)
    info = train_bandit(net, train_set, cost, args.batch_loads, rates, args.bandit_epochs, seed=args.seed)
    for _ in range(args.bandit_rounds - 1):
        # Dinkelbach: the reward's price of a second is the rate being maximized; the
        # best static one is a floor, the policy's own (higher) rate the next estimate
        own = {b: max(rates[b], simulate(train_set, cost, net.act, b).tokens_per_s) for b in args.batch_loads}
        net = make_net(train_set, args.proj_dim, tuple(args.hidden), "tanh", args.seed)
        info = train_bandit(net, train_set, cost, args.batch_loads, own, args.bandit_epochs, seed=args.seed)
        info["reward_rates"] = own
    # the scales go into the policy file's coordination block, not twice into `training`
    coordination = bandit_coordination(info.pop("target_scale"), info.get("reward_rates", rates), cost)
    return net, info, coordination


if __name__ == "__main__":
    main()
