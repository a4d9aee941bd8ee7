"""A gymnasium environment over trace tables: one episode = one recorded generation.

Observation  float32 [F + 2]: the trace features at the current position, then
             simulator.EXTRA_FEATURES (log2 batch load / 6, EMA of accepted draft tokens / max depth).
Action       Discrete(num_actions): index into the trace set's action set.
Transition   the action is held for `hold` engine steps (persistence N; 1 = decide every step).
             Each step at position p gains g = min(A[p, a] + 1, P - p) tokens, costs the
             request's share t[p, a] of a modelled step at this episode's batch load (what
             that action's tree does there: simulator.step_costs), and moves to p + g. The
             episode ends at the end of the generation.
Reward       Σ over the held steps of  g - ρ_B · t[p, a]
             ρ_B is a reference rate in tokens/s for the episode's batch load B (default: the
             best static shape's rate on the env's traces). Why this and not Re-SpS's g/t:
             - an episode always covers the same P tokens, so its return is P - ρ_B · (episode
               seconds): maximizing it is exactly minimizing time, i.e. maximizing tokens/s,
               with drafting and verification both in t. A sum of per-step ratios g/t is not
               tokens/s (it overweights many cheap short steps).
             - it is Dinkelbach's objective (see simulator.py): positive return means the
               policy beats ρ_B on this text, so rewards are comparable across batch loads.
Batch load   sampled per episode from `batch_loads` (e.g. 1, 8, 64): one policy, all loads.
Windows      with `episode_steps` set, an episode starts at a random position and is truncated
             after that many decisions (gymnasium `truncated`; PPO bootstraps from the value).
             The return is then Dinkelbach's Σ(g - ρ_B t) over the window, still maximized by
             the tokens/s-optimal policy when ρ_B is near the optimal rate. Why: the value of
             "the rest of the generation" depends on how much text is left, which the policy
             does not observe; short windows make value targets learnable.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

from vllm_respsp.policy.cost import CostModel
from vllm_respsp.policy.simulator import EXTRA_FEATURES, best_static, extra_features, step_costs, update_recent
from vllm_respsp.policy.traces import TraceSet


class TraceEnv(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self, traces: TraceSet, cost: CostModel, batch_loads=(1, 8, 64), hold: int = 1,
                 reference_rates: dict[int, float] | None = None, context: int | None = None,
                 episode_steps: int | None = None):
        super().__init__()
        if hold < 1:
            raise ValueError(f"hold must be >= 1, got {hold}")
        if not traces.generations:
            raise ValueError("TraceEnv needs at least one generation")
        self.traces, self.hold, self.episode_steps = traces, hold, episode_steps
        self.batch_loads = tuple(int(b) for b in batch_loads)
        self.max_depth = max(a.depth for a in traces.actions)
        self.costs = {b: [step_costs(traces, g, cost, b, context) for g in traces.generations]
                      for b in self.batch_loads}
        self.reference_rates = reference_rates or {
            b: best_static(traces, cost, b, context)[1] for b in self.batch_loads}
        width = traces.feature_dim + len(EXTRA_FEATURES)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (width,), np.float32)
        self.action_space = gym.spaces.Discrete(traces.num_actions)
        self._index = 0
        self._gen = self.traces.generations[0]
        self._pos, self._recent, self._batch, self._steps = 0, 0.0, self.batch_loads[0], 0

    def _obs(self) -> np.ndarray:
        pos = min(self._pos, self._gen.num_positions - 1)
        extras = extra_features(self._batch, self._recent, self.max_depth)
        return np.concatenate([self._gen.features[pos], extras]).astype(np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._index = int(self.np_random.integers(len(self.traces.generations)))
        self._gen = self.traces.generations[self._index]
        self._batch = (options or {}).get("batch") or int(self.np_random.choice(self.batch_loads))
        self._pos, self._recent, self._steps = 0, 0.0, 0
        if self.episode_steps:
            self._pos = int(self.np_random.integers(self._gen.num_positions))
        return self._obs(), {"batch": self._batch}

    def step(self, action):
        action = int(action)
        P, rho = self._gen.num_positions, self.reference_rates[self._batch]
        costs = self.costs[self._batch][self._index]
        reward = tokens = seconds = 0.0
        for _ in range(self.hold):
            if self._pos >= P:
                break
            accepted = int(self._gen.accepted[self._pos, action])
            gain = min(accepted + 1, P - self._pos)
            reward += gain - rho * costs[self._pos, action]
            tokens, seconds = tokens + gain, seconds + costs[self._pos, action]
            self._pos += gain
            self._recent = update_recent(self._recent, accepted)
        self._steps += 1
        terminated = self._pos >= P
        truncated = bool(self.episode_steps) and not terminated and self._steps >= self.episode_steps
        info = {"tokens": tokens, "seconds": seconds, "batch": self._batch}
        return self._obs(), float(reward), terminated, truncated, info
