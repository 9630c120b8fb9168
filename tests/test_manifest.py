import json

import pytest

from movq_deploy import manifest as mf
from movq_deploy.manifest import EngineDir, Grid
from movq_deploy.sampling import SamplingDefaults


def _engine_dir(tmp_path, make_engine_dir):
    engine_dir = make_engine_dir(tmp_path / "engines")
    (engine_dir.path / "prior.onnx").write_bytes(b"not really onnx")
    entry = engine_dir.file_entry("prior.onnx", opset=18)
    engine_dir.graphs = {"fp32": {"prior": entry}}
    engine_dir.write()
    return engine_dir, entry


def test_write_then_load_round_trips_and_stamps_format(tmp_path, make_engine_dir):
    engine_dir, entry = _engine_dir(tmp_path, make_engine_dir)
    manifest = json.loads(engine_dir.manifest_path.read_text())
    assert manifest["format"] == mf.FORMAT and manifest["format_version"] == mf.FORMAT_VERSION
    loaded = EngineDir.load(engine_dir.path)
    assert loaded == engine_dir and loaded.graph("fp32", "prior") == entry
    assert len(entry["sha256"]) == 64
    assert not [p.name for p in engine_dir.path.iterdir() if p.name.endswith(".tmp")]


def test_typed_fields_and_sampling_defaults(tmp_path, make_engine_dir):
    engine_dir = make_engine_dir(tmp_path / "e", grid=Grid(4, 3, 2), codebook_size=32, num_classes=2,
                                 class_names=["cat", "dog"], sampling=SamplingDefaults(steps=12, temperature=0.9))
    engine_dir.write()
    loaded = EngineDir.load(engine_dir.path)
    assert loaded.grid.shape == (4, 3, 2) and loaded.grid.num_slots == 24 and loaded.mask_id == 32
    assert loaded.sampling == SamplingDefaults(steps=12, temperature=0.9, choice_temperature=4.5)
    assert loaded.class_names == ["cat", "dog"] and loaded.engine("fp16", "prior") is None


def test_graph_entries_fall_back_to_fp32_tokenizer_for_int8_and_name_what_is_missing(tmp_path, make_engine_dir):
    entries = {name: {"file": f"{name}.onnx", "sha256": "0" * 64} for name in ("encoder", "decoder", "prior")}
    int8 = {"file": "prior.int8.onnx", "sha256": "1" * 64}
    engine_dir = make_engine_dir(tmp_path / "e", graphs={"fp32": entries, "int8": {"prior": int8}})
    assert engine_dir.graph_entries("int8") == {**entries, "prior": int8}
    with pytest.raises(FileNotFoundError, match="no fp16 encoder graph .export with --fp16"):
        engine_dir.graph_entries("fp16")


def test_verify_accepts_the_untouched_file(tmp_path, make_engine_dir):
    engine_dir, entry = _engine_dir(tmp_path, make_engine_dir)
    assert engine_dir.verify(entry) == engine_dir.path / "prior.onnx"


def test_verify_names_an_altered_file(tmp_path, make_engine_dir):
    engine_dir, entry = _engine_dir(tmp_path, make_engine_dir)
    (engine_dir.path / "prior.onnx").write_bytes(b"tampered")
    with pytest.raises(ValueError, match=r"prior\.onnx.*sha256") as info:
        engine_dir.verify(entry)
    assert "\n" not in str(info.value)


def test_verify_names_a_missing_file(tmp_path, make_engine_dir):
    engine_dir, entry = _engine_dir(tmp_path, make_engine_dir)
    (engine_dir.path / "prior.onnx").unlink()
    with pytest.raises(FileNotFoundError, match=r"prior\.onnx.*missing"):
        engine_dir.verify(entry)


def test_load_missing_dir_and_missing_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        EngineDir.load(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="manifest.json is missing"):
        EngineDir.load(tmp_path)


def test_load_rejects_other_version_foreign_format_and_garbage(tmp_path, make_engine_dir):
    engine_dir, _ = _engine_dir(tmp_path, make_engine_dir)
    path = engine_dir.manifest_path
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "format_version": mf.FORMAT_VERSION + 1}))
    with pytest.raises(ValueError, match=f"format version {mf.FORMAT_VERSION + 1}"):
        EngineDir.load(engine_dir.path)
    path.write_text(json.dumps({**data, "format": "something-else"}))
    with pytest.raises(ValueError, match="not a movq-deploy-engines manifest"):
        EngineDir.load(engine_dir.path)
    path.write_text("{truncated")
    with pytest.raises(ValueError, match="not valid JSON"):
        EngineDir.load(engine_dir.path)


def test_a_version_1_engine_dir_asks_for_a_reexport_in_one_line(tmp_path, make_engine_dir):
    engine_dir, _ = _engine_dir(tmp_path, make_engine_dir)
    data = json.loads(engine_dir.manifest_path.read_text())
    engine_dir.manifest_path.write_text(json.dumps({**data, "format_version": 1}))
    with pytest.raises(ValueError) as info:
        EngineDir.load(engine_dir.path)
    message = str(info.value)
    assert "format version 1" in message and "re-export with export/to_onnx.py" in message and "\n" not in message


@pytest.mark.parametrize("key", ["grid.h", "codebook_size", "sampling.choice_temperature", "model", "mask_id"])
def test_a_missing_key_is_named_in_one_line(tmp_path, make_engine_dir, key):
    engine_dir, _ = _engine_dir(tmp_path, make_engine_dir)
    data = json.loads(engine_dir.manifest_path.read_text())
    *parents, last = key.split(".")
    node = data
    for part in parents:
        node = node[part]
    del node[last]
    engine_dir.manifest_path.write_text(json.dumps(data))
    with pytest.raises(ValueError) as info:
        EngineDir.load(engine_dir.path)
    assert f"key {key!r} is missing" in str(info.value) and "\n" not in str(info.value)


def test_a_mistyped_key_is_named(tmp_path, make_engine_dir):
    engine_dir, _ = _engine_dir(tmp_path, make_engine_dir)
    data = json.loads(engine_dir.manifest_path.read_text())
    data["grid"]["w"] = "8"
    engine_dir.manifest_path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="key 'grid.w' must be an int"):
        EngineDir.load(engine_dir.path)


def test_engines_are_set_and_written(tmp_path, make_engine_dir):
    engine_dir, _ = _engine_dir(tmp_path, make_engine_dir)
    engine_dir.set_engine("fp16", "prior", {"file": "prior.fp16.plan", "sha256": "2" * 64})
    engine_dir.write()
    assert EngineDir.load(engine_dir.path).engine("fp16", "prior")["file"] == "prior.fp16.plan"
