"""The GPU path: purify with `--device cuda` optimises in torch on the GPU and evaluates with onnxruntime's
CUDA provider. Runs where CUDA is available to both, skipped elsewhere (CI has no GPU; docs/PERFORMANCE.md
records the runs)."""

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from anp_onnx.cli.main import main
from anp_onnx.validate.evaluate import Evaluator

CUDA = torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers()
pytestmark = pytest.mark.skipif(not CUDA, reason="no CUDA device for torch and onnxruntime here")


def test_purify_on_cuda_optimises_on_the_gpu_and_evaluates_with_the_cuda_provider(models, image_samples, tmp_path):
    output, report = tmp_path / "out.onnx", tmp_path / "report.json"
    arguments = [str(models["batchnorm"]), "--data", str(image_samples), "--test-data", str(image_samples)]
    arguments += ["-o", str(output), "--report", str(report), "--device", "cuda", "--effort", "0.1"]
    result = CliRunner().invoke(main, ["purify", *arguments], catch_exceptions=False)
    assert result.exit_code in (0, 3), result.output
    written = json.loads(report.read_text())
    assert written["device"].startswith("cuda") and written["providers"] == ["CUDAExecutionProvider"]
    samples = np.load(image_samples)["x"]
    assert np.allclose(Evaluator(output, "cuda").outputs(samples), Evaluator(output, "cpu").outputs(samples), atol=1e-3)
