import numpy as np
import pytest

from anp_onnx.data import input_layout, load_samples
from anp_onnx.errors import AnpError


def save(path, x, y):
    np.savez(path, x=x, y=y)
    return path


def test_uint8_grey_images_are_scaled_and_get_a_channel_axis(tmp_path):
    images = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4)
    samples = load_samples(save(tmp_path / "d.npz", images, np.array([0, 1])), (None, 1, 4, 4))
    assert samples.x.dtype == np.float32 and samples.x.shape == (2, 1, 4, 4)
    np.testing.assert_allclose(samples.x[:, 0], images / 255.0)


def test_uint8_colour_images_follow_the_model_layout(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    path = save(tmp_path / "d.npz", images, np.zeros(3, dtype=np.int64))
    nchw = load_samples(path, (None, 3, 8, 8))
    nhwc = load_samples(path, (None, 8, 8, 3))
    flat = load_samples(path, (None, 192))
    np.testing.assert_allclose(nchw.x, images.transpose(0, 3, 1, 2) / 255.0)
    np.testing.assert_allclose(nhwc.x, images / 255.0)
    np.testing.assert_allclose(flat.x, nchw.x.reshape(3, -1))
    assert input_layout((None, 8, 8, 3)) == "NHWC" and input_layout((None, 3, 8, 8)) == "NCHW"


def test_float_inputs_are_used_as_they_are(tmp_path):
    x = np.random.default_rng(0).normal(size=(4, 1, 4, 4)).astype(np.float32)
    samples = load_samples(save(tmp_path / "d.npz", x, np.arange(4)), (None, 1, 4, 4))
    assert np.array_equal(samples.x, x)


@pytest.mark.parametrize(
    ("x", "y", "message"),
    [
        (np.zeros((2, 5, 5), np.uint8), np.array([0, 1]), "do not fit the model input"),
        (np.full((2, 1, 4, 4), np.nan, np.float32), np.array([0, 1]), "NaN or Inf"),
        (np.zeros((2, 4, 4), np.uint8), np.array([0]), "must be 2 labels"),
        (np.zeros((2, 4, 4), np.uint8), np.array([0.5, 1.0]), "must be integers"),
    ],
)
def test_bad_samples_get_a_message_that_names_the_problem(tmp_path, x, y, message):
    with pytest.raises(AnpError, match=message):
        load_samples(save(tmp_path / "d.npz", x, y), (None, 1, 4, 4))
