"""The trigger-size study (tools/trigger_size_study.py): one trigger per label on a bundled model,
one JSON line per model, folders already measured are skipped on a rerun."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools.trigger_size_study import anomaly_index, main, score_rules  # noqa: E402

EXAMPLE = ROOT / "examples" / "badnets_resnet_bn"


def test_anomaly_index_is_the_smallest_sizes_distance_below_the_median_in_robust_deviations() -> None:
    # median 10, absolute deviations [8, 1, 0, 1, 2] -> MAD 1, scaled 1.4826
    assert abs(anomaly_index([2.0, 9.0, 10.0, 11.0, 12.0]) - 8 / 1.4826) < 1e-9
    assert anomaly_index([5.0, 5.0, 5.0]) == 0.0


def test_study_writes_one_line_per_model_with_a_trigger_per_label_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "sizes.jsonl"
    arguments = [str(EXAMPLE), "--steps", "5", "--rounds", "1", "--out", str(out)]

    first = CliRunner().invoke(main, arguments)
    assert first.exit_code == 0, first.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 1
    row = rows[0]
    assert row["name"] == "badnets_resnet_bn" and row["true_target"] == 0
    assert len(row["sizes"]) == len(row["successes"]) == 10
    assert all(0.0 <= success <= 1.0 for success in row["successes"])
    assert row["sizes"][row["smallest_label"]] == min(row["sizes"])
    assert sum(row["histogram"]) == row["errors"]

    second = CliRunner().invoke(main, arguments)
    assert second.exit_code == 0 and "badnets_resnet_bn:" not in second.output  # nothing measured again
    assert out.read_text().count("\n") == 1
    assert "scan (both):" in second.output and "perturbation share:" in second.output


def test_each_rule_is_scored_by_auroc_and_target_hit_rate() -> None:
    backdoored = {"true_target": 1, "histogram": [1, 8, 1], "sizes": [90.0, 30.0, 100.0]}
    backdoored |= {"smallest_label": 1, "min_to_median": 1 / 3}
    clean = {"true_target": None, "histogram": [4, 3, 3], "sizes": [80.0, 90.0, 100.0]}
    clean |= {"smallest_label": 0, "min_to_median": 80 / 90}
    scored = score_rules([backdoored, clean])
    for name in ("perturbation share", "smallest trigger", "scan (both)"):
        assert scored[name]["auroc"] == 1.0 and scored[name]["target_hit_rate"] == 1.0
    assert scored["scan (both)"]["lowest_backdoored"] > scored["scan (both)"]["highest_clean"]
