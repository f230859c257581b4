"""onnxruntime sessions and the two numbers that matter: clean accuracy (ACC) and attack success rate (ASR)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from anp_onnx.data import SampleFile, Samples
from anp_onnx.errors import AnpError
from anp_onnx.onnx.model import one_line

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


def _class_output(session: ort.InferenceSession, name: str | None) -> str:
    """The output to read classes from: `name`, or the first output when None."""
    names = [value.name for value in session.get_outputs()]
    if name is None:
        return names[0]
    if name not in names:
        raise AnpError(f"no output named {name!r}: the model's outputs are {', '.join(names)}")
    return name


def _session(
    model_path: str | Path, options: ort.SessionOptions, providers: list[str], retry_on_cpu: bool
) -> ort.InferenceSession:
    """An onnxruntime session, or AnpError. onnxruntime's own fallback is off: it prints to stdout."""
    try:
        return ort.InferenceSession(str(model_path), options, providers=providers, enable_fallback=0)
    except Exception as error:  # onnxruntime raises unrelated types (Fail, InvalidGraph, ValueError, ...)
        if retry_on_cpu and providers != ["CPUExecutionProvider"]:
            return _session(model_path, options, ["CPUExecutionProvider"], retry_on_cpu=False)
        raise AnpError(f"{model_path}: onnxruntime cannot load the model ({one_line(error)})") from None


class Evaluator:
    """One onnxruntime session over a model file, batched predictions of its class output (`output`,
    else the first)."""

    def __init__(self, model_path: str | Path, device: str = "auto", output: str | None = None) -> None:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = _session(model_path, options, providers_for(device), retry_on_cpu=device == "auto")
        try:
            self.input = self.session.get_inputs()[0]
            batch = self.input.shape[0] if self.input.shape else None
            self.output_name = _class_output(self.session, output)
        except UnicodeDecodeError:
            raise AnpError(f"{model_path}: an input or output name or shape is not valid UTF-8") from None
        self.fixed_batch = isinstance(batch, int) and batch > 0  # the graph only takes batches of this size
        self.batch_size = batch if self.fixed_batch else EVAL_BATCH
        self.input_dtype = INPUT_DTYPES.get(self.input.type, np.float32)  # float32 data feeds a float16 model too

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    def outputs(self, x: np.ndarray) -> np.ndarray:
        """The class output for every sample, run in batches."""
        chunks = [self._run(x[start : start + self.batch_size]) for start in range(0, len(x), self.batch_size)]
        return np.concatenate(chunks)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        """One batch through onnxruntime; a model that fails at run time is the user's file, not a bug.
        A short last batch for a fixed-batch graph is padded with copies of its last sample, then cut."""
        count = len(batch)
        if self.fixed_batch and count < self.batch_size:
            batch = np.concatenate([batch, np.repeat(batch[-1:], self.batch_size - count, axis=0)])
        try:
            feed = {self.input.name: batch.astype(self.input_dtype, copy=False)}
            return self.session.run([self.output_name], feed)[0][:count]
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
