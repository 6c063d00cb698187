"""The privacy ledger of a training run: the steps its mechanism actually took.

A :class:`Ledger` is built from a mechanism (:class:`patchdp.DPSGD`) and records steps of
*that* mechanism only: :meth:`Ledger.step` takes no noise multiplier, sampling or relation
of its own, so the ε it reports describes the steps that ran. Changing the noise between
steps (e.g. resuming with another z) is possible and explicit: :meth:`Ledger.change_noise`.
Every ε a run shows comes from here.
"""

from __future__ import annotations

import functools
from typing import Protocol

from patchdp import _validation
from patchdp.accounting.composition import compose, epsilon_of
from patchdp.accounting.loss import PLD
from patchdp.accounting.queries import check_noise, composed, last_true
from patchdp.accounting.relations import Relation
from patchdp.sampling import Sampling

__all__ = ["Ledger", "Accountable"]


class Accountable(Protocol):
    """What a ledger needs of its mechanism (:class:`patchdp.DPSGD` is one)."""

    sampling: Sampling
    noise_multiplier: float
    delta: float
    resolution: float

    @property
    def relation(self) -> Relation: ...

    def replace(self, **changes) -> "Accountable": ...

    def to_dict(self) -> dict: ...

    def differences(self, saved: dict, ignore: tuple[str, ...] = ()) -> list[str]: ...


