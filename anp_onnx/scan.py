"""A trigger-free backdoor check: adversarial neuron perturbations flip a backdoored model's clean
inputs mostly onto one label (the target), while a clean model's errors spread over many labels."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from anp_onnx import anp
from anp_onnx.anp import AnpSettings
from anp_onnx.data import load_samples
from anp_onnx.errors import AnpError
from anp_onnx.importer import GatedClassifier, import_model
from anp_onnx.model import input_shape
from anp_onnx.purify import load_prunable, resolve_device
from anp_onnx.target import perturbation_errors, suspected_target

SUSPICIOUS_SCORE = 0.3  # provisional: set from five bundled models (docs/METHOD.md)


@dataclass(frozen=True)
class ScanResult:
    """`score`: share of perturbation-induced errors that land on the most hit label."""

    model: str
    score: float
    suspected_target: int
    error_rate: float
    label_histogram: list[int]
    suspicious: bool
    eps: float
    rounds: int
    device: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def scan(
    model_path: str | Path,
    data_path: str | Path,
    *,
    eps: float = 0.4,
    rounds: int = 4,
    seed: int = 0,
    device: str = "auto",
    class_output: str | None = None,
) -> ScanResult:
    """Perturb the neurons adversarially `rounds` times (a fresh random start each) and count where
    the clean samples that become misclassified go."""
    if rounds < 1:
        raise AnpError("--rounds must be at least 1")
    torch_device = resolve_device(device)
    classifier, x, y = calibrated_classifier(model_path, data_path, torch_device, seed, class_output)
    histogram, errors = perturbation_errors(classifier, x, y, eps, rounds, seed)
    target, score = suspected_target(histogram)
    return ScanResult(
        model=str(model_path),
        score=round(score, 4),
        suspected_target=target,
        error_rate=round(errors / (rounds * len(y)), 4),
        label_histogram=[int(count) for count in histogram],
        suspicious=score >= SUSPICIOUS_SCORE,
        eps=eps,
        rounds=rounds,
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
    x, y = anp.tensors(clean.x, clean.y, torch_device)
    anp.calibrate(classifier, x, AnpSettings(seed=seed))
    return classifier, x, y
