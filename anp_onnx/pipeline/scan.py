"""A trigger-free backdoor check from clean data: where adversarial neuron perturbations push clean
inputs (a backdoored model's errors land mostly on the target, a clean model's spread out), and how
small a trigger each label needs (a backdoor's target needs a much smaller one). No trigger of the
attacker's is needed: the triggers are synthesised from the clean data for every label."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from anp_onnx.bridge.importer import GatedClassifier, import_model
from anp_onnx.data import load_samples
from anp_onnx.errors import AnpError
from anp_onnx.methods.perturbation import calibrate, tensors
from anp_onnx.methods.trigger.evidence import SUSPICIOUS_SCORE
from anp_onnx.methods.trigger.target import LABEL_TRIGGER_STEPS, PERTURBATION_ROUNDS, search_target, suspected_target
from anp_onnx.onnx.model import input_shape
from anp_onnx.pipeline.device import resolve_device
from anp_onnx.pipeline.purify import load_prunable

TRIGGER_STEPS = LABEL_TRIGGER_STEPS


@dataclass(frozen=True)
class ScanResult:
    """`score`: the larger of the suspected target's share of the perturbation's errors and of one minus
    its trigger's size over the median size (`anp_onnx.methods.trigger.target.weigh_evidence`); `target_share` and
    `size_ratio` are those two parts. `perturbation_target` is the label the perturbation alone names;
    `candidates` the labels whose triggers were too close in size to tell apart (purify's longer synthesis
    decides among them)."""

    model: str
    score: float
    suspected_target: int
    candidates: list[int]
    target_share: float
    size_ratio: float
    suspicious: bool
    error_rate: float
    label_histogram: list[int]
    perturbation_target: int
    trigger_sizes: list[float]  # of `trigger_labels`, in that order
    trigger_successes: list[float]
    trigger_labels: list[int]  # every label, or the shortlist's above 12 (methods/trigger/shortlist.py)
    shortlist: dict[str, object] | None
    eps: float
    rounds: int
    trigger_steps: int
    device: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def scan(
    model_path: str | Path,
    data_path: str | Path,
    *,
    eps: float = 0.4,
    rounds: int = PERTURBATION_ROUNDS,
    trigger_steps: int = TRIGGER_STEPS,
    seed: int = 0,
    device: str = "auto",
    class_output: str | None = None,
    on_label: Callable[[int, int], None] | None = None,
) -> ScanResult:
    """Perturb the neurons adversarially `rounds` times (a fresh random start each) and count where the
    clean samples that become misclassified go; synthesise a patch trigger for every label, or for a
    shortlist of them above 12 labels (`on_label(done, total)` after each); weigh both."""
    if rounds < 1:
        raise AnpError("--rounds must be at least 1")
    if trigger_steps < 1:
        raise AnpError("--trigger-steps must be at least 1")
    torch_device = resolve_device(device)
    classifier, x, y = calibrated_classifier(model_path, data_path, torch_device, seed, class_output)
    search = search_target(
        classifier, x, y, eps=eps, rounds=rounds, trigger_steps=trigger_steps, seed=seed, on_label=on_label
    )
    evidence, histogram, triggers = search.evidence, search.histogram, search.triggers
    return ScanResult(
        model=str(model_path),
        score=round(evidence.score, 4),
        suspected_target=evidence.label,
        candidates=list(evidence.candidates),
        target_share=round(evidence.share, 4),
        size_ratio=round(evidence.size_ratio, 4),
        suspicious=evidence.score >= SUSPICIOUS_SCORE,
        error_rate=round(search.error_rate, 4),
        label_histogram=[int(count) for count in histogram],
        perturbation_target=suspected_target(histogram)[0],
        trigger_sizes=[round(trigger.size, 2) for trigger in triggers],
        trigger_successes=[round(trigger.success, 4) for trigger in triggers],
        trigger_labels=search.labels,
        shortlist=search.shortlist.summary() if search.shortlist else None,
        eps=eps,
        rounds=rounds,
        trigger_steps=trigger_steps,
        device=str(torch_device),
    )


def calibrated_classifier(
    model_path: str | Path,
    data_path: str | Path,
    torch_device: torch.device,
    seed: int,
    class_output: str | None = None,
) -> tuple[GatedClassifier, torch.Tensor, torch.Tensor]:
    """The model imported for perturbation on `torch_device` and calibrated on the clean data, with that data."""
    model, neuron_map, output_index = load_prunable(Path(model_path), class_output)
    clean = load_samples(data_path, input_shape(model), "--data")
    classifier = import_model(model, neuron_map, renormalise=True, output_index=output_index).to(torch_device)
    x, y = tensors(clean.x, clean.y, torch_device)
    calibrate(classifier, x)
    return classifier, x, y
