"""The TensorBoard logger: metrics records become scalars, grids become images, rank 0 only, a clear error."""
import sys

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from movq_deploy.training.tensorboard import TensorBoardLog


def test_records_and_grids_are_written(tmp_path):
    log = TensorBoardLog(tmp_path / "tb", "tokenizer")
    log.record({"step": 10, "loss": 0.5, "psnr": 21.0, "note": "text is left out", "flag": True})
    log.record({"step": 20, "loss": 0.25, "psnr": 23.0})
    log.image("reconstructions", np.full((8, 16, 3), 200, dtype=np.uint8), 20)
    log.close()
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert sorted(tags["scalars"]) == ["tokenizer/loss", "tokenizer/psnr"]
    assert [(e.step, e.value) for e in events.Scalars("tokenizer/loss")] == [(10, 0.5), (20, 0.25)]
    image = events.Images("tokenizer/reconstructions")[0]
    assert image.step == 20 and (image.width, image.height) == (16, 8)


def test_disabled_writes_nothing(tmp_path):
    for log in (TensorBoardLog(None, "prior"), TensorBoardLog(tmp_path / "tb", "prior", enabled=False)):
        log.record({"step": 1, "loss": 1.0})
        log.image("samples", np.zeros((4, 4, 3), np.uint8), 1)
        log.close()
    assert not (tmp_path / "tb").exists()


def test_missing_package_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(ValueError, match=r'--tensorboard needs the tensorboard package: pip install'):
        TensorBoardLog(tmp_path / "tb", "tokenizer")