class Ledger:
    """Incremental privacy ledger of one mechanism.

    Records the steps taken (in runs of equal noise multiplier), answers ε so far at the
    mechanism's δ, and how many more steps fit ``budget_epsilon``. Queries are cached:
    ε so far is one FFT per distinct noise level (never a step-by-step recomposition),
    and :meth:`remaining_steps` is computed once per noise level by bisection, so the
    per-step check "would the next step exceed the budget?" is O(1).

    Args:
      mechanism: what every recorded step did (:class:`patchdp.DPSGD`).
      budget_epsilon: the ε (at the mechanism's δ) training may not exceed, or None.
    """

    def __init__(self, mechanism: Accountable, *, budget_epsilon: float | None = None):
        missing = [a for a in ("sampling", "relation", "noise_multiplier", "delta", "resolution", "replace",
                               "to_dict", "differences") if not hasattr(mechanism, a)]
        if missing:
            raise TypeError(f"Ledger needs a mechanism such as patchdp.DPSGD(...), got {mechanism!r} "
                            f"(it has no {', '.join(missing)}).")
        self._mechanism = mechanism
        self.budget_epsilon = None if budget_epsilon is None else _validation.epsilon(budget_epsilon,
                                                                                      "budget_epsilon")
        self._runs: list[list] = []   # [noise_multiplier, count], consecutive z merged
        self._cache: dict = {}        # pure function of its keys: never invalidated

    @property
    def mechanism(self) -> Accountable:
        """The mechanism of the next step (its noise multiplier is the latest one)."""
        return self._mechanism

    @property
    def delta(self) -> float:
        return self._mechanism.delta

    @property
    def runs(self) -> tuple[tuple[float, int], ...]:
        """The steps taken, as (noise multiplier z, number of steps) in order."""
        return tuple((z, count) for z, count in self._runs)

    @property
    def steps(self) -> int:
        return sum(count for _, count in self._runs)

    def step(self, count: int = 1) -> None:
        """Records ``count`` steps of the ledger's mechanism."""
        count = _validation.integer("count", count)
        z = self._mechanism.noise_multiplier
        if self._runs and self._runs[-1][0] == z:
            self._runs[-1][1] += count
        else:
            self._runs.append([z, count])

    def change_noise(self, noise_multiplier: float) -> None:
        """From the next step on, the mechanism adds noise with multiplier z (the steps
        taken keep theirs); everything else about the mechanism stays."""
        z = check_noise(noise_multiplier)
        self._mechanism = self._mechanism.replace(noise_multiplier=z)

    def _composed_runs(self, runs: tuple) -> tuple[PLD, ...] | None:
        """The PLD(s) of a sequence of (z, count) runs; None for no steps (cached)."""
        if not runs:
            return None
        if runs not in self._cache:
            m = self._mechanism
            parts = [composed(z, n, m.sampling, m.relation, m.resolution) for z, n in runs]
            self._cache[runs] = functools.reduce(lambda a, b: tuple(map(compose, a, b)), parts)
        return self._cache[runs]

    def _epsilon_after(self, prefix: tuple, z: float, extra: int) -> float:
        m = self._mechanism
        plds = composed(z, extra, m.sampling, m.relation, m.resolution)
        before = self._composed_runs(prefix)
        if before is not None:
            plds = tuple(map(compose, before, plds))
        return max(epsilon_of(p, m.delta) for p in plds)

    def epsilon(self) -> float:
        """ε spent so far at the mechanism's δ (0 before the first step; ∞ after a step
        without noise)."""
        if not self._runs:
            return 0.0
        *prefix, (z, count) = self.runs
        key = ("epsilon", self.runs)
        if key not in self._cache:
            self._cache[key] = self._epsilon_after(tuple(prefix), z, count)
        return self._cache[key]

    def remaining_steps(self, limit: int = 10 ** 7) -> int:
        """How many more steps of the mechanism keep ε within the budget."""
        if self.budget_epsilon is None:
            raise ValueError("this ledger has no budget_epsilon; pass one to Ledger(...).")
        z = self._mechanism.noise_multiplier
        runs = list(self.runs)
        done = runs.pop()[1] if runs and runs[-1][0] == z else 0
        key = ("affordable", tuple(runs), z)
        if key not in self._cache:
            self._cache[key] = last_true(
                lambda extra: self._epsilon_after(tuple(runs), z, extra) <= self.budget_epsilon, 1, limit)
        return max(self._cache[key] - done, 0)

    def can_step(self) -> bool:
        """Would one more step keep ε within the budget?"""
        return self.remaining_steps() >= 1

    def replay(self, mechanism: Accountable) -> "Ledger":
        """A counterfactual: a new ledger of ``mechanism`` (e.g. the same training
        accounted at image level) holding this ledger's noise runs. Reports compare
        guarantees with it; it records nothing here."""
        other = Ledger(mechanism)
        for z, count in self.runs:
            other.change_noise(z)
            other.step(count)
        return other

    def to_dict(self) -> dict:
        """Plain JSON: the mechanism (with the latest noise multiplier), the budget and the runs."""
        return {"mechanism": self._mechanism.to_dict(), "budget_epsilon": self.budget_epsilon,
                "runs": [list(r) for r in self._runs]}

    @classmethod
    def from_dict(cls, state: dict, mechanism: Accountable) -> "Ledger":
        """The ledger that :meth:`to_dict` saved, continued by ``mechanism``: ValueError in
        one line naming every difference between the saved mechanism and ``mechanism``
        other than the noise multiplier (whose change :meth:`change_noise` makes
        explicit); the restored ledger's mechanism has the saved noise multiplier."""
        keys = ("mechanism", "budget_epsilon", "runs")
        missing = [k for k in keys if k not in state] if isinstance(state, dict) else list(keys)
        if missing:
            raise ValueError(f"not a Ledger state (from Ledger.to_dict): missing {', '.join(missing)}.")
        changed = mechanism.differences(state["mechanism"], ignore=("noise_multiplier",))
        if changed:
            raise ValueError(f"the ledger's steps were taken by another mechanism: {'; '.join(changed)}.")
        ledger = cls(mechanism, budget_epsilon=state["budget_epsilon"])
        for z, count in state["runs"]:
            ledger.change_noise(z)
            ledger.step(count)
        ledger.change_noise(state["mechanism"]["noise_multiplier"])
        return ledger
