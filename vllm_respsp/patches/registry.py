"""The registry of every change vllm_respsp makes to vLLM.

Each change is a small `Patch` subclass that names its target (`module:Owner.attr` or
`module:attr`), says when it applies, and builds the replacement from the original. The
original stays reachable on its owner as `_orig_<attr>`, so a patch can always call through
and be reverted. Patches apply idempotently: vLLM loads plugins once in every process (front
end, engine core, workers), sometimes more than once.

`VLLM_RESPSP_DISABLE_PATCHES=name,name` skips patches by name (for bisecting and for the tests
that show what a fix fixes).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from typing import Any, ClassVar

from vllm_respsp import envs

logger = logging.getLogger("vllm_respsp")

DISABLE_ENV = envs.DISABLE_PATCHES


def resolve(target: str) -> tuple[Any, str]:
    """`pkg.mod:Owner.attr` -> (Owner object, "attr")."""
    module_name, _, path = target.partition(":")
    owner: Any = importlib.import_module(module_name)
    *owners, attr = path.split(".")
    for name in owners:
        owner = getattr(owner, name)
    return owner, attr


class Patch:
    """One named, revertible replacement of a vLLM attribute."""

    name: ClassVar[str]
    target: ClassVar[str]
    known_names: ClassVar[set[str]] = set()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in vars(cls):  # abstract intermediate classes name no patch
            Patch.known_names.add(cls.name)

    def applies(self) -> bool:
        """Whether this process needs the patch (platform, version, presence of the bug)."""
        return True

    def replacement(self, original: Callable[..., Any]) -> Callable[..., Any]:
        raise NotImplementedError

    def after_apply(self) -> None:
        """Hook for patches whose target was already copied elsewhere by vLLM."""

    # -- mechanics -------------------------------------------------------------------
    @property
    def orig_attr(self) -> str:
        return "_orig_" + self.target.rsplit(".", 1)[-1].rsplit(":", 1)[-1]

    def is_applied(self) -> bool:
        owner, _ = resolve(self.target)
        return self.orig_attr in vars(owner)

    def apply(self) -> bool:
        owner, attr = resolve(self.target)
        if self.orig_attr in vars(owner):
            return False
        original = getattr(owner, attr)
        setattr(owner, self.orig_attr, original)
        setattr(owner, attr, self.replacement(original))
        self.after_apply()
        logger.info("vllm_respsp: patched %s (%s)", self.target, self.name)
        return True

    def revert(self) -> None:
        owner, attr = resolve(self.target)
        if self.orig_attr in vars(owner):
            setattr(owner, attr, vars(owner)[self.orig_attr])
            delattr(owner, self.orig_attr)


def disabled_names() -> set[str]:
    return envs.disabled_patches()


def apply_all(patches: list[Patch]) -> list[str]:
    """Apply every patch that applies here and is not disabled; return the names applied."""
    skip = disabled_names()
    unknown = skip - Patch.known_names
    if unknown:
        raise ValueError(
            f"{DISABLE_ENV} names unknown patches {sorted(unknown)}; "
            f"known: {sorted(Patch.known_names)}"
        )
    applied = []
    for patch in patches:
        if patch.name in skip or not patch.applies():
            continue
        patch.apply()
        applied.append(patch.name)
    return applied
