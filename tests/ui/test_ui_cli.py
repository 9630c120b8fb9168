"""`movq-deploy ui`: serves the page; bad engine directories end with one line; the runtime never imports gradio."""
import os
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


def test_ui_beyond_loopback_needs_a_key(tiny_engines, capsys, monkeypatch):
    monkeypatch.delenv("MOVQ_API_KEY", raising=False)
    assert cli.main(["ui", "--engine-dir", str(tiny_engines.engine_dir), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--host 0.0.0.0 opens the service to the network: give --api-key" in err and "\n" not in err


def test_ui_serves_the_page_to_who_has_the_key(tiny_engines):
    pytest.importorskip("gradio", reason="the ui extra (gradio) is not installed: pip install -e .[ui]")
    import http.cookiejar
    import urllib.error
    import urllib.parse

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "movq_deploy.cli", "ui", "--engine-dir",
                               str(tiny_engines.engine_dir), "--backend", "onnxruntime-cpu", "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "MOVQ_API_KEY": "k3y"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline, refused = time.monotonic() + 90, None
        while refused is None and server.poll() is None and time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{url}/config", timeout=5)
                refused = False
            except urllib.error.HTTPError as error:
                refused = error.code == 401
            except OSError:
                time.sleep(0.5)
        said = server.stdout.read() if server.poll() is not None else "(still running)"
        assert refused, f"the page did not ask for the key on port {port}; the server said: {said}"
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        with pytest.raises(urllib.error.HTTPError):  # a wrong key
            opener.open(f"{url}/login", urllib.parse.urlencode({"username": "me", "password": "nope"}).encode())
        opener.open(f"{url}/login", urllib.parse.urlencode({"username": "me", "password": "k3y"}).encode())
        with opener.open(f"{url}/config", timeout=5) as response:
            page = response.read().decode()
        assert "Inpaint / outpaint" in page and "onnxruntime-cpu (fp32)" in page  # the tabs and the model
    finally:
        server.terminate()
        server.wait(timeout=30)
