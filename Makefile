# make demo: set up .venv and run `lora-mcp demo`: the MCP server driven end to end on the tiny model (offline, CPU)
# make test: set up .venv and run the test suite
PYTHON ?= python3
VENV := .venv
# A CPU build of torch by default (it lies on disk here); override for CUDA, e.g. TORCH_SPEC="torch>=2.4".
TORCH_SPEC ?= torch==2.13.0
DEMO := $(CURDIR)/.demo

.PHONY: setup demo train-demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet "$(TORCH_SPEC)"
	$(VENV)/bin/pip install --quiet -e ".[test,lion,prodigy]"
	# torchao (quantize_base 8bit off CUDA) beside the environment, not in it: once installed, every diffusers
	# import logs warnings about its compiled kernels, built for another torch. The 8-bit test puts it on the
	# PYTHONPATH of a trainer process.
	$(VENV)/bin/pip install --quiet --upgrade --target $(VENV)/extras/torchao "torchao>=0.12,<1"
	touch $@

demo: setup
	rm -rf $(DEMO)/workspace
	$(VENV)/bin/lora-mcp demo --workspace $(DEMO)/workspace

# The trainer alone, from the command line, on the same kind of generated dataset.
train-demo: setup
	$(VENV)/bin/python examples/make_demo_dataset.py $(DEMO)/dataset
	cd $(CURDIR) && LORA_MCP_HOME=$(DEMO)/train-workspace $(VENV)/bin/lora-train examples/demo.yaml

# pytest exits 5 when it collected no tests: for this project that is a broken suite, said plainly.
test: setup
	$(VENV)/bin/python -m pytest || { rc=$$?; [ $$rc -ne 5 ] || echo "make test: pytest collected no tests" >&2; exit $$rc; }

clean:
	rm -rf $(VENV) $(DEMO)
