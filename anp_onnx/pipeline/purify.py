"""The pipeline: ONNX in, masks optimised in torch, plan, rewritten ONNX out, checked with onnxruntime."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

from anp_onnx import prune
from anp_onnx.bridge.importer import check_equivalence, hard_masks, import_model
from anp_onnx.data import SampleFile, Samples, load_samples, open_samples
from anp_onnx.errors import AnpError
from anp_onnx.methods import anp
from anp_onnx.methods.anp import AnpSettings
from anp_onnx.methods.trigger.guided import GuidedResult, GuidedSettings, guided_prune, guided_steps
from anp_onnx.methods.trigger.synthesis import as_numpy
from anp_onnx.onnx.model import check_supported, class_output_index, input_shape, load_model
from anp_onnx.onnx.neurons import NeuronMap, build_neuron_map
from anp_onnx.onnx.rewrite import apply_plan, save_model
from anp_onnx.prune import MaskValues, PruningPlan
from anp_onnx.timing import timed
from anp_onnx.validate.evaluate import Evaluator, Metrics

CHECK_SAMPLES = 16


@dataclass(frozen=True)
class PruningChoice:
    """How many neurons to prune: one of these is used (the paper's threshold by default). `max_acc_drop`
    holds out `holdout` of the clean data from the optimisation and prunes the most neurons whose
    accuracy on it drops by at most that much."""

    threshold: float | None = None  # None: the paper's, prune.DEFAULT_THRESHOLD
    fraction: float | None = None
    count: int | None = None
    max_acc_drop: float | None = None
    holdout: float = 0.2

    def mask_based(self) -> bool:
        """True when a threshold, fraction or count was asked for: choices that rank ANP's masks."""
        return any(choice is not None for choice in (self.threshold, self.fraction, self.count))

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


@dataclass
class PurifyResult:
    model: Path
    output: Path
    before: Metrics
    after: Metrics
    plan: PruningPlan
    masks: MaskValues
    neuron_map: NeuronMap
    settings: AnpSettings
    pruning: PruningChoice
    device: str
    providers: list[str]
    timings: dict[str, float] = field(default_factory=dict)
    iterations_run: int = 0
    guided: dict[str, object] | None = None  # with --method trigger: target, trigger, pruning rounds
    triggers: list[dict[str, np.ndarray]] = field(default_factory=list)  # their mask and pattern arrays


def progress_label(settings: AnpSettings) -> str:
    """What the steps `on_progress` reports are, for these settings."""
    return "synthesising triggers" if settings.method == "trigger" else "optimising masks"


def _step_counter(on_progress: Callable[[int, int], None], total: int) -> Callable[[], None]:
    done = 0

    def step() -> None:
        nonlocal done
        done += 1
        on_progress(done, total)

    return step


def default_output(model_path: Path) -> Path:
    return model_path.with_name(f"{model_path.stem}.purified.onnx")


def resolve_device(device: str) -> torch.device:
    """auto -> CUDA when torch sees a GPU, else CPU; an explicit choice must be available."""
    if device not in ("auto", "cpu", "cuda"):
        raise AnpError(f"unknown device {device!r}: use auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise AnpError("--device cuda: no CUDA device is available to torch here; use --device cpu")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_prunable(model_path: Path, class_output: str | None) -> tuple[onnx.ModelProto, NeuronMap, int]:
    """The model, its neuron map and the class output's position; AnpError when it cannot be purified."""
    model = load_model(model_path)
    check_supported(model, model_path)
    output_index = class_output_index(model, class_output)
    neuron_map = build_neuron_map(model)
    if not neuron_map.layers:
        raise AnpError(f"{model_path}: no prunable layers found (see `anp-onnx inspect`)")
    return model, neuron_map, output_index


def purify(
    model_path: str | Path,
    data_path: str | Path,
    output_path: str | Path | None = None,
    *,
    test_data: str | Path | None = None,
    poison_data: str | Path | None = None,
    settings: AnpSettings | None = None,
    pruning: PruningChoice | None = None,
    device: str = "auto",
    force: bool = False,
    early_stop: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
    class_output: str | None = None,
    stages: GuidedSettings | None = None,
) -> PurifyResult:
    """Purify one model; returns everything the CLI prints and the report holds. `class_output`
    names the graph output holding the classes (default: the first). `on_progress(done, total)`
    after each step of the optimisation (`progress_label` says what they are). `stages`: the
    trigger method's step counts (studies of its cost; the defaults otherwise)."""
    settings, pruning = settings or AnpSettings(), pruning or PruningChoice()
    model_path = Path(model_path)
    output = Path(output_path) if output_path else default_output(model_path)
    _check_output(model_path, output, force)
    if settings.method not in anp.METHODS:
        raise AnpError(f"unknown method {settings.method!r}: use one of {', '.join(anp.METHODS)}")
    if settings.method == "trigger" and pruning.mask_based():
        raise AnpError("--threshold, --prune-fraction and --prune-count rank ANP's masks: use them with --method anp")
    if settings.neuron_mode not in anp.NEURON_MODES:
        raise AnpError(f"unknown neuron mode {settings.neuron_mode!r}: use one of {', '.join(anp.NEURON_MODES)}")
    torch_device = resolve_device(device)
    timings: dict[str, float] = {}

    with timed(timings, "load"):
        model, neuron_map, output_index = load_prunable(model_path, class_output)
        shape = input_shape(model)
        clean = load_samples(data_path, shape, "--data")
        test = open_samples(test_data, shape, "--test-data") if test_data else None
        poison = open_samples(poison_data, shape, "--poison-data") if poison_data else None
        before_evaluator = Evaluator(model_path, device, class_output)
        classes = int(np.prod(before_evaluator.outputs(clean.x[:1]).shape[1:]))
        for samples, what in ((clean, "--data"), (test, "--test-data"), (poison, "--poison-data")):
            if samples is not None:
                _check_labels(samples, classes, what)

    with timed(timings, "import"):
        classifier = import_model(model, neuron_map, renormalise=True, output_index=output_index).to(torch_device)
        sample = clean.x[:CHECK_SAMPLES]
        check_equivalence(classifier, sample, before_evaluator.outputs(sample), str(model_path))

    guided: GuidedResult | None = None
    stop: anp.StopWhenStable | None = None
    with timed(timings, "optimise"):
        torch.manual_seed(settings.seed)
        if settings.method == "trigger":
            x, y = anp.tensors(clean.x, clean.y, torch_device)
            anp.calibrate(classifier, x, settings)
            step = _step_counter(on_progress, guided_steps(classes, stages)) if on_progress else None
            guided = guided_prune(classifier, x, y, settings, pruning.max_acc_drop, step, stages)
            values = anp.mask_values(classifier)
        else:
            optimise_on, held_out = split_holdout(clean, pruning, settings.seed)
            x, y = anp.tensors(optimise_on.x, optimise_on.y, torch_device)
            anp.calibrate(classifier, x, settings)
            stop = anp.StopWhenStable(pruning.settled) if early_stop else None
            step = _step_counter(on_progress, settings.iterations) if on_progress else None
            values = anp.optimise_masks(classifier, x, y, settings, step and (lambda _: step()), stop)

    with timed(timings, "rewrite"):
        if guided is not None:
            plan = guided.plan
        else:
            accuracy_of = _held_out_accuracy(classifier, held_out, torch_device) if held_out else None
            plan = pruning.plan(values, accuracy_of)
        save_model(apply_plan(model, neuron_map, plan), output)

    with timed(timings, "evaluate"):
        after_evaluator = Evaluator(output, device, class_output)
        _check_rewrite(classifier, plan, sample, after_evaluator.outputs(sample))
        before = before_evaluator.measure(test, poison)
        after = after_evaluator.measure(test, poison)

    return PurifyResult(
        model=model_path,
        output=output,
        before=before,
        after=after,
        plan=plan,
        masks=values,
        neuron_map=neuron_map,
        settings=settings,
        pruning=pruning,
        device=str(torch_device),
        providers=[before_evaluator.provider],
        timings=timings,
        iterations_run=stop.stopped_at if stop and stop.stopped_at else settings.iterations,
        guided=guided.summary() if guided is not None else None,
        triggers=[as_numpy(trigger) for trigger in guided.triggers] if guided is not None else [],
    )


def split_holdout(clean: Samples, pruning: PruningChoice, seed: int) -> tuple[Samples, Samples | None]:
    """Samples to optimise on and, when the pruning amount is chosen by accuracy, samples held out for that."""
    if pruning.max_acc_drop is None:
        return clean, None
    count = round(len(clean) * pruning.holdout)
    if count < 1 or count >= len(clean):
        raise AnpError(f"--holdout {pruning.holdout:g} leaves no samples on one side of {len(clean)}")
    order = np.random.default_rng(seed).permutation(len(clean))
    held, kept = order[:count], order[count:]
    return Samples(clean.x[kept], clean.y[kept]), Samples(clean.x[held], clean.y[held])


def _held_out_accuracy(classifier, held_out: Samples, device: torch.device) -> Callable[[PruningPlan], float]:
    x, y = anp.tensors(held_out.x, held_out.y, device)

    def accuracy_of(plan: PruningPlan) -> float:
        hard_masks(classifier, plan)
        classifier.eval()
        with torch.no_grad():
            return float((classifier(x).argmax(1) == y).float().mean())

    return accuracy_of


def _check_output(model_path: Path, output: Path, force: bool) -> None:
    if output.resolve() == model_path.resolve():
        raise AnpError(f"output {output} is the input model: choose another path with -o")
    if output.is_dir():
        raise AnpError(f"output {output} is a folder: give a file path with -o")
    if not output.parent.is_dir():
        raise AnpError(f"{output.parent}: output folder does not exist")
    if output.exists() and not force:
        raise AnpError(f"output {output} exists: pass --force to replace it, or choose another path with -o")


def _check_labels(samples: Samples | SampleFile, classes: int, what: str) -> None:
    if samples.y.min() < 0 or samples.y.max() >= classes:
        raise AnpError(f"{what}: labels must lie in 0..{classes - 1} (the model has {classes} classes)")


def _check_rewrite(classifier, plan: PruningPlan, inputs: np.ndarray, rewritten_outputs: np.ndarray) -> None:
    """The rewritten file must compute what the torch model computes with the same hard masks."""
    hard_masks(classifier, plan)
    try:
        check_equivalence(classifier, inputs, rewritten_outputs, "rewritten model")
    except AnpError as error:
        raise RuntimeError(f"internal check failed: {error}") from None
