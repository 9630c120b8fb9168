"""The engine directory on disk: the atomic swap, TensorRT engines carried over."""
from __future__ import annotations

from movq_deploy.engine_cache import TIMING_CACHE_NAME
from movq_deploy.export.directory import _replace_dir, carry_over_engines


def test_replacing_an_engine_dir_swaps_it_whole(tmp_path):
    out, new = tmp_path / "engines", tmp_path / "new"
    out.mkdir()
    (out / "prior.fp16.plan").write_bytes(b"stale")
    new.mkdir()
    (new / "manifest.json").write_text("{}")
    _replace_dir(new, out)
    assert [p.name for p in out.iterdir()] == ["manifest.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["engines"]


def test_reexport_keeps_only_tensorrt_engines_of_unchanged_graphs(tmp_path, make_engine_dir):
    old, work = tmp_path / "engines", tmp_path / "work"
    old.mkdir()
    work.mkdir()
    for name in ("prior.fp16.plan", "decoder.fp16.plan", TIMING_CACHE_NAME):
        (old / name).write_bytes(name.encode())
    engines = {"fp16": {"prior": {"file": "prior.fp16.plan", "onnx_sha256": "same"},
                        "decoder": {"file": "decoder.fp16.plan", "onnx_sha256": "old"}}}
    make_engine_dir(old, engines=engines).write()
    graphs = {"fp16": {"prior": {"sha256": "same"}, "decoder": {"sha256": "new"}}}
    kept = carry_over_engines(old, work, graphs)
    assert kept == {"fp16": {"prior": engines["fp16"]["prior"]}}
    assert sorted(p.name for p in work.iterdir()) == ["prior.fp16.plan", TIMING_CACHE_NAME]
    assert carry_over_engines(tmp_path / "nothing", work, graphs) == {}
