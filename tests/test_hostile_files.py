"""Broken or hostile inputs end in one line on stderr and exit code 2, and never leave half a file."""

import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from conftest import matmul_mlp, random_samples

from anp_onnx.cli.main import main

FEATURES, CLASSES = 20, 5
QUICK = ("--method", "anp", "--iterations", "1", "--batch-size", "4")


@pytest.fixture(scope="module")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return matmul_mlp(tmp_path_factory.mktemp("mlp") / "mlp.onnx")


@pytest.fixture(scope="module")
def vectors(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_samples(tmp_path_factory.mktemp("vectors") / "v.npz", 16, (FEATURES,), classes=CLASSES)


def run(*args: object):
    return CliRunner().invoke(main, [str(arg) for arg in args])


def assert_refused(result, message: str) -> None:
    """Exit code 2 and a single `anp-onnx: error:` line that holds `message`, after any progress lines."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("anp-onnx: error:")]
    assert len(errors) == 1 and result.output.rstrip("\n").endswith(errors[0]), result.output
    assert message in errors[0], errors[0]


def with_first_initializer(source: Path, target: Path, edit) -> Path:
    model = onnx.load(str(source))
    edit(model.graph.initializer[0])
    target.write_bytes(model.SerializeToString())
    return target


def length_delimited(field: int, payload: bytes) -> bytes:
    """One protobuf field of wire type 2: tag, varint length, payload."""
    length, size = len(payload), bytearray()
    while True:
        size.append((length & 0x7F) | (0x80 if length > 0x7F else 0))
        length >>= 7
        if not length:
            break
    return bytes([field << 3 | 2]) + bytes(size) + payload


def deeply_nested_model(levels: int) -> bytes:
    """ModelProto.graph -> node -> attribute -> g -> node -> ... `levels` subgraphs deep."""
    graph = b""
    for _ in range(levels):
        graph = length_delimited(1, length_delimited(5, length_delimited(6, graph)))
    return length_delimited(7, graph)


@pytest.fixture
def short_initializer(tmp_path, mlp) -> Path:
    def drop_eight_bytes(tensor):
        tensor.raw_data = tensor.raw_data[:-8]

    return with_first_initializer(mlp, tmp_path / "short.onnx", drop_eight_bytes)


@pytest.mark.parametrize("command", ["inspect", "evaluate", "purify"])
def test_an_initializer_smaller_than_its_dims_is_refused_by_every_command(
    tmp_path, short_initializer, vectors, command
):
    options = {
        "inspect": [],
        "evaluate": ["--data", vectors],
        "purify": ["--data", vectors, "-o", tmp_path / "out.onnx", *QUICK],
    }[command]
    result = run(command, short_initializer, *options)
    assert_refused(result, "initializer 'w1' declares 320 values [20, 16] (1280 bytes) but holds 1272 bytes")
    assert not (tmp_path / "out.onnx").exists()


def test_absurd_dimensions_are_refused_without_allocating_them(tmp_path, mlp, vectors):
    def absurd(tensor):
        del tensor.dims[:]
        tensor.dims.extend([2**40, 2**40])

    path = with_first_initializer(mlp, tmp_path / "absurd.onnx", absurd)
    for arguments in (["inspect", path], ["evaluate", path, "--data", vectors]):
        assert_refused(run(*arguments), f"declares {2**80} values")


def test_a_negative_dimension_is_refused(tmp_path, mlp):
    def negative(tensor):
        tensor.dims[0] = -20

    assert_refused(run("inspect", with_first_initializer(mlp, tmp_path / "neg.onnx", negative)), "negative dimension")


def test_an_initializer_of_a_data_type_onnx_does_not_know_is_refused(tmp_path, mlp, vectors):
    def unknown(tensor):
        tensor.data_type = 29  # past the last type this onnx version maps (a flipped byte, as the fuzz test found)

    path = with_first_initializer(mlp, tmp_path / "dtype.onnx", unknown)
    for arguments in (["inspect", path], ["evaluate", path, "--data", vectors]):
        assert_refused(run(*arguments), "data type 29, which this onnx version does not know")


def test_typed_data_with_too_few_entries_is_refused(tmp_path, mlp):
    def typed(tensor):
        values = onnx.numpy_helper.to_array(tensor).reshape(-1)[:-1]
        tensor.ClearField("raw_data")
        tensor.float_data.extend(values.tolist())

    path = with_first_initializer(mlp, tmp_path / "typed.onnx", typed)
    assert_refused(run("inspect", path), "declares 320 values [20, 16] but holds 319 entries")


def test_a_truncated_file_is_not_a_readable_model(tmp_path, mlp, vectors):
    path = tmp_path / "half.onnx"
    path.write_bytes(mlp.read_bytes()[: mlp.stat().st_size // 2])
    for arguments in (["inspect", path], ["evaluate", path, "--data", vectors]):
        assert_refused(run(*arguments), "not a readable ONNX model")


def test_protobuf_nested_past_the_parser_depth_limit_is_refused(tmp_path):
    path = tmp_path / "deep.onnx"
    path.write_bytes(deeply_nested_model(5000))
    assert_refused(run("inspect", path), "not a readable ONNX model")


def test_an_empty_file_is_refused(tmp_path):
    path = tmp_path / "empty.onnx"
    path.touch()
    assert_refused(run("inspect", path), "empty file, not an ONNX model")


def test_a_file_that_is_not_onnx_is_refused(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_bytes(b"\x08\x07this is not a protobuf\xff\xff")
    assert_refused(run("inspect", path), "not a readable ONNX model")


def test_an_output_path_that_is_a_folder_is_refused_before_any_work(tmp_path, mlp, vectors):
    folder = tmp_path / "taken"
    folder.mkdir()
    (folder / "keep.txt").write_text("kept")
    result = run("purify", mlp, "--data", vectors, "-o", folder, "--force", *QUICK)
    assert_refused(result, f"output {folder} is a folder: give a file path with -o")
    assert [path.name for path in folder.iterdir()] == ["keep.txt"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["taken"], "no temporary file is left"


def test_an_output_folder_that_does_not_exist_is_refused(tmp_path, mlp, vectors):
    result = run("purify", mlp, "--data", vectors, "-o", tmp_path / "absent" / "out.onnx", *QUICK)
    assert_refused(result, "output folder does not exist")


def _file_size_limit() -> None:
    """Writes past 1000 bytes fail with EFBIG, as on a full disk (and even for root)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))


