# Set-up and entry points. `make demo` and `make test` each create .venv if missing.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_out

.PHONY: demo test venv clean bench

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# Its own step: topolosses' metadata pulls torchvision and with it another torch.
	$(BIN)/python -m pip install --quiet --no-deps topolosses==0.2.0
	$(BIN)/python -c "import custom_components.metrics.betti_matching as b; b.load_extension()"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH bash scripts/demo.sh $(DEMO_DIR)

test: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH bash scripts/test.sh

bench: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH bash bench/run_all.sh

clean:
	rm -rf $(VENV) $(DEMO_DIR)
