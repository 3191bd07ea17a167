# make demo: set up .venv and run `lora-mcp demo`: the MCP server driven end to end on the tiny model (offline, CPU)
# make test: set up .venv and run the test suite
PYTHON ?= python3
VENV := .venv
# A CPU build of torch by default (it lies on disk here); override for CUDA, e.g. TORCH_SPEC="torch>=2.4".
TORCH_SPEC ?= torch==2.13.0
DEMO := $(CURDIR)/.demo

.PHONY: setup node-tools browser demo train-demo test clean

setup: $(VENV)/.installed node-tools browser

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet "$(TORCH_SPEC)"
	$(VENV)/bin/pip install --quiet -e ".[test,lion,prodigy,wd14,tensorboard,wandb]"
	# torchao (quantize_base 8bit off CUDA) beside the environment, not in it: once installed, every diffusers
	# import logs warnings about its compiled kernels, built for another torch. The 8-bit test puts it on the
	# PYTHONPATH of a trainer process.
	$(VENV)/bin/pip install --quiet --upgrade --target $(VENV)/extras/torchao "torchao>=0.12,<1"
	touch $@

# The MCP Inspector's CLI and the mcp-remote bridge, for tests/test_http_clients.py, in $(NODE_DIR) beside the
# environment. Inspector 2.12.0 runs on Node 20 although its package asks for 22 (npm's EBADENGINE warnings,
# silenced by --loglevel=error); Node 18 lacks the CustomEvent global it uses. No npm, an older Node or no
# network does not fail the set-up: those tests skip and say why. Install scripts are not needed (the
# Inspector's own one is a no-op outside its source tree), so none run. Re-run while the pins differ.
NODE_TOOLS := @modelcontextprotocol/inspector@2.12.0 mcp-remote@0.15.1
NODE_DIR := $(VENV)/node
node-tools:
	@skipped="the MCP Inspector and mcp-remote tests will be skipped"; \
	if [ "$$(cat $(NODE_DIR)/.installed 2>/dev/null)" = "$(NODE_TOOLS)" ]; then :; \
	elif ! command -v npm >/dev/null || ! command -v node >/dev/null; then \
	  echo "make setup: no npm/node here: $$skipped"; \
	elif [ "$$(node -p 'process.versions.node.split(".")[0]')" -lt 20 ]; then \
	  echo "make setup: node $$(node --version) is older than 20: $$skipped"; \
	elif npm install --prefix $(NODE_DIR) --save-exact --no-audit --no-fund --ignore-scripts --fetch-retries=1 \
	    --loglevel=error $(NODE_TOOLS); then \
	  echo "$(NODE_TOOLS)" > $(NODE_DIR)/.installed && echo "make setup: $(NODE_TOOLS) in $(NODE_DIR)"; \
	else echo "make setup: npm could not install $(NODE_TOOLS) (offline?): $$skipped"; fi

# Debian's chromium and chromium-driver: the headless browser of tests/test_dashboard_browser.py and
# tests/test_app_browser.py (Selenium drives it through chromedriver). Installed with apt when missing, where apt
# is there and we are root (CI is); otherwise those tests skip and say why.
BROWSER_PACKAGES := chromium chromium-driver
browser:
	@skipped="the browser tests will be skipped"; \
	if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif ! command -v apt-get >/dev/null; then \
	  echo "make setup: no apt-get here to install $(BROWSER_PACKAGES): $$skipped"; \
	elif [ "$$(id -u)" -ne 0 ]; then \
	  echo "make setup: not root: 'sudo apt-get install $(BROWSER_PACKAGES)' installs them, else $$skipped"; \
	elif apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(BROWSER_PACKAGES) >/dev/null; then \
	  echo "make setup: $(BROWSER_PACKAGES) installed"; \
	else echo "make setup: apt-get could not install $(BROWSER_PACKAGES) (offline?): $$skipped"; fi

demo: setup
	rm -rf $(DEMO)/workspace
	$(VENV)/bin/lora-mcp demo --workspace $(DEMO)/workspace

# The trainer alone, from the command line, on the same kind of generated dataset.
train-demo: setup
	$(VENV)/bin/python examples/make_demo_dataset.py $(DEMO)/dataset
	cd $(CURDIR) && LORA_MCP_HOME=$(DEMO)/train-workspace $(VENV)/bin/lora-train examples/demo.yaml

# pytest exits 5 when it collected no tests: for this project that is a broken suite, said plainly. The 30
# slowest tests are listed at the end: the suite must stay well inside CI's 30 minutes.
test: setup
	$(VENV)/bin/python -m pytest --durations=30 || { rc=$$?; [ $$rc -ne 5 ] || echo "make test: pytest collected no tests" >&2; exit $$rc; }

clean:
	rm -rf $(VENV) $(DEMO)
