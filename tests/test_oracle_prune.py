"""tools/oracle_prune.py, the greedy oracle that bounds what pruning alone reaches (docs/METHOD.md):
one round on the bundled BadNets ResNet, with the ASR and with the smooth target-probability score."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools.oracle_prune import main  # noqa: E402

EXAMPLE = ROOT / "examples" / "badnets_resnet_bn"


@pytest.mark.parametrize(
    "score",
    [[], pytest.param(["--smooth"], marks=pytest.mark.slow)],  # a minute or two each on two CPU cores
)
def test_one_oracle_round_prunes_a_neuron_that_lowers_the_asr_on_the_held_back_images(score):
    result = CliRunner().invoke(main, [str(EXAMPLE), "--rounds", "1", "--select", "100", *score])
    assert result.exit_code == 0, result.output
    before = re.search(r"before ACC/ASR on the rest ([\d.]+)/([\d.]+)", result.output)
    after = re.search(r"round  1: (\S+)\[(\d+)\] .* rest ACC/ASR ([\d.]+)/([\d.]+)", result.output)
    assert before and after, result.output
    assert float(before[2]) == 100.0
    assert float(after[4]) < 95.0  # one neuron of the backdoor's path (docs/METHOD.md: 70.7 from 100)
    assert float(before[1]) - float(after[3]) < 5.0
