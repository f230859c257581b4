"""The `anp-onnx` command line."""

from anp_onnx.cli.main import main

__all__ = ["main"]
