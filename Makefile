# Everything runs in a local virtual environment that these targets create and fill on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO := runs/demo
# torch is pinned first: this CPU build lies on the machines' disk; an unpinned torch pulls a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0

# The browser tests of the web page drive Debian's Chromium. Best effort: installed where apt-get runs as root (as in
# CI; about a minute, once), else those tests skip with the reason. `make test-ui` insists on running them.
BROWSER_PACKAGES := chromium chromium-driver

.PHONY: install browser demo test test-ui clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e ".[cpu,train,dev,serve,ui]"
	touch $@

demo: install
	$(PY) train/tokenizer.py --config tiny --out $(DEMO)
	$(PY) train/prior.py --ckpt $(DEMO)/ckpt.pt
	$(PY) export/to_onnx.py $(DEMO)/ckpt.pt --out $(DEMO)/engines --int8
	$(VENV)/bin/movq-deploy sample --engine-dir $(DEMO)/engines -n 64 --seed 0 --out $(DEMO)/samples.png
	$(PY) scripts/demo_grids.py --ckpt $(DEMO)/ckpt.pt --engine-dir $(DEMO)/engines --out $(DEMO)
	$(PY) benchmarks/latency.py --quick --engine-dir $(DEMO)/engines --ckpt $(DEMO)/ckpt.pt --out $(DEMO)/latency
	@echo "demo done:"
	@echo "  checkpoint (both stages)     $(DEMO)/ckpt.pt   (metrics: $(DEMO)/metrics_*.jsonl)"
	@echo "  tokenizer reconstructions    $(DEMO)/reconstructions.png"
	@echo "  ONNX graphs + manifest       $(DEMO)/engines/"
	@echo "  64 samples, ONNX Runtime     $(DEMO)/samples.png"
	@echo "  64 samples, PyTorch          $(DEMO)/reference_samples.png"
	@echo "  inpaint / outpaint grid      $(DEMO)/edit.png"
	@echo "  latency (JSON, plot)         $(DEMO)/latency/"

browser:
	@if command -v chromedriver >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  echo "installing $(BROWSER_PACKAGES) for the browser tests (apt-get, about a minute)"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  { apt-get install -y -q $(BROWSER_PACKAGES) || { apt-get update -q && apt-get install -y -q $(BROWSER_PACKAGES); }; } \
	    >/dev/null 2>&1 || echo "could not install Chromium: the browser tests will be skipped"; \
	else echo "no Chromium and no apt-get as root: the browser tests will be skipped (see make test-ui)"; fi

test: install browser
	$(PY) -m pytest -q

test-ui: install browser
	MOVQ_UI_BROWSER_TESTS=required $(PY) -m pytest -q tests/ui

clean:
	rm -rf $(VENV) runs
