"""The engine cache: keys, stale detection, platform checks. Pure Python: runs everywhere, no TensorRT needed."""
import hashlib

import pytest

from movq_deploy import engine_cache as ec
from movq_deploy.contract import GRAPH_NAMES

H100 = ec.Platform("10.13.3.9", "NVIDIA H100 80GB HBM3", "9.0")
PROFILE = ec.BatchProfile(1, 16, 64)
ONNX_SHA = "a" * 64


@pytest.fixture
def built(make_engine_dir):
    def build(tmp_path, platform=H100, precision="fp16", profile=PROFILE, graphs=GRAPH_NAMES,
              onnx_sha=ONNX_SHA):
        """An engine directory whose engines were 'built' (plan files written) under the given key."""
        engine_dir = make_engine_dir(tmp_path)
        for graph in graphs:
            name = ec.plan_file_name(graph, precision)
            data = f"plan {graph} {precision}".encode()
            (tmp_path / name).write_bytes(data)
            key = ec.engine_key(onnx_sha, platform, precision, profile)
            engine_dir.set_engine(precision, graph, ec.engine_entry(name, hashlib.sha256(data).hexdigest(), key))
        return engine_dir

    return build


def test_batch_profile_validates_and_round_trips():
    assert ec.BatchProfile.from_dict(PROFILE.to_dict()) == PROFILE
    assert PROFILE.to_dict() == {"min": 1, "opt": 16, "max": 64}
    for bad in [(0, 1, 2), (2, 1, 4), (1, 8, 4)]:
        with pytest.raises(ValueError, match="min <= opt <= max"):
            ec.BatchProfile(*bad)


def test_entry_holds_everything_the_manifest_contract_names(tmp_path, built):
    entry = built(tmp_path).engines["fp16"]["prior"]
    assert entry["file"] == "prior.fp16.plan"
    assert set(entry) == {"file", "sha256", "onnx_sha256", "tensorrt_version", "gpu_name", "compute_capability",
                          "profile", "precision", "tf32", "opt_level", "workspace_bytes"}
    assert entry["profile"] == {"min": 1, "opt": 16, "max": 64} and entry["precision"] == "fp16"


def test_fresh_engine_is_not_stale(tmp_path, built):
    manifest = built(tmp_path)
    key = ec.engine_key(ONNX_SHA, H100, "fp16", PROFILE)
    assert all(ec.stale_reason(manifest, "fp16", g, key) is None for g in GRAPH_NAMES)


@pytest.mark.parametrize(
    "change, expected",
    [
        (dict(onnx_sha="b" * 64), "ONNX graph changed"),
        (dict(platform=ec.Platform("11.4.0.106", H100.gpu_name, "9.0")), "TensorRT 10.13.3.9, this is 11.4.0.106"),
        (dict(platform=ec.Platform(H100.tensorrt_version, "NVIDIA A100-SXM4-80GB", "8.0")), "built on NVIDIA H100"),
        (dict(platform=ec.Platform(H100.tensorrt_version, "NVIDIA H200", "9.0")), "this is NVIDIA H200"),
        (dict(profile=ec.BatchProfile(1, 16, 128)), "batch profile"),
    ],
)
def test_each_key_part_makes_the_engine_stale(tmp_path, change, expected, built):
    manifest = built(tmp_path)
    key = ec.engine_key(
        change.get("onnx_sha", ONNX_SHA), change.get("platform", H100), "fp16", change.get("profile", PROFILE)
    )
    reason = ec.stale_reason(manifest, "fp16", "prior", key)
    assert reason is not None and expected in reason


def test_tf32_setting_is_part_of_the_key(tmp_path, built):
    manifest = built(tmp_path)
    no_tf32 = ec.engine_key(ONNX_SHA, H100, "fp16", PROFILE, tf32=False)
    assert "TF32 on, asked for off" in ec.stale_reason(manifest, "fp16", "prior", no_tf32)


def test_other_precision_and_missing_engine_are_stale(tmp_path, built):
    manifest = built(tmp_path, precision="fp16")
    fp32_key = ec.engine_key(ONNX_SHA, H100, "fp32", PROFILE)
    assert ec.stale_reason(manifest, "fp32", "prior", fp32_key) == "no engine built yet"
    # An entry whose recorded precision disagrees with its slot (hand-edited manifest) is rebuilt too.
    manifest.engines["fp32"] = {"prior": dict(manifest.engines["fp16"]["prior"])}
    assert "built as fp16" in ec.stale_reason(manifest, "fp32", "prior", fp32_key)


def test_missing_or_altered_plan_is_stale(tmp_path, built):
    manifest = built(tmp_path)
    key = ec.engine_key(ONNX_SHA, H100, "fp16", PROFILE)
    (tmp_path / "decoder.fp16.plan").write_bytes(b"tampered")
    (tmp_path / "encoder.fp16.plan").unlink()
    assert "does not match its sha256" in ec.stale_reason(manifest, "fp16", "decoder", key)
    assert "missing" in ec.stale_reason(manifest, "fp16", "encoder", key)
    assert ec.stale_reason(manifest, "fp16", "prior", key) is None


