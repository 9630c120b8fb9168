"""`movq-deploy serve` and `generate`: bad input ends with one line and exit status 2, before Ray starts."""
from __future__ import annotations

import pytest

from movq_deploy.cli import main


@pytest.mark.parametrize("argv, message", [
    (["serve", "--engine-dir", "/no/such/dir"], "does not exist"),
    (["serve", "--engine-dir", "/no/such/dir", "--batching", "fast"], None),  # argparse's own choices error
    (["generate", "--engine-dir", "/no/such/dir", "--num-images", "4", "--seed", "0", "--out", "x"],
     "does not exist"),
    (["generate", "--num-images", "0", "--seed", "0", "--out", "x"], "num_images must be a positive int"),
    (["serve", "--host", "0.0.0.0"], "--host 0.0.0.0 opens the service to the network: give --api-key"),
    (["serve", "--host", "0.0.0.0", "--api-key", ""], "the API key is empty"),
    (["serve", "--engine-dir", "/no/such/dir", "--max-queue-wait", "0"], "max_queue_wait_s must be > 0"),
])
def test_bad_input_ends_with_one_line(argv, message, capsys, monkeypatch):
    monkeypatch.delenv("MOVQ_API_KEY", raising=False)
    try:
        status = main(argv)
    except SystemExit as exit:  # argparse
        status = exit.code
    assert status == 2
    err = capsys.readouterr().err.strip()
    if message is not None:
        assert message in err and len(err.splitlines()) == 1, err


def test_generate_refuses_labels_of_an_unconditional_model(tiny_unconditional_engines, tmp_path, capsys):
    status = main(["generate", "--engine-dir", str(tiny_unconditional_engines.engine_dir), "--num-images", "2",
                   "--seed", "0", "--out", str(tmp_path), "--class-labels", "1"])
    assert status == 2 and "unconditional" in capsys.readouterr().err
