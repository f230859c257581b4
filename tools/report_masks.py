"""Read the mask values back from a purify report (its `layers`), to sweep or plot them again later
(a study helper: the package itself never reads its own reports back)::

    from tools.report_masks import masks_from_report
    masks = masks_from_report(json.loads(Path("report.json").read_text()))
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from anp_onnx.prune import MaskValues


def masks_from_report(report: Mapping[str, object]) -> MaskValues:
    """The mask values a purify report recorded (masks rounded to 6 decimals)."""
    layers = report["layers"]
    return MaskValues(
        masks={layer["name"]: np.asarray(layer["masks"], dtype=np.float32) for layer in layers},
        pruned_values={layer["name"]: np.asarray(layer["pruned_values"], dtype=np.float64) for layer in layers},
    )
