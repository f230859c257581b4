"""anp-onnx: Adversarial Neuron Pruning for backdoored ONNX classifiers."""

__version__ = "0.1.0"

__all__ = ["__version__", "purify"]


def __getattr__(name: str):
    if name == "purify":  # imported lazily: torch takes a while to load
        from anp_onnx.pipeline.purify import purify

        return purify
    raise AttributeError(name)
