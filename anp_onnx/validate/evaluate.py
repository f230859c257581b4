"""onnxruntime sessions and the two numbers that matter: clean accuracy (ACC) and attack success rate (ASR).

`Evaluator` is the package's one onnxruntime runner: files and in-memory models alike (the baselines
read intermediate tensors of a probed copy through it), batched, with a short last batch padded for
graphs that only take one batch size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from anp_onnx.data import SampleFile, Samples
from anp_onnx.errors import AnpError, one_line
from anp_onnx.onnx.model import class_output_index

EVAL_BATCH = 256
INPUT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


@dataclass(frozen=True)
class Metrics:
    """ACC on clean labelled data and ASR on triggered data labelled with the attacker's target."""

    acc: float | None
    asr: float | None
    clean_samples: int = 0
    poison_samples: int = 0


def providers_for(device: str) -> list[str]:
    """Execution providers for `device` (auto|cpu|cuda); CUDA only where it is really there."""
    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    has_cuda = "CUDAExecutionProvider" in available and _cuda_device_present()
    if device == "cuda" and not has_cuda:
        raise AnpError("--device cuda: no CUDA device is available to onnxruntime here; use --device cpu")
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if has_cuda else ["CPUExecutionProvider"]


def _cuda_device_present() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch is a dependency
        return False


def _session(
    source: str | bytes, label: str, options: ort.SessionOptions, providers: list[str], retry_on_cpu: bool
) -> ort.InferenceSession:
    """An onnxruntime session over a file path or serialised model, or AnpError naming `label`.
    onnxruntime's own fallback is off: it prints to stdout."""
    try:
        return ort.InferenceSession(source, options, providers=providers, enable_fallback=0)
    except Exception as error:  # onnxruntime raises unrelated types (Fail, InvalidGraph, ValueError, ...)
        if retry_on_cpu and providers != ["CPUExecutionProvider"]:
            return _session(source, label, options, ["CPUExecutionProvider"], retry_on_cpu=False)
        raise AnpError(f"{label}: onnxruntime cannot load the model ({one_line(error)})") from None


class Evaluator:
    """One onnxruntime session over a model (a file, or a ModelProto in memory), batched: predictions
    of its class output (`output`, else the first), or any of its outputs by name (`run`)."""

    def __init__(self, model: str | Path | onnx.ModelProto, device: str = "auto", output: str | None = None) -> None:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        in_memory = isinstance(model, onnx.ModelProto)
        label = "the model" if in_memory else str(model)
        source = model.SerializeToString() if in_memory else str(model)
        self.session = _session(source, label, options, providers_for(device), retry_on_cpu=device == "auto")
        try:
            self.input = self.session.get_inputs()[0]
            batch = self.input.shape[0] if self.input.shape else None
            names = [value.name for value in self.session.get_outputs()]
            self.output_name = names[class_output_index(names, output)]
        except UnicodeDecodeError:
            raise AnpError(f"{label}: an input or output name or shape is not valid UTF-8") from None
        self.fixed_batch = isinstance(batch, int) and batch > 0  # the graph only takes batches of this size
        self.batch_size = batch if self.fixed_batch else EVAL_BATCH
        self.input_dtype = INPUT_DTYPES.get(self.input.type, np.float32)  # float32 data feeds a float16 model too

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    def outputs(self, x: np.ndarray) -> np.ndarray:
        """The class output for every sample, run in batches."""
        return self.run(x, [self.output_name])[0]

    def run(self, x: np.ndarray, names: Sequence[str]) -> list[np.ndarray]:
        """The outputs called `names` for every sample (each with the samples along its first axis),
        run in batches."""
        chunks = [self._run(x[start : start + self.batch_size], names) for start in range(0, len(x), self.batch_size)]
        return [np.concatenate([chunk[position] for chunk in chunks]) for position in range(len(names))]

    def _run(self, batch: np.ndarray, names: Sequence[str]) -> list[np.ndarray]:
        """One batch through onnxruntime; a model that fails at run time is the user's file, not a bug.
        A short last batch for a fixed-batch graph is padded with copies of its last sample, then cut."""
        count = len(batch)
        if self.fixed_batch and count < self.batch_size:
            batch = np.concatenate([batch, np.repeat(batch[-1:], self.batch_size - count, axis=0)])
        try:
            feed = {self.input.name: batch.astype(self.input_dtype, copy=False)}
            return [values[:count] for values in self.session.run(list(names), feed)]
        except Exception as error:  # onnxruntime raises its own unrelated types (Fail, InvalidArgument, ...)
            raise AnpError(f"onnxruntime cannot run the model ({one_line(error)})") from None

    def predict(self, x: np.ndarray) -> np.ndarray:
        outputs = self.outputs(x)
        return outputs.reshape(len(outputs), -1).argmax(axis=1)

    def accuracy(self, samples: Samples | SampleFile) -> float:
        """Share of samples predicted as their label (for poison data: the attack success rate),
        counted a batch at a time."""
        hits = sum(int(np.sum(self.predict(batch.x) == batch.y)) for batch in samples.batches())
        return hits / len(samples)

    def measure(self, clean: Samples | SampleFile | None, poison: Samples | SampleFile | None) -> Metrics:
        return Metrics(
            acc=self.accuracy(clean) if clean is not None else None,
            asr=self.accuracy(poison) if poison is not None else None,
            clean_samples=len(clean) if clean is not None else 0,
            poison_samples=len(poison) if poison is not None else 0,
        )
