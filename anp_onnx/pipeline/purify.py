"""The pipeline: load -> import to torch -> decide (a registered method) -> repair -> rewrite -> validate.

What decides is a method of `anp_onnx.methods.registry`; the pipeline only moves data between the
stages and checks each hand-over (torch agrees with onnxruntime before deciding, the rewritten file
agrees with torch after)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from anp_onnx.bridge.importer import check_equivalence, import_model
from anp_onnx.data import SampleFile, Samples, load_samples, open_samples
from anp_onnx.errors import AnpError
from anp_onnx.methods.registry import MethodContext, Progress, decide, get_method
from anp_onnx.methods.repair.settings import RepairSettings
from anp_onnx.methods.repair.stage import RepairOutcome, repair_stage
from anp_onnx.methods.settings import PruningChoice, TriggerMethodSettings
from anp_onnx.methods.trigger.synthesis import as_numpy
from anp_onnx.onnx.model import check_supported, class_output_index, input_shape, load_model
from anp_onnx.onnx.neurons import NeuronMap, build_neuron_map
from anp_onnx.onnx.rewrite import apply_plan, save_model
from anp_onnx.pipeline.checks import check_labels, check_output, check_rewrite
from anp_onnx.pipeline.device import resolve_device
from anp_onnx.pipeline.verdict import Verdict, judge
from anp_onnx.prune import MaskValues, PruningPlan
from anp_onnx.timing import timed
from anp_onnx.validate.evaluate import Evaluator, Metrics

__all__ = ["PruningChoice", "PurifyResult", "default_output", "load_prunable", "progress_label", "purify"]

REPAIRING = "repairing weights"  # the repair stage's progress
CHECK_SAMPLES = 16


@dataclass
class PurifyResult:
    model: Path
    output: Path
    before: Metrics
    after: Metrics
    plan: PruningPlan
    masks: MaskValues
    neuron_map: NeuronMap
    method: str
    settings: object  # the method's settings dataclass (anp_onnx.methods.settings)
    device: str
    providers: list[str]
    timings: dict[str, float] = field(default_factory=dict)
    iterations_run: int = 0
    guided: dict[str, object] | None = None  # the method's summary: with trigger, target, trigger, pruning rounds
    triggers: list[dict[str, np.ndarray]] = field(default_factory=list)  # their mask and pattern arrays
    repair: RepairOutcome | None = None  # the repair stage (methods that synthesise triggers)
    method_plan: PruningPlan | None = None  # what the method decided, before repair (which may replace it)
    verdict: Verdict | None = None  # None: the method gives nothing to judge by (--method anp)


def progress_label(method: str) -> str:
    """What the steps `on_progress` reports are, for `method`."""
    return get_method(method).progress_label


def default_output(model_path: Path) -> Path:
    return model_path.with_name(f"{model_path.stem}.purified.onnx")


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
    method: str = "trigger",
    settings: object | None = None,
    test_data: str | Path | None = None,
    poison_data: str | Path | None = None,
    device: str = "auto",
    force: bool = False,
    on_progress: Progress | None = None,
    class_output: str | None = None,
) -> PurifyResult:
    """Purify one model with `method` and its `settings` (None: the method's defaults; the dataclasses of
    `anp_onnx.methods.settings`); returns everything the CLI prints and the report holds. `class_output`
    names the graph output holding the classes (default: the first). `on_progress(done, total, stage)`
    after each step of the method (`progress_label` names its steps where `stage` is None) and of repair."""
    chosen = get_method(method)
    settings = chosen.default_settings() if settings is None else settings
    if not isinstance(settings, chosen.settings):
        raise TypeError(f"method {method!r} takes {chosen.settings.__name__}, not {type(settings).__name__}")
    effective = settings.at_effort() if isinstance(settings, TriggerMethodSettings) else settings
    model_path = Path(model_path)
    output = Path(output_path) if output_path else default_output(model_path)
    check_output(model_path, output, force)
    torch_device = resolve_device(device)
    timings: dict[str, float] = {}

    with timed(timings, "load"):
        model, neuron_map, output_index = load_prunable(model_path, class_output)
        clean, test, poison = _load_data(model, data_path, test_data, poison_data)
        before_evaluator = Evaluator(model_path, device, class_output)
        classes = int(np.prod(before_evaluator.outputs(clean.x[:1]).shape[1:]))
        for samples, what in ((clean, "--data"), (test, "--test-data"), (poison, "--poison-data")):
            if samples is not None:
                check_labels(samples, classes, what)

    with timed(timings, "import"):
        classifier = import_model(model, neuron_map, renormalise=True, output_index=output_index).to(torch_device)
        sample = clean.x[:CHECK_SAMPLES]
        check_equivalence(classifier, sample, before_evaluator.outputs(sample), str(model_path))

    context = MethodContext(model, neuron_map, classifier, clean, torch_device, device, class_output, classes)
    with timed(timings, "optimise"):
        decision = decide(method, context, effective, on_progress)
    repair_settings = getattr(effective, "repair", None)
    outcome, method_plan = None, decision.plan
    if isinstance(repair_settings, RepairSettings):
        with timed(timings, "repair"):
            progress = (lambda done, total: on_progress(done, total, REPAIRING)) if on_progress else None
            model, decision, outcome = repair_stage(context, decision, repair_settings, progress)

    with timed(timings, "rewrite"):
        save_model(apply_plan(model, neuron_map, decision.plan), output)

    with timed(timings, "evaluate"):
        after_evaluator = Evaluator(output, device, class_output)
        check_rewrite(classifier, decision.plan, sample, after_evaluator.outputs(sample))
        before, after = before_evaluator.measure(test, poison), after_evaluator.measure(test, poison)

    return PurifyResult(
        model=model_path,
        output=output,
        before=before,
        after=after,
        plan=decision.plan,
        masks=decision.scores,
        neuron_map=neuron_map,
        method=method,
        settings=settings,
        device=str(torch_device),
        providers=[before_evaluator.provider],
        timings=timings,
        iterations_run=decision.iterations_run,
        guided=decision.summary,
        triggers=[as_numpy(trigger) for trigger in decision.triggers],
        repair=outcome,
        method_plan=method_plan,
        verdict=_verdict(decision.summary, outcome, repair_settings) if outcome is not None else None,
    )


def _verdict(summary: dict[str, object] | None, outcome: RepairOutcome, settings: RepairSettings) -> Verdict:
    """The verdict from the decision's summary and the repair stage's last measurement."""
    summary = summary or {}
    target = summary.get("suspected_target")
    return judge(
        evidence=bool(summary.get("backdoor_evidence", False)),
        synthesis_failed=bool(summary.get("synthesis_failed", False)),
        residual_asr=outcome.residual_asr,
        stop_level=settings.max_asr,
        target=None if target is None else int(target),
    )


def _load_data(
    model: onnx.ModelProto, data: str | Path, test_data: str | Path | None, poison_data: str | Path | None
) -> tuple[Samples, SampleFile | None, SampleFile | None]:
    """The clean samples in memory; the test and poison samples opened for the evaluator."""
    shape = input_shape(model)
    clean = load_samples(data, shape, "--data")
    test = open_samples(test_data, shape, "--test-data") if test_data else None
    poison = open_samples(poison_data, shape, "--poison-data") if poison_data else None
    return clean, test, poison
