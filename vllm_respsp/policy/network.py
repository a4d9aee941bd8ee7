"""The policy network, shared by the bandit, PPO (as its actor) and the in-engine ShapePolicy.

    observation [B, F + E] = trace/engine features [B, F]  ++  extras [B, E] (simulator.EXTRA_FEATURES)
    encoder:  normalize the F features with stored mean/std, project them with a learned
              Linear(F -> proj_dim), append the extras unchanged
    trunk:    Linear + activation layers (SB3's MlpExtractor policy_net layout, so PPO's actor
              exports weight for weight)
    head:     Linear -> one score per action; the policy is the argmax

F comes from the trace's feature spec (e.g. EAGLE-3's fused features, 3 x hidden size), never
from a constant: Re-SpS hard-coded 4096 (design.md §2). The projection is what makes one
architecture serve any target model.
"""

from __future__ import annotations

import torch
from torch import nn

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}


class ObsEncoder(nn.Module):
    def __init__(self, feature_dim: int, extra_dim: int, proj_dim: int):
        super().__init__()
        self.feature_dim, self.extra_dim = feature_dim, extra_dim
        # Hidden states have model-specific scales; normalizing keeps the same learning rates
        # working for every target. Filled from the training traces (set_normalization).
        self.register_buffer("feature_mean", torch.zeros(feature_dim))
        self.register_buffer("feature_std", torch.ones(feature_dim))
        self.project = nn.Linear(feature_dim, proj_dim)
        self.out_dim = proj_dim + extra_dim

    def set_normalization(self, mean, std) -> None:
        self.feature_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.feature_std.copy_(torch.as_tensor(std, dtype=torch.float32).clamp_min(1e-6))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        features, extras = obs[:, : self.feature_dim], obs[:, self.feature_dim:]
        z = self.project((features - self.feature_mean) / self.feature_std)
        return torch.cat([z, extras], dim=-1)


def mlp(in_dim: int, hidden: tuple[int, ...], activation: str) -> tuple[nn.Sequential, int]:
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(in_dim, h), ACTIVATIONS[activation]()]
        in_dim = h
    return nn.Sequential(*layers), in_dim


class PolicyNet(nn.Module):
    def __init__(self, feature_dim: int, extra_dim: int, num_actions: int, proj_dim: int = 32,
                 hidden: tuple[int, ...] = (64, 64), activation: str = "tanh"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.architecture = {"feature_dim": feature_dim, "extra_dim": extra_dim,
                             "num_actions": num_actions, "proj_dim": proj_dim,
                             "hidden": list(hidden), "activation": activation}
        self.encoder = ObsEncoder(feature_dim, extra_dim, proj_dim)
        self.trunk, out = mlp(self.encoder.out_dim, tuple(hidden), activation)
        self.head = nn.Linear(out, num_actions)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """Scores [B, num_actions]: predicted rewards (bandit) or action logits (PPO)."""
        return self.head(self.trunk(self.encoder(obs)))

    @torch.no_grad()
    def act(self, obs) -> int:
        """One observation (numpy or tensor) -> action index; for the simulator."""
        x = torch.as_tensor(obs, dtype=torch.float32).reshape(1, -1)
        return int(self.forward(x).argmax(-1))
