# Everything runs in a local virtual environment that these targets create and fill on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO := runs/demo
# The digits model is the demo's model: its ckpt.pt and engines/ lie where the benchmarks look for them.
DIGITS := $(DEMO)
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
	$(PY) -m pip install -q -e ".[cpu,openvino,train,dev,serve,ui]"
	touch $@

demo: install
	@echo "== photographs: the tokenizer alone (its reconstructions of held-out crops) =="
	$(PY) train/tokenizer.py --config tiny --out $(DEMO)/photos --steps 900
	@echo "== handwritten digits: tokenizer, class-conditional prior, export, samples and inpainting =="
	$(PY) train/tokenizer.py --config digits --data sklearn:digits --out $(DIGITS) --steps 600
	$(PY) train/prior.py --ckpt $(DIGITS)/ckpt.pt --steps 600
	$(PY) export/to_onnx.py $(DIGITS)/ckpt.pt --out $(DIGITS)/engines --int8
	$(VENV)/bin/movq-deploy sample --engine-dir $(DIGITS)/engines -n 64 --seed 0 --out $(DEMO)/samples.png
	$(PY) scripts/demo_digits.py --engine-dir $(DIGITS)/engines --out $(DEMO)
	$(PY) scripts/demo_grids.py --ckpt $(DIGITS)/ckpt.pt --engine-dir $(DIGITS)/engines --out $(DEMO)
	$(PY) benchmarks/latency.py --quick --engine-dir $(DIGITS)/engines --ckpt $(DIGITS)/ckpt.pt --out $(DEMO)/latency
	@echo "demo done (README.md, 'What make demo shows'):"
	@echo "  photo tokenizer reconstructions    $(DEMO)/photos/reconstructions.png"
	@echo "  digits: one row per class 0..9     $(DEMO)/digits_samples.png"
	@echo "  the same, guidance scale 3         $(DEMO)/digits_samples_guided.png"
	@echo "  the judge's agreement, per class   $(DEMO)/digits_report.json"
	@echo "  digits: lower halves inpainted     $(DEMO)/digits_inpaint.png"
	@echo "  64 samples, no class (CLI)         $(DEMO)/samples.png"
	@echo "  64 samples, PyTorch reference      $(DEMO)/reference_samples.png"
	@echo "  inpaint / outpaint grid            $(DEMO)/edit.png"
	@echo "  checkpoint, ONNX graphs, manifest  $(DIGITS)/ckpt.pt, $(DIGITS)/engines/"
	@echo "  latency (JSON, plot)               $(DEMO)/latency/"

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
