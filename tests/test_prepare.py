"""`make serve` / `make demo` always serve the checkpoint asked for: serving.prepare rebuilds what is stale,
and the running server says what it serves."""
from __future__ import annotations

import json
import urllib.request

import numpy as np
import pytest

from evfsam.specs import EVF_SAM
from serving.prepare import export_staleness, prepare, repository_staleness
from serving.repository import RepositoryOptions
from serving.server import TritonServer, served_model_line
from tests.images import encode, scene
from tests.test_serving import grpc_segment

pytestmark = pytest.mark.triton


@pytest.fixture(scope="module")
def second_checkpoint(tmp_path_factory):
    """The same tiny architecture with other random weights."""
    from export.tiny_checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("other_checkpoint"), seed=1)


def served_config(server, model):
    with urllib.request.urlopen(f"http://{server.http_url}/v2/models/{model}/config", timeout=10) as response:
        return json.load(response)


def serve_once(repository, image, prompt):
    with TritonServer.on_free_ports(repository) as server:
        mask, score = grpc_segment(server, image, prompt)
        params = {k: v["string_value"] for k, v in served_config(server, EVF_SAM.name)["parameters"].items()}
    return mask, score, params


def test_switching_checkpoints_serves_the_new_one(tiny_checkpoint, second_checkpoint, onnx_dir, tmp_path, capsys):
    opts = RepositoryOptions(ort_threads=1)
    onnx, repo = tmp_path / "onnx", tmp_path / "repo"
    image = encode(scene(180, 240, seed=5), "PNG")
    first = prepare(str(tiny_checkpoint), onnx, repo, opts)
    mask_a, score_a, params_a = serve_once(repo, image, b"zebra")

    graphs_before = {p.name: p.stat().st_mtime_ns for p in onnx.glob("*.onnx")}
    prepare(str(tiny_checkpoint), onnx, repo, opts)  # nothing changed: nothing rebuilt
    assert {p.name: p.stat().st_mtime_ns for p in onnx.glob("*.onnx")} == graphs_before
    assert "is up to date" in capsys.readouterr().out

    second = prepare(str(second_checkpoint), onnx, repo, opts)
    out = capsys.readouterr().out
    assert f"exporting {second_checkpoint}: exported from" in out and "generating" in out
    mask_b, score_b, params_b = serve_once(repo, image, b"zebra")

    assert first["checkpoint_sha256"] != second["checkpoint_sha256"]
    assert params_a["checkpoint_sha256"] == first["checkpoint_sha256"]
    assert params_b["checkpoint_sha256"] == second["checkpoint_sha256"]
    assert params_b["checkpoint"] == str(second_checkpoint)
    assert score_a != pytest.approx(score_b, abs=1e-4) or (mask_a != mask_b).any()
    assert str(second_checkpoint) in served_model_line(repo)


def test_staleness_reasons(tiny_checkpoint, onnx_dir, tmp_path):
    assert export_staleness(tiny_checkpoint, onnx_dir, None) is None
    assert "recipe 'ori'" in export_staleness(tiny_checkpoint, onnx_dir, "sam2-v1")
    assert "no export" in export_staleness(tiny_checkpoint, tmp_path, None)
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in tiny_checkpoint.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    assert "exported from" in export_staleness(copy, onnx_dir, None)
    repo = tmp_path / "repo"
    from serving.repository import write_repository

    write_repository(repo, onnx_dir, RepositoryOptions())
    assert repository_staleness(repo, onnx_dir, RepositoryOptions()) is None
    assert "front_instances" in repository_staleness(repo, onnx_dir, RepositoryOptions(front_instances=2))


def test_touched_but_identical_checkpoint_is_not_stale(tiny_checkpoint, tmp_path):
    import os
    import shutil

    checkpoint = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, checkpoint)
    onnx = tmp_path / "onnx"
    from export.__main__ import parse_args, run

    run(parse_args(["--checkpoint", str(checkpoint), "--output-dir", str(onnx), "--graphs", "prompt_mask_decoder"]))
    assert export_staleness(checkpoint, onnx, None) is None
    config = checkpoint / "config.json"
    os.utime(config, ns=(config.stat().st_atime_ns, config.stat().st_mtime_ns + 10**9))
    assert export_staleness(checkpoint, onnx, None) is None  # same content
    config.write_text(config.read_text().replace('"out_dim": 256', '"out_dim":  256'))
    assert "files changed" in export_staleness(checkpoint, onnx, None)
