"""The methods that decide what to prune, by name: one interface, `decide(context, settings, progress)
-> Decision`, one settings dataclass per method.

The table names each method's `decide` as "module:function" and imports it only when the method runs
(Polygraphy's lazy loaders), so reading the table, as the batch planner and the option declarations do,
loads no torch. Adding a method is one row here and one function in its own module.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from anp_onnx.errors import AnpError
from anp_onnx.methods.settings import AnpMethodSettings, ClpSettings, FinePruningSettings, TriggerMethodSettings
from anp_onnx.prune import MaskValues, PruningPlan

if TYPE_CHECKING:
    import onnx
    import torch

    from anp_onnx.bridge.importer import GatedClassifier
    from anp_onnx.data import Samples
    from anp_onnx.methods.trigger.synthesis import Trigger
    from anp_onnx.onnx.neurons import NeuronMap


class Progress(Protocol):
    """After each step: `done` of `total` steps of `stage` (None: the one stage the method's
    `progress_label` names). A method of several stages counts each from 0: their steps cost differently."""

    def __call__(self, done: int, total: int, stage: str | None = None) -> None: ...


@dataclass(frozen=True)
class MethodContext:
    """What every method may read: the ONNX model and its neuron map, the imported classifier on
    `torch_device` (uncalibrated, every mask 1), the clean samples, the onnxruntime device string and
    the class output (for methods that run the ONNX graph itself), and the number of classes."""

    model: onnx.ModelProto
    neuron_map: NeuronMap
    classifier: GatedClassifier
    clean: Samples
    torch_device: torch.device
    device: str = "auto"
    class_output: str | None = None
    classes: int = 0


@dataclass(frozen=True)
class Decision:
    """What a method decided: the plan the rewriter carries out, every neuron's score in mask form
    (smaller = more suspect; the report's `layers`), the method's own summary for the report (the
    trigger method's `guided` entry), the triggers it synthesised (for the repair stage) and the
    iterations it ran (ANP's early stop)."""

    plan: PruningPlan
    scores: MaskValues
    summary: dict[str, object] | None = None
    triggers: list[Trigger] = field(default_factory=list)
    iterations_run: int = 0


Decide = Callable[[MethodContext, object, Progress | None], Decision]


@dataclass(frozen=True)
class Method:
    """One row of the table: `decide` is "module:function", imported when the method runs."""

    name: str
    settings: type
    decide: str
    progress_label: str  # what the steps `progress` counts are (its first stage's, with several)
    description: str

    def load(self) -> Decide:
        module, function = self.decide.split(":")
        return getattr(importlib.import_module(module), function)

    def default_settings(self) -> object:
        return self.settings()


METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method(
            "trigger",
            TriggerMethodSettings,
            "anp_onnx.methods.trigger.guided:decide",
            "searching labels",
            "the target named from clean data, triggers synthesised for it, neurons pruned against them",
        ),
        Method(
            "anp",
            AnpMethodSettings,
            "anp_onnx.methods.anp:decide",
            "optimising masks",
            "the paper's min-max mask optimisation, masks below a threshold pruned",
        ),
        Method(
            "fine-pruning",
            FinePruningSettings,
            "anp_onnx.methods.baseline_methods:decide_fine_pruning",
            "measuring activations",
            "Fine-Pruning: the least active neurons on clean data, within a held-out accuracy budget",
        ),
        Method(
            "clp",
            ClpSettings,
            "anp_onnx.methods.baseline_methods:decide_clp",
            "bounding channels",
            "CLP, data-free: channels with an outlying Lipschitz bound",
        ),
    )
}


def get_method(name: str) -> Method:
    """The registered method `name`; AnpError naming the known ones otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise AnpError(f"unknown method {name!r}: use one of {', '.join(METHODS)}") from None


def decide(
    name: str, context: MethodContext, settings: object | None = None, progress: Progress | None = None
) -> Decision:
    """Run method `name` with its `settings` (None: its defaults) on `context`."""
    method = get_method(name)
    settings = method.default_settings() if settings is None else settings
    if not isinstance(settings, method.settings):
        raise TypeError(f"method {name!r} takes {method.settings.__name__}, not {type(settings).__name__}")
    return method.load()(context, settings, progress)