def test_runtime_platform_check_names_the_mismatch(tmp_path, built):
    entry = built(tmp_path).engines["fp16"]["prior"]
    ec.check_engine_platform(entry, H100)  # same platform: no error
    with pytest.raises(ValueError, match=r"TensorRT 10\.13\.3\.9 but this is TensorRT 11\.4\.0\.106.*build_trt"):
        ec.check_engine_platform(entry, ec.Platform("11.4.0.106", H100.gpu_name, "9.0"))
    with pytest.raises(ValueError, match=r"built on NVIDIA H100 80GB HBM3 \(sm 9\.0\) but this GPU is NVIDIA L4 \(sm 8\.9\)"):
        ec.check_engine_platform(entry, ec.Platform(H100.tensorrt_version, "NVIDIA L4", "8.9"))


def test_usable_precisions_prefer_fp16_and_need_all_three_graphs(tmp_path, built):
    manifest = built(tmp_path, precision="fp32")
    manifest.engines.update(built(tmp_path, precision="fp16").engines)
    assert ec.usable_precisions(manifest, H100) == ["fp16", "fp32"]
    del manifest.engines["fp16"]["decoder"]
    assert ec.usable_precisions(manifest, H100) == ["fp32"]
    ok, reason = ec.engines_status(manifest, H100)
    assert ok and "fp32" in reason and "H100" in reason


def test_engines_status_explains_why_not(tmp_path, built, make_engine_dir):
    empty = make_engine_dir(tmp_path / "empty")
    assert ec.engines_status(empty, H100) == (False, ec.engines_status(empty, H100)[1])
    assert "no TensorRT engines" in ec.engines_status(empty, H100)[1]
    manifest = built(tmp_path)
    ok, reason = ec.engines_status(manifest, ec.Platform("11.4.0.106", H100.gpu_name, "9.0"))
    assert not ok and "fp16" in reason and "TensorRT 10.13.3.9" in reason
    partial = built(tmp_path, graphs=("prior",))
    ok, reason = ec.engines_status(partial, H100)
    assert not ok and "no encoder/decoder engine" in reason


def test_a_directory_with_the_guided_prior_needs_its_engine_too(tmp_path, built):
    manifest = built(tmp_path)  # engines for encoder, decoder and prior
    assert ec.usable_precisions(manifest, H100) == ["fp16"]
    manifest.graphs = {"fp32": {"prior_guided": {"file": "prior_guided.onnx", "sha256": ONNX_SHA}}}
    assert manifest.graph_names == ("encoder", "decoder", "prior", "prior_guided")
    ok, reason = ec.engines_status(manifest, H100)
    assert not ok and "no prior_guided engine" in reason
    name = ec.plan_file_name("prior_guided", "fp16")
    (tmp_path / name).write_bytes(b"plan")
    key = ec.engine_key(ONNX_SHA, H100, "fp16", PROFILE)
    manifest.set_engine("fp16", "prior_guided", ec.engine_entry(name, hashlib.sha256(b"plan").hexdigest(), key))
    assert ec.usable_precisions(manifest, H100) == ["fp16"]


@pytest.mark.parametrize("setting, value, words", [
    ("opt_level", 5, "builder optimization level 3, asked for 5"),
    ("workspace_bytes", 1 << 30, f"workspace of {ec.DEFAULT_WORKSPACE_BYTES}, asked for {1 << 30}"),
])
def test_builder_settings_are_part_of_the_key(tmp_path, built, setting, value, words):
    manifest = built(tmp_path)
    key = ec.engine_key(ONNX_SHA, H100, "fp16", PROFILE, **{setting: value})
    assert ec.stale_reason(manifest, "fp16", "prior", key) == f"built with {words}"


def test_an_altered_plan_is_refused_with_the_rebuild_command(tmp_path, built):
    manifest = built(tmp_path)
    entry = manifest.engines["fp16"]["decoder"]
    assert ec.verify_plan(tmp_path, entry) == tmp_path / "decoder.fp16.plan"
    (tmp_path / "decoder.fp16.plan").write_bytes(b"tampered")
    with pytest.raises(ValueError, match=r"decoder.fp16.plan does not match its sha256 in manifest.json .*: "
                                         r"rebuild it with `python export/build_trt.py`$"):
        ec.verify_plan(tmp_path, entry)
    (tmp_path / "decoder.fp16.plan").unlink()
    with pytest.raises(FileNotFoundError, match="missing: rebuild it with"):
        ec.verify_plan(tmp_path, entry)


def test_an_engine_of_another_onnx_graph_is_refused(tmp_path, built):
    entry = built(tmp_path).engines["fp16"]["prior"]
    ec.check_engine_source(entry, {"file": "prior.fp16.onnx", "sha256": ONNX_SHA})  # the graph it was built from
    with pytest.raises(ValueError, match=r"prior.fp16.plan was built from another ONNX graph than prior.fp16.onnx "
                                         r"\(sha256 differs\): rebuild it"):
        ec.check_engine_source(entry, {"file": "prior.fp16.onnx", "sha256": "c" * 64})
    with pytest.raises(ValueError, match="than no graph"):
        ec.check_engine_source(entry, None)
