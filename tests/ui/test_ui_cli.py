"""`movq-deploy ui`: serves the page; bad engine directories end with one line; the runtime never imports gradio."""
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from movq_deploy import cli


def test_the_runtime_and_the_cli_import_no_gradio():
    code = ("import sys, movq_deploy, movq_deploy.cli, movq_deploy.generator, movq_deploy.images, "
            "movq_deploy.ui, movq_deploy.ui.service, movq_deploy.ui.pictures; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('gradio', 'selenium', 'torch')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_ui_with_a_missing_engine_dir_ends_with_one_line(tmp_path, capsys):
    assert cli.main(["ui", "--engine-dir", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("movq-deploy ui: error: engine directory") and "\n" not in err


def test_ui_refuses_a_port_out_of_range(tiny_engines, capsys):
    assert cli.main(["ui", "--engine-dir", str(tiny_engines.engine_dir), "--port", "70000"]) == 2
    assert capsys.readouterr().err.strip() == "movq-deploy ui: error: --port must be in 1..65535, got 70000"


def test_ui_serves_the_page(tiny_engines):
    pytest.importorskip("gradio", reason="the ui extra (gradio) is not installed: pip install -e .[ui]")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "movq_deploy.cli", "ui", "--engine-dir",
                               str(tiny_engines.engine_dir), "--backend", "onnxruntime-cpu", "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, page = time.monotonic() + 90, None
        while page is None and server.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=5) as response:
                    page = response.read().decode()
            except OSError:
                time.sleep(0.5)
        said = server.stdout.read() if server.poll() is not None else "(still running)"
        assert page is not None, f"no page on port {port}; the server said: {said}"
        assert "Inpaint / outpaint" in page and "onnxruntime-cpu (fp32)" in page  # the tabs and the model
    finally:
        server.terminate()
        server.wait(timeout=30)
