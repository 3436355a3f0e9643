"""`export.patch_probe` (the demo BEiT-3's per-patch read-out diagnostic) and the scene generator's
`rotation` option it uses."""
from __future__ import annotations

import json

import numpy as np
import pytest

from export.demo_scenes import random_scene


def test_default_rotation_draws_the_same_scenes_as_before():
    """`rotation=1.0` is the training distribution: same pixels as a call without it."""
    for seed in range(3):
        a = random_scene(np.random.default_rng(seed))
        b = random_scene(np.random.default_rng(seed), rotation=1.0)
        np.testing.assert_array_equal(a.rgb, b.rgb)


def test_rotation_zero_draws_shapes_upright():
    """Upright: a triangle's apex and a star's top point sit one circumradius above the centre; a square
    is axis-aligned (its mask fills its bounding box); the objects are where the same seed puts them."""
    seen = set()
    for seed in range(40):
        upright = random_scene(np.random.default_rng(seed), rotation=0.0)
        rotated = random_scene(np.random.default_rng(seed))
        assert [(o.shape, o.cx, o.cy) for o in upright.objects] == [(o.shape, o.cx, o.cy) for o in rotated.objects]
        for obj in upright.objects:
            rows, cols = np.nonzero(obj.mask)
            if obj.shape in ("triangle", "star"):
                assert abs(rows.min() - (obj.cy - obj.radius)) <= 1.5, obj.shape
            elif obj.shape == "square":
                box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
                assert obj.mask.sum() / box > 0.97
            seen.add(obj.shape)
    assert seen == {"circle", "square", "triangle", "star"}


def test_probe_reports_accuracies_per_attribute(tmp_path):
    from export.patch_probe import main

    out = tmp_path / "probe.json"
    assert main(["--steps", "3", "--batch", "4", "--pool", "6", "--validation", "4", "--report-every", "3",
                 "--threads", "1", "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    (row,) = report["history"]
    assert row["step"] == 3 and np.isfinite(row["loss"])
    for part in ("train", "held_out"):
        assert set(row[part]) == {"colour", "shape", "texture"}
        assert all(0.0 <= v <= 1.0 for v in row[part].values())
    assert all(0.0 < v <= 1.0 for v in report["majority_share_held_out"].values())


def test_probe_rejects_a_rotation_outside_0_to_1(capsys):
    from export.patch_probe import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--rotation", "2"])
    assert exit_info.value.code == 2
    assert "from 0 (upright) to 1 (any angle)" in capsys.readouterr().err
