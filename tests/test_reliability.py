"""Interrupts leave either the previous file or none: real subprocesses, real signals."""

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import default_sigint

SLOW_WRITER = """
import sys, time
from pathlib import Path
from anp_onnx.onnx.rewrite import write_atomically

def slow(temporary: Path) -> None:
    with temporary.open("wb") as handle:
        for _ in range(200):
            handle.write(b"x" * 10_000)
            handle.flush()
            print("chunk", flush=True)
            time.sleep(0.05)

write_atomically(Path(sys.argv[1]), slow)
"""


def wait_for_line(process: subprocess.Popen, stream_name: str, text: str, timeout: float = 60) -> None:
    stream = getattr(process, stream_name)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = stream.readline()
        if text in line:
            return
        if not line and process.poll() is not None:
            break
    raise AssertionError(f"never saw {text!r}")


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_while_writing_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, signal_number):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous")
    handler = "import signal; signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))\n"
    process = subprocess.Popen(
        [sys.executable, "-c", handler + SLOW_WRITER, str(target)],
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=default_sigint,
    )
    wait_for_line(process, "stdout", "chunk")
    process.send_signal(signal_number)
    process.wait(timeout=30)
    assert process.returncode != 0
    assert target.read_bytes() == b"previous"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.onnx"]


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_during_optimisation_writes_nothing(tmp_path, models, image_samples, signal_number):
    output = tmp_path / "out.onnx"
    report = tmp_path / "report.json"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "anp_onnx.cli.main",
            "purify",
            str(models["folded"]),
            "--data",
            str(image_samples),
            "-o",
            str(output),
            "--report",
            str(report),
            "--method",
            "anp",
            "--iterations",
            "3000",
            "--batch-size",
            "8",
        ],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # a second busy process must not starve this one
        preexec_fn=default_sigint,
    )
    wait_for_line(process, "stderr", "optimising masks")  # the first tenth is done: we are mid-loop
    process.send_signal(signal_number)
    _, error = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "interrupted" in error and "Traceback" not in error
    assert list(tmp_path.iterdir()) == []
