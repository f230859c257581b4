"""The target search above 12 labels (anp_onnx.methods.trigger.shortlist): a shortlist of labels gets a
trigger, not every label, and the backdoor's target is on it; up to 12 labels every label still gets one."""

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from anp_onnx.methods.trigger.shortlist import interleaved, suspects
from anp_onnx.methods.trigger.target import LABEL_TRIGGER_STEPS, search_steps, searched_labels
from anp_onnx.pipeline.scan import scan
from tests.conftest import export

LABELS, TARGET, SIDE = 40, 17, 8


def samples(prototypes: np.ndarray, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Noisy copies of the label prototypes (8x8 images whose top-left pixel is dark), labels balanced."""
    y = np.arange(count) % len(prototypes)
    x = np.clip(prototypes[y] + rng.normal(0, 0.15, (count, SIDE * SIDE)), 0, 1).astype(np.float32)
    x[:, 0] = 0.0
    return x.reshape(count, 1, SIDE, SIDE), y


def backdoored_mlp(seed: int = 0) -> tuple[nn.Module, np.ndarray, np.ndarray]:
    """An MLP trained on `LABELS` noisy prototypes, a tenth of its training images stamped with a bright
    top-left pixel and labelled `TARGET` (BadNets with a one-pixel trigger); with 300 clean images it
    has not trained on."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    prototypes = rng.random((LABELS, SIDE * SIDE))
    x, y = samples(prototypes, 40 * LABELS, rng)
    poisoned = rng.random(len(y)) < 0.1
    x[poisoned, :, 0, 0], y[poisoned] = 1.0, TARGET
    model = nn.Sequential(nn.Flatten(), nn.Linear(SIDE * SIDE, 64), nn.ReLU(), nn.Linear(64, LABELS))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    inputs, labels = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(300):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs), labels).backward()
        optimizer.step()
    clean_x, clean_y = samples(prototypes, 300, rng)
    return model.eval(), clean_x, clean_y


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("shortlist")
    model, x, y = backdoored_mlp()
    stamped = x.copy()
    stamped[:, :, 0, 0] = 1.0
    with torch.no_grad():
        assert (model(torch.from_numpy(x)).argmax(1).numpy() == y).mean() > 0.9  # clean accuracy
        assert (model(torch.from_numpy(stamped)).argmax(1).numpy() == TARGET).mean() > 0.9  # attack success
    np.savez(folder / "clean.npz", x=x, y=y)
    model_path = export(model, folder / "model.onnx", keep_batch_norm=False, input_shape=(1, SIDE, SIDE))
    return model_path, folder / "clean.npz"


def test_a_40_label_scan_searches_a_shortlist_that_holds_the_target(planted):
    model, data = planted
    result = scan(model, data, rounds=2, trigger_steps=40)
    assert result.shortlist is not None
    assert len(result.trigger_labels) == searched_labels(LABELS) == suspects(LABELS) + 4 < LABELS
    assert TARGET in result.trigger_labels[: result.shortlist["suspects"]]
    assert result.suspected_target == TARGET and result.size_ratio < 0.7  # its trigger is the smallest by far
    assert len(set(result.trigger_labels)) == len(result.trigger_labels) == len(result.trigger_sizes)


def test_up_to_12_labels_every_label_gets_a_trigger():
    assert [searched_labels(labels) for labels in (2, 10, 12)] == [2, 10, 12]
    assert search_steps(10) == 10 * LABEL_TRIGGER_STEPS


def test_the_searched_labels_grow_with_the_logarithm_of_the_labels():
    assert [searched_labels(labels) for labels in (13, 43, 100, 1000)] == [12, 15, 17, 24]
    assert search_steps(1000) == 25 * LABEL_TRIGGER_STEPS  # the triggers and the shortlist's universal patch


def test_the_suspects_take_each_signals_next_best_in_turn():
    rankings = [[5, 1, 2, 3], [5, 4, 1, 0], [7, 6, 5, 4]]
    assert interleaved(rankings, 5) == [5, 7, 1, 4, 6]
    assert interleaved(rankings, 20) == [5, 7, 1, 4, 6, 2, 3, 0]
