import re
import tracemalloc

import numpy as np
import pytest

from anp_onnx.data import (
    STREAM_ROWS,
    Samples,
    input_layout,
    is_channels_last,
    load_samples,
    open_samples,
    split_holdout,
)
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
    path = save(tmp_path / "d.npz", x, y)
    with pytest.raises(AnpError, match=message):
        load_samples(path, (None, 1, 4, 4))
    with pytest.raises(AnpError, match=message):
        open_samples(path, (None, 1, 4, 4))


def test_a_bare_npy_array_named_npz_is_refused_for_what_it_is(tmp_path):
    """numpy reads a file that starts with the .npy magic as one array, whatever its name (found by make fuzz)."""
    path = tmp_path / "d.npz"
    with path.open("wb") as handle:
        np.save(handle, np.zeros((3, 4, 4), np.float32))
    message = re.escape("a single .npy array, not an .npz archive with arrays 'x' and 'y'")
    for read in (load_samples, open_samples):
        with pytest.raises(AnpError, match=message):
            read(path, (None, 1, 4, 4))


@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_streamed_batches_hold_exactly_what_loading_whole_gives(tmp_path, compressed, dtype):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (2500, 6, 6), dtype=np.uint8) if dtype == np.uint8 else rng.random((2500, 1, 6, 6), dtype)
    y = rng.integers(0, 10, 2500)
    path = tmp_path / "d.npz"
    (np.savez_compressed if compressed else np.savez)(path, x=x, y=y)
    whole = load_samples(path, (None, 1, 6, 6))
    stream = open_samples(path, (None, 1, 6, 6))
    batches = list(stream.batches(rows=1000))
    assert [len(batch) for batch in batches] == [1000, 1000, 500]
    assert np.array_equal(np.concatenate([batch.x for batch in batches]), whole.x)
    assert np.array_equal(np.concatenate([batch.y for batch in batches]), whole.y)


def test_column_major_arrays_are_streamed_too(tmp_path):
    x = np.asfortranarray(np.random.default_rng(0).random((50, 12), np.float32))
    path = save(tmp_path / "d.npz", x, np.arange(50) % 3)
    assert np.array_equal(np.concatenate([batch.x for batch in open_samples(path, (None, 12)).batches(7)]), x)


def test_a_truncated_array_is_a_clean_error(tmp_path):
    path = save(tmp_path / "d.npz", np.zeros((300, 1, 4, 4), np.float32), np.zeros(300, np.int64))
    data = bytearray(path.read_bytes())
    start = data.index(b"x.npy") + 200  # inside the stored x array
    path.write_bytes(bytes(data[:start]) + bytes(data[start + 4000 :]))
    with pytest.raises(AnpError, match=r"not a readable \.npz|truncated"):
        open_samples(path, (None, 1, 4, 4))


def test_memory_stays_bounded_while_a_large_test_set_is_streamed(tmp_path):
    """A 63 MB test set is checked and read through holding a few batches, not the whole set."""
    count = 20_000
    path = save(tmp_path / "big.npz", np.ones((count, 1, 28, 28), np.float32), np.zeros(count, np.int64))
    size = path.stat().st_size
    tracemalloc.start()
    try:
        stream = open_samples(path, (None, 1, 28, 28))
        seen = sum(float(batch.x.sum()) for batch in stream.batches())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert seen == count * 28 * 28
    batch_bytes = STREAM_ROWS * 28 * 28 * 4
    assert size > 60_000_000 and peak < 4 * batch_bytes


@pytest.mark.parametrize(
    ("shape", "channels_last"),
    [
        ((None, 8, 8, 3), True),
        ((None, 32, 32, 1), True),
        ((None, 16, 16, 4), True),
        ((None, 3, 8, 8), False),
        ((None, 3, 8, 3), False),  # both ends look like channels: NCHW, as exporters mostly write
        ((None, 8, 8, 8), False),
        ((None, 3, 32), False),
        ((None, 192), False),
    ],
)
def test_the_layout_guess_reads_channels_off_the_smaller_end(shape, channels_last):
    assert is_channels_last(shape) is channels_last
    if len(shape) == 4:
        assert input_layout(shape) == ("NHWC" if channels_last else "NCHW")


def test_a_holdout_split_is_seeded_disjoint_and_covers_every_sample():
    samples = Samples(np.arange(50, dtype=np.float32)[:, None], np.arange(50))
    kept, held = split_holdout(samples, 0.2, seed=3)
    assert (len(kept), len(held)) == (40, 10)
    assert sorted([*kept.y, *held.y]) == list(range(50))
    np.testing.assert_array_equal(kept.x[:, 0], kept.y)  # samples keep their labels
    again_kept, again_held = split_holdout(samples, 0.2, seed=3)
    assert held.y.tolist() == again_held.y.tolist() and kept.y.tolist() == again_kept.y.tolist()
    assert split_holdout(samples, 0.2, seed=4)[1].y.tolist() != held.y.tolist()
    order = np.random.default_rng(3).permutation(50)  # the permutation both methods' results were measured with
    assert held.y.tolist() == order[:10].tolist() and kept.y.tolist() == order[10:].tolist()


@pytest.mark.parametrize("share", [0.001, 0.999])
def test_a_holdout_that_empties_one_side_names_the_setting(share):
    samples = Samples(np.zeros((10, 1), dtype=np.float32), np.zeros(10, dtype=np.int64))
    with pytest.raises(AnpError, match=f"--holdout {share:g} leaves no samples on one side of 10"):
        split_holdout(samples, share, seed=0, what="--holdout")
