"""Hiera blocks whose windows need padding (SAM-2 Hiera-B+: window sizes 14 and 7 on 64x64 and 32x32
maps) export to ONNX and run on ONNX Runtime at a batch other than the traced one."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from evfsam.modeling.sam2.hiera import MultiScaleBlock


@pytest.mark.parametrize("q_stride", [None, (2, 2)], ids=["windowed", "pooled"])
def test_padded_window_block_exports_with_a_dynamic_batch(tmp_path, q_stride):
    torch.manual_seed(0)
    block = MultiScaleBlock(16, 32 if q_stride else 16, num_heads=2, window_size=14, q_stride=q_stride).eval()
    path = tmp_path / "block.onnx"
    with torch.no_grad():
        torch.onnx.export(block, (torch.randn(1, 64, 64, 16),), str(path), input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=17, dynamo=False)
    x = torch.randn(3, 64, 64, 16)
    with torch.no_grad():
        expected = block(x).numpy()
    (actual,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})
    assert actual.shape == expected.shape == (3, 32 if q_stride else 64, 32 if q_stride else 64, expected.shape[-1])
    np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=1e-4)
