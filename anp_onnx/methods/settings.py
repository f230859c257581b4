"""Each method's settings, one frozen dataclass per method. Torch-free: the batch planner and the option
declarations (`anp_onnx.options`) read them without loading torch.

`report_entry()` is what the JSON report's `settings` holds (with "method" in front). For trigger and
anp it has the keys the report always had (the ANP optimisation's and the pruning choice's), so a
report reads the same whichever of the two ran.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

from anp_onnx import prune
from anp_onnx.methods.repair.settings import RepairSettings
from anp_onnx.prune import MaskValues, PruningPlan

if TYPE_CHECKING:
    from anp_onnx.methods.trigger.guided import GuidedSettings

NEURON_MODES = ("batchnorm", "bias")


@dataclass(frozen=True)
class AnpSettings:
    """ANP's mask optimisation; defaults from the paper and its reference code."""

    iterations: int = 2000
    batch_size: int = 128
    eps: float = 0.4
    alpha: float = 0.2
    mask_lr: float = 0.2
    momentum: float = 0.9
    augment: bool = True
    average_masks: bool = False  # rank by the masks' mean over the run after a burn-in (docs/METHOD.md)
    burn_in: float = 0.1  # share of `iterations` before the average starts
    neuron_mode: str = "batchnorm"  # layers without BatchNorm: "batchnorm" re-creates it, "bias" is plain
    seed: int = 0

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class PruningChoice:
    """How many neurons ANP's masks prune: one of these is used (the paper's threshold by default).
    `max_acc_drop` holds out `holdout` of the clean data from the optimisation and prunes the most
    neurons whose accuracy on it drops by at most that much."""

    threshold: float | None = None  # None: the paper's, prune.DEFAULT_THRESHOLD
    fraction: float | None = None
    count: int | None = None
    max_acc_drop: float | None = None
    holdout: float = 0.2

    def settled(self, values: MaskValues) -> frozenset[tuple[str, int]]:
        """The neurons this choice would prune now, for early stopping (the accuracy budget is
        judged on held-out data only at the end: the lowest tenth of the masks stands in for it)."""
        plan = prune.by_fraction(values, 0.1) if self.max_acc_drop is not None else self.plan(values)
        return frozenset((neuron.layer, neuron.channel) for neuron in plan.neurons)

    def plan(self, values: MaskValues, accuracy_of: Callable[[PruningPlan], float] | None = None) -> PruningPlan:
        if self.max_acc_drop is not None and accuracy_of is not None:
            return prune.by_accuracy_budget(values, self.max_acc_drop, accuracy_of)
        if self.count is not None:
            return prune.by_count(values, self.count)
        if self.fraction is not None:
            return prune.by_fraction(values, self.fraction)
        return prune.by_threshold(values, prune.DEFAULT_THRESHOLD if self.threshold is None else self.threshold)


def _anp_shaped(optimisation: AnpSettings, pruning: PruningChoice) -> dict[str, object]:
    """The report's `settings` keys as they have always been: the optimisation's, then the pruning choice's."""
    return {**optimisation.as_dict(), **asdict(pruning)}


@dataclass(frozen=True)
class AnpMethodSettings:
    """`--method anp`: the mask optimisation, how many neurons its masks prune, and early stopping
    (stop once the neurons to prune have not changed for 300 iterations)."""

    optimisation: AnpSettings = field(default_factory=AnpSettings)
    pruning: PruningChoice = field(default_factory=PruningChoice)
    early_stop: bool = True

    @property
    def seed(self) -> int:
        return self.optimisation.seed

    def report_entry(self) -> dict[str, object]:
        return _anp_shaped(self.optimisation, self.pruning)


@dataclass(frozen=True)
class TriggerMethodSettings:
    """`--method trigger` (the default): `eps` of the label search's neuron perturbations, `neuron_mode` of
    the calibration, `max_acc_drop` the pruning's budget on the clean data (None: trigger.guided.DEFAULT_MAX_ACC_DROP),
    `stages` the step counts of each stage (studies of its cost; None: the defaults, GuidedSettings),
    `repair` the repair stage after pruning (methods/repair)."""

    eps: float = 0.4
    seed: int = 0
    neuron_mode: str = "batchnorm"
    max_acc_drop: float | None = None
    stages: GuidedSettings | None = None
    repair: RepairSettings = field(default_factory=RepairSettings)
    effort: float = 1.0  # every step count of the stages and the repair times this (`at_effort`)

    def report_entry(self) -> dict[str, object]:
        """ANP's keys with their defaults (they did not decide anything), the fields this method read, the
        repair stage's mode and the effort."""
        optimisation = AnpSettings(eps=self.eps, neuron_mode=self.neuron_mode, seed=self.seed)
        anp_keys = _anp_shaped(optimisation, PruningChoice(max_acc_drop=self.max_acc_drop))
        return {**anp_keys, "repair": self.repair.mode, "effort": self.effort}

    def at_effort(self) -> TriggerMethodSettings:
        """These settings with every step count times `effort` (rounded, at least 1) and effort 1: the
        stages' (label search, triggers, unlearning) and the repair's (its steps, checks and refits)."""
        if self.effort == 1.0:
            return self
        from anp_onnx.methods.trigger.guided import GuidedSettings

        repair = self.repair
        counts = {name: max(1, round(getattr(repair, name) * self.effort)) for name in REPAIR_STEP_COUNTS}
        stages = (self.stages or GuidedSettings()).scaled(self.effort)
        return replace(self, stages=stages, repair=replace(repair, **counts), effort=1.0)


REPAIR_STEP_COUNTS = ("max_steps", "check_every", "refit_steps")


@dataclass(frozen=True)
class FinePruningSettings:
    """Fine-Pruning (baselines.fine_pruning): the least active neurons, within `max_acc_drop` of held-out
    clean accuracy (`holdout` of the clean data, split with `seed`); `scope` "head" or "all" layers."""

    max_acc_drop: float = 0.02
    holdout: float = 0.2
    scope: str = "head"
    seed: int = 0

    def report_entry(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class ClpSettings:
    """CLP (baselines.clp), data-free: channels whose Lipschitz bound exceeds mean + u * std of their layer."""

    u: float = 3.0

    def report_entry(self) -> dict[str, object]:
        return asdict(self)
