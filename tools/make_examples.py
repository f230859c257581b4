"""Regenerate the committed example models under ``examples/`` with fixed seeds.

Each example is one run of ``tools/train_backdoor.py``; run this script from anywhere::

    .venv/bin/python tools/make_examples.py            # all examples
    .venv/bin/python tools/make_examples.py badnets_resnet_bn   # just one
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAINER = ROOT / "tools" / "train_backdoor.py"

# name -> train_backdoor.py arguments (besides --out-dir examples/<name>). The CPU thread count
# changes floating-point summation order, so it is part of each recipe (the trainer defaults to 2).
EXAMPLES: dict[str, list[str]] = {
    "badnets_resnet_bn": ["--arch", "small_resnet", "--attack", "badnets", "--seed", "0", "--export", "bn"],
    "badnets_resnet_folded": ["--arch", "small_resnet", "--attack", "badnets", "--seed", "0", "--export", "folded"],
    "blend_vgg_bn": ["--arch", "vgg_small", "--attack", "blend", "--seed", "1", "--export", "bn", "--threads", "1"],
    "wanet_resnet_bn": [
        "--arch", "small_resnet", "--attack", "wanet", "--seed", "2", "--export", "bn", "--threads", "1",
    ],
    "sig_resnet_bn": [
        "--arch", "small_resnet", "--attack", "sig", "--seed", "5", "--target", "0", "--poison-rate", "0.05",
        "--export", "bn", "--threads", "1",
    ],
    "clean_resnet_bn": [
        "--arch", "small_resnet", "--clean-model", "--seed", "3", "--export", "bn", "--threads", "1",
    ],
}  # fmt: skip


def command(name: str) -> list[str]:
    """The trainer command line that produces ``examples/<name>``."""
    return [sys.executable, str(TRAINER), *EXAMPLES[name], "--out-dir", f"examples/{name}"]


def main(names: list[str]) -> None:
    unknown = sorted(set(names) - set(EXAMPLES))
    if unknown:
        raise SystemExit(f"unknown example(s) {unknown}; choose from {sorted(EXAMPLES)}")
    for name in names or list(EXAMPLES):
        print(f"== {name}: {' '.join(command(name)[1:])}", flush=True)
        subprocess.run(command(name), cwd=ROOT, check=True)


if __name__ == "__main__":
    main(sys.argv[1:])
