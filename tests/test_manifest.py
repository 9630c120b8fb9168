import json

import pytest

from movq_deploy import manifest as mf


def _engine_dir(tmp_path):
    engine_dir = tmp_path / "engines"
    engine_dir.mkdir()
    (engine_dir / "prior.onnx").write_bytes(b"not really onnx")
    entry = mf.file_entry(engine_dir, "prior.onnx", opset=17, precision="fp32")
    mf.write_manifest(engine_dir, {"graphs": {"fp32": {"prior": entry}}})
    return engine_dir, entry


def test_write_then_load_round_trips_and_stamps_format(tmp_path):
    engine_dir, entry = _engine_dir(tmp_path)
    manifest = mf.load_manifest(engine_dir)
    assert manifest["format"] == mf.FORMAT and manifest["format_version"] == mf.FORMAT_VERSION
    assert manifest["graphs"]["fp32"]["prior"] == entry
    assert len(entry["sha256"]) == 64
    assert not [p.name for p in engine_dir.iterdir() if p.name.endswith(".tmp")]


def test_verify_file_accepts_the_untouched_file(tmp_path):
    engine_dir, entry = _engine_dir(tmp_path)
    assert mf.verify_file(engine_dir, entry) == engine_dir / "prior.onnx"


def test_verify_file_names_an_altered_file(tmp_path):
    engine_dir, entry = _engine_dir(tmp_path)
    (engine_dir / "prior.onnx").write_bytes(b"tampered")
    with pytest.raises(ValueError, match=r"prior\.onnx.*sha256") as info:
        mf.verify_file(engine_dir, entry)
    assert "\n" not in str(info.value)


def test_verify_file_names_a_missing_file(tmp_path):
    engine_dir, entry = _engine_dir(tmp_path)
    (engine_dir / "prior.onnx").unlink()
    with pytest.raises(FileNotFoundError, match=r"prior\.onnx.*missing"):
        mf.verify_file(engine_dir, entry)


def test_load_manifest_missing_dir_and_missing_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        mf.load_manifest(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="manifest.json is missing"):
        mf.load_manifest(tmp_path)


def test_load_manifest_rejects_other_version_foreign_format_and_garbage(tmp_path):
    engine_dir, _ = _engine_dir(tmp_path)
    path = engine_dir / mf.MANIFEST_NAME
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "format_version": mf.FORMAT_VERSION + 1}))
    with pytest.raises(ValueError, match="format version 2"):
        mf.load_manifest(engine_dir)
    path.write_text(json.dumps({**data, "format": "something-else"}))
    with pytest.raises(ValueError, match="not a movq-deploy-engines manifest"):
        mf.load_manifest(engine_dir)
    path.write_text("{truncated")
    with pytest.raises(ValueError, match="not valid JSON"):
        mf.load_manifest(engine_dir)


def test_write_manifest_refuses_a_foreign_format(tmp_path):
    with pytest.raises(ValueError, match="refusing"):
        mf.write_manifest(tmp_path, {"format_version": 99})
    assert not (tmp_path / mf.MANIFEST_NAME).exists()
