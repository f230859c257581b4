"""Mutated models and data never crash the CLI: every run ends with exit code 0, or 2 and one error line.

ANP_FUZZ_EXAMPLES sets the number of examples per test (50 by default, `make fuzz` runs many more).
"""

import io
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import matmul_mlp, random_samples
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from anp_onnx.cli.main import main

EXAMPLES = int(os.environ.get("ANP_FUZZ_EXAMPLES", "50"))
PURIFY_EXAMPLES = max(5, EXAMPLES // 20)
FEATURES, CLASSES = 20, 5
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def folder() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="anp-fuzz-") as name:
        yield Path(name)


@pytest.fixture(scope="module")
def model_bytes(folder: Path) -> bytes:
    return matmul_mlp(folder / "valid.onnx").read_bytes()


@pytest.fixture(scope="module")
def data(folder: Path) -> Path:
    return random_samples(folder / "valid.npz", 12, (FEATURES,), classes=CLASSES)


def assert_clean_ending(result) -> None:
    """Exit code 0, or 2 with the last line `anp-onnx: error: ...` and no traceback: never a crash."""
    if result.exit_code not in (0, 2):
        raise AssertionError(f"exit code {result.exit_code}: {result.output}") from result.exception
    assert "Traceback" not in result.output
    event(f"exit code {result.exit_code}")
    if result.exit_code == 2:
        errors = [line for line in result.output.splitlines() if line.startswith("anp-onnx: error:")]
        assert len(errors) == 1 and result.output.rstrip("\n").endswith(errors[0]), result.output


def run(*args: object):
    return CliRunner().invoke(main, [str(arg) for arg in args], catch_exceptions=True)


# One edit of a byte string: flip bits (most often: they keep the protobuf framing), insert, delete, truncate.
flips = st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(1, 255))
edits = st.one_of(
    flips,
    flips,
    flips,
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), st.integers(0, 10**6), st.integers(1, 64)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.just(0)),
)


def mutate(original: bytes, changes: list[tuple]) -> bytes:
    """Apply each edit at a position taken modulo the current length."""
    data = bytearray(original)
    for kind, where, what in changes:
        at = where % (len(data) + 1)
        if kind == "flip" and at < len(data):
            data[at] ^= what
        elif kind == "insert":
            data[at:at] = what
        elif kind == "delete":
            del data[at : at + what]
        elif kind == "truncate":
            del data[at:]
    return bytes(data)


@FUZZ
@given(changes=st.lists(edits, min_size=1, max_size=4))
def test_mutated_models_are_inspected_and_evaluated_or_refused(folder, model_bytes, data, changes):
    path = folder / "mutated.onnx"
    path.write_bytes(mutate(model_bytes, changes))
    assert_clean_ending(run("inspect", path))
    assert_clean_ending(run("evaluate", path, "--data", data))


dtypes = st.sampled_from(["uint8", "float32", "float64", "float16", "int32", "int64", "bool", "complex64", "U3"])
odd_values = st.sampled_from([0.0, 1.0, -1.0, 255.0, np.nan, np.inf, -np.inf, 1e38, -1e300, 7.0, 4.0, 5.0])


@st.composite
def arrays(draw, rows: int) -> np.ndarray:
    """A small array of any dtype and shape, usually with `rows` rows, holding ordinary and odd values."""
    count = draw(st.sampled_from([rows, rows, 0, 1, rows + 1]))
    tail = draw(st.lists(st.integers(0, 24), max_size=3).map(tuple) | st.just((FEATURES,)))
    shape = (count, *tail) if draw(st.booleans()) or tail == () else tail
    values = draw(st.lists(odd_values, min_size=1, max_size=4))
    flat = np.resize(np.array(values), int(np.prod(shape, dtype=np.int64)))
    with np.errstate(all="ignore"):
        return flat.reshape(shape).astype(draw(dtypes))


@st.composite
def plausible(draw) -> dict[str, np.ndarray]:
    """x and y of the right shapes whose values may still be odd (NaN, huge, labels out of range)."""
    rows, valid = draw(st.integers(1, 8)), draw(st.booleans())
    values = draw(st.lists(st.floats(-10, 10) if valid else odd_values, min_size=1, max_size=4))
    dtype = "float32" if valid else draw(dtypes)
    with np.errstate(all="ignore"):
        x = np.resize(np.array(values), rows * FEATURES).reshape(rows, FEATURES).astype(dtype)
    labels = st.integers(0, CLASSES - 1) if valid else st.integers(-2, CLASSES + 1)
    y = np.array(draw(st.lists(labels, min_size=rows, max_size=rows)))
    return {"x": x, "y": y.astype(draw(st.sampled_from(["int64", "int8", "uint8", "float32"])))}


@st.composite
def anything(draw) -> dict[str, np.ndarray]:
    """Arrays under x, y or other names, of any dtype and shape."""
    rows = draw(st.integers(1, 8))
    names = draw(st.lists(st.sampled_from(["x", "y", "z", "X"]), min_size=0, max_size=3, unique=True))
    return {name: draw(arrays(rows)) for name in names}


@st.composite
def archives(draw) -> bytes:
    """An .npz of plausible or arbitrary arrays, sometimes with its zip bytes damaged afterwards."""
    buffer = io.BytesIO()
    np.savez(buffer, **draw(plausible() | anything()))
    content = buffer.getvalue()
    if draw(st.integers(0, 3)) == 0:
        content = mutate(content, draw(st.lists(edits, min_size=1, max_size=3)))
    return content


@FUZZ
@given(content=archives())
def test_odd_data_is_evaluated_or_refused(folder, model_bytes, content):
    model, path = folder / "model.onnx", folder / "odd.npz"
    model.write_bytes(model_bytes)
    path.write_bytes(content)
    assert_clean_ending(run("evaluate", model, "--data", path))
    assert_clean_ending(run("evaluate", model, "--data", folder / "valid.npz", "--poison-data", path))


@settings(FUZZ, max_examples=PURIFY_EXAMPLES)
@given(changes=st.lists(flips, max_size=2), content=archives())
def test_purify_on_mutated_inputs_ends_cleanly(folder, model_bytes, changes, content):
    model, path, output = folder / "p.onnx", folder / "p.npz", folder / "p.out.onnx"
    model.write_bytes(mutate(model_bytes, changes))
    path.write_bytes(content)
    output.unlink(missing_ok=True)
    assert_clean_ending(
        run("purify", model, "--data", path, "-o", output, "--method", "anp", "--iterations", "1", "--batch-size", "4")
    )
