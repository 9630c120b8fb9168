# Everything runs in a local virtual environment that these targets create and fill on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO := runs/demo
# torch is pinned first: this CPU build lies on the machines' disk; an unpinned torch pulls a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0

.PHONY: install demo test clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e ".[cpu,train,dev,serve]"
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

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs
