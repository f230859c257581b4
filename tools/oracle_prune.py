"""How far can pruning alone go on a model? A greedy *oracle* that sees the poisoned data.

Each round prunes the one neuron that lowers `ASR + weight * ACC drop` most on a selection subset
of the test and poison data, then reports ACC/ASR on the rest. This is not a defence (it decides
from poisoned data); it bounds what any pruning-only defence can reach on the model, e.g.::

    .venv/bin/python tools/oracle_prune.py examples/badnets_resnet_bn --rounds 30

With `--smooth` the ASR term is the mean probability of the target on the poisoned images (from
the logits' softmax, as the bench's models output): where the backdoor runs through many neurons
(the MLPs), pruning one of them moves no prediction and the ASR alone leaves the greedy choice blind.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
import onnx
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from anp_onnx.bridge.fast_eval import fast_eval  # noqa: E402
from anp_onnx.bridge.importer import import_model  # noqa: E402
from anp_onnx.data import load_samples  # noqa: E402
from anp_onnx.methods.anp import AnpSettings  # noqa: E402
from anp_onnx.methods.perturbation import calibrate  # noqa: E402
from anp_onnx.onnx.model import input_shape  # noqa: E402
from anp_onnx.onnx.neurons import build_neuron_map  # noqa: E402


def hit_rate(classifier, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return 100 * float((classifier(x).argmax(1) == y).float().mean())


def label_probability(classifier, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return 100 * float(classifier(x).softmax(1).gather(1, y[:, None]).mean())


@click.command()
@click.argument("example", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--rounds", default=30, show_default=True)
@click.option("--select", default=300, show_default=True, help="Test and poison samples used to choose.")
@click.option("--weight", default=1.0, show_default=True, help="Weight of the ACC drop against ASR.")
@click.option("--smooth", is_flag=True, help="Score the target's mean probability instead of the ASR.")
@click.option("--threads", type=int, default=None, help="torch threads (default: torch's own).")
def main(example: Path, rounds: int, select: int, weight: float, smooth: bool, threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)
    model = onnx.load(str(example / "model.onnx"))
    neuron_map = build_neuron_map(model)
    shape = input_shape(model)
    clean, test, poison = (load_samples(example / f"{name}.npz", shape) for name in ("clean", "test", "poison"))
    classifier = import_model(model, neuron_map, renormalise=True)
    calibrate(classifier, torch.from_numpy(clean.x), neuron_mode=AnpSettings().neuron_mode)
    classifier.eval()
    pick = [torch.from_numpy(a[:select]) for a in (test.x, test.y, poison.x, poison.y)]
    rest = [torch.from_numpy(a[select:]) for a in (test.x, test.y, poison.x, poison.y)]
    click.echo(
        f"{example.name}: before ACC/ASR on the rest {hit_rate(classifier, *rest[:2]):.1f}/"
        f"{hit_rate(classifier, *rest[2:]):.1f}"
    )
    with fast_eval(classifier):
        _greedy_oracle(classifier, pick, rest, rounds, weight, label_probability if smooth else hit_rate)


def _greedy_oracle(
    classifier, pick: list[torch.Tensor], rest: list[torch.Tensor], rounds: int, weight: float, backdoor_term
) -> None:
    gates = list(zip(classifier.neuron_map.layers, classifier.gates, strict=True))
    base_acc = hit_rate(classifier, pick[0], pick[1])
    for round_ in range(1, rounds + 1):
        best = None
        for layer, gate in gates:
            for channel in range(layer.channels):
                if gate.mask[channel] == 0:
                    continue
                with torch.no_grad():
                    gate.mask[channel] = 0.0
                acc, asr = hit_rate(classifier, pick[0], pick[1]), backdoor_term(classifier, pick[2], pick[3])
                with torch.no_grad():
                    gate.mask[channel] = 1.0
                score = asr + weight * max(0.0, base_acc - acc)
                if best is None or score < best[0]:
                    best = (score, layer.name, channel, gate, acc, asr)
        assert best is not None
        _, name, channel, gate, acc, asr = best
        with torch.no_grad():
            gate.mask[channel] = 0.0
        click.echo(
            f"round {round_:2d}: {name}[{channel}] select {acc:.1f}/{asr:.1f}  "
            f"rest ACC/ASR {hit_rate(classifier, *rest[:2]):.1f}/{hit_rate(classifier, *rest[2:]):.1f}"
        )
        sys.stdout.flush()


if __name__ == "__main__":
    main()
