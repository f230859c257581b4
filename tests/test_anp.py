import numpy as np
import onnx
import pytest
import torch

from anp_onnx.bridge.importer import import_model
from anp_onnx.methods import anp
from anp_onnx.methods.anp import AnpSettings
from anp_onnx.onnx.neurons import build_neuron_map

FEW = AnpSettings(iterations=6, batch_size=16)


def prepared(path, samples_path, settings=FEW):
    model = onnx.load(str(path))
    classifier = import_model(model, build_neuron_map(model), renormalise=True)
    data = np.load(samples_path)
    x, y = anp.tensors(data["x"], data["y"], torch.device("cpu"))
    anp.calibrate(classifier, x, neuron_mode=settings.neuron_mode)
    return classifier, x, y


@pytest.mark.parametrize("kind", ["folded", "batchnorm"])
def test_mask_optimisation_is_reproducible_from_the_seed(models, image_samples, kind):
    first = anp.optimise_masks(*prepared(models[kind], image_samples), FEW)
    second = anp.optimise_masks(*prepared(models[kind], image_samples), FEW)
    other_seed = anp.optimise_masks(
        *prepared(models[kind], image_samples), AnpSettings(iterations=6, batch_size=16, seed=1)
    )
    for name in first.masks:
        assert np.array_equal(first.masks[name], second.masks[name])
    assert any(not np.array_equal(first.masks[n], other_seed.masks[n]) for n in first.masks)


def test_masks_stay_in_the_unit_interval_and_move(models, image_samples):
    values = anp.optimise_masks(
        *prepared(models["folded"], image_samples), AnpSettings(iterations=20, batch_size=16, mask_lr=1.0)
    )
    masks = np.concatenate(list(values.masks.values()))
    assert masks.min() >= 0.0 and masks.max() <= 1.0
    assert (masks < 1.0).any(), "twenty steps of lr 1.0 must move some mask"


def test_optimisation_leaves_the_model_weights_and_batch_norm_statistics_alone(models, image_samples):
    classifier, x, y = prepared(models["batchnorm"], image_samples)
    before = {name: tensor.clone() for name, tensor in classifier.graph_module.state_dict().items()}
    anp.optimise_masks(classifier, x, y, FEW)
    after = classifier.graph_module.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before if "num_batches" not in name)


def test_the_inner_step_moves_noise_by_eps_along_the_loss_gradient_sign(models, image_samples):
    classifier, x, y = prepared(models["folded"], image_samples)
    eps = 0.4
    noises = anp.noise_parameters(classifier)
    generator = torch.Generator().manual_seed(0)
    anp.adversarial_noise(classifier, x[:32], y[:32], noises, eps, generator)
    values = torch.cat([noise.detach() for noise in noises])
    assert values.abs().max() <= 2 * eps + 1e-6, "random start in [-eps, eps] plus one step of eps, not clipped"
    assert (values.abs() > eps).any(), "the step goes beyond the random start's range for some neurons"
    random_start = torch.rand(values.shape, generator=torch.Generator().manual_seed(0)) * 2 * eps - eps
    assert torch.allclose((values - random_start).abs()[values != random_start], torch.tensor(eps), atol=1e-5)


def test_the_adversarial_step_raises_the_clean_loss(models, image_samples):
    classifier, x, y = prepared(models["folded"], image_samples)
    noises = anp.noise_parameters(classifier)
    with anp.optimisation_mode(classifier):
        anp.adversarial_noise(classifier, x, y, noises, 0.4, torch.Generator().manual_seed(0))
        with torch.no_grad():
            adversarial = classifier.loss(classifier(x), y).item()
            for noise in noises:
                noise.copy_(torch.rand(noise.shape, generator=torch.Generator().manual_seed(1)) * 0.8 - 0.4)
            random = classifier.loss(classifier(x), y).item()
    assert adversarial > random


def test_augmentation_crops_and_flips_without_changing_the_shape():
    images = torch.arange(2 * 1 * 16 * 16, dtype=torch.float32).reshape(2, 1, 16, 16)
    augmented = anp.augment(images, torch.Generator().manual_seed(0))
    assert augmented.shape == images.shape
    assert not torch.equal(augmented, images)
    for index in range(2):
        kept = set(augmented[index].flatten().tolist()) - {0.0}
        assert kept <= set(images[index].flatten().tolist()), "a crop only moves pixels, or pads with zeros"


def test_batchnorm_mode_gives_folded_conv_channels_their_clean_mean_as_pruned_value(models, image_samples):
    classifier, _, _ = prepared(models["folded"], image_samples, AnpSettings(neuron_mode="batchnorm"))
    gate = classifier.gates[0]
    assert gate.renormalise
    assert torch.allclose(gate.pruned_value, gate.reference_mean)
    bias_mode, _, _ = prepared(models["folded"], image_samples, AnpSettings(neuron_mode="bias"))
    assert not bias_mode.gates[0].renormalise
    assert not torch.allclose(bias_mode.gates[0].pruned_value, gate.reference_mean)


def test_the_mask_average_is_the_mean_after_the_burn_in():
    mask = torch.zeros(3)
    average = anp.MaskAverage([mask], start=2)
    for iteration, value in enumerate([9.0, 9.0, 1.0, 2.0, 3.0]):
        mask.fill_(value)
        average.add(iteration)
    assert torch.allclose(average.means()[0], torch.full((3,), 2.0, dtype=torch.float64))
    assert anp.MaskAverage([mask], start=10).means() is None, "no mean before the burn-in ends"


def test_early_stop_waits_for_the_same_decision_at_patience_checks_in_a_row():
    decisions = iter([{1}, {1, 2}, {1, 2}, {1, 2}, {1, 2}])
    stop = anp.StopWhenStable(lambda _values: frozenset(next(decisions)), every=10, patience=3)
    checked = [iteration for iteration in range(50) if stop(iteration, lambda: None)]
    assert checked == [49] and stop.stopped_at == 50
    assert not stop(5, lambda: None), "only every `every` iterations is looked at"


def test_early_stop_ends_the_loop_and_says_where(models, image_samples):
    classifier, x, y = prepared(models["folded"], image_samples)
    stop = anp.StopWhenStable(lambda _values: frozenset(), every=2, patience=2)
    seen = []
    anp.optimise_masks(classifier, x, y, AnpSettings(iterations=50, batch_size=16), seen.append, stop)
    assert stop.stopped_at == 6 and len(seen) == 6