def test_a_full_disk_while_writing_keeps_the_previous_file(tmp_path, mlp, vectors):
    output = tmp_path / "out.onnx"
    output.write_bytes(b"previous")
    command = [
        sys.executable,
        "-m",
        "anp_onnx.cli.main",
        "purify",
        mlp,
        "--data",
        vectors,
        "-o",
        output,
        "--force",
    ]
    completed = subprocess.run(
        [str(part) for part in [*command, *QUICK]], capture_output=True, text=True, preexec_fn=_file_size_limit
    )
    assert completed.returncode == 2, completed.stderr
    assert completed.stderr.splitlines()[-1].startswith(f"anp-onnx: error: cannot write {output}: File too large")
    assert "Traceback" not in completed.stderr
    assert output.read_bytes() == b"previous"
    assert [path.name for path in tmp_path.iterdir()] == ["out.onnx"], "no temporary file is left"


def test_empty_data_is_refused(tmp_path, mlp):
    path = tmp_path / "empty.npz"
    np.savez(path, x=np.zeros((0, FEATURES), np.float32), y=np.zeros(0, np.int64))
    assert_refused(run("evaluate", mlp, "--data", path), f"--data {path}: no samples")


def test_fewer_samples_than_one_batch_still_purify(tmp_path, mlp):
    data = random_samples(tmp_path / "three.npz", 3, (FEATURES,), classes=CLASSES)
    result = run(
        "purify",
        mlp,
        "--data",
        data,
        "-o",
        tmp_path / "out.onnx",
        "--method",
        "anp",
        "--iterations",
        "2",
        "--batch-size",
        "128",
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out.onnx").is_file()


def test_nan_in_the_data_is_refused(tmp_path, mlp):
    path = tmp_path / "nan.npz"
    x = np.zeros((4, FEATURES), np.float32)
    x[2, 3] = np.nan
    np.savez(path, x=x, y=np.zeros(4, np.int64))
    assert_refused(run("evaluate", mlp, "--data", path), f"--data {path}: 'x' contains NaN or Inf")


def test_data_option_missing_is_a_usage_error(mlp):
    result = run("purify", mlp)
    assert_refused(result, "Missing option '--data'.")
    assert "purify --help" in result.output


def test_an_unknown_device_is_a_usage_error(mlp, vectors):
    assert_refused(run("evaluate", mlp, "--data", vectors, "--device", "tpu"), "Invalid value for '--device'")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_asked_for_but_absent_is_refused(tmp_path, mlp, vectors):
    result = run("evaluate", mlp, "--data", vectors, "--device", "cuda")
    assert_refused(result, "--device cuda: no CUDA device is available to onnxruntime here; use --device cpu")
    result = run("purify", mlp, "--data", vectors, "-o", tmp_path / "o.onnx", "--device", "cuda", *QUICK)
    assert_refused(result, "--device cuda: no CUDA device is available to torch here; use --device cpu")
