# Set-up and entry points. `make demo` and `make test` each create .venv if missing.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_out

.PHONY: demo test venv clean bench gpu-rehearsal device-wheels

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# Its own step: topolosses' metadata pulls torchvision and with it another torch.
	$(BIN)/python -m pip install --quiet --no-deps topolosses==0.2.0
	$(BIN)/python -c "import custom_components.metrics.betti_matching as b; b.load_extension()"
	# Its own step too: nnU-Net's ResEnc (bundle/configs/resenc.json). dynamic-network-architectures' metadata pulls
	# timm, torchvision and torch 2.14 with CUDA; architectures/unet.py imports only torch and numpy.
	$(BIN)/python -m pip install --quiet --no-deps dynamic-network-architectures==0.4.4
	$(BIN)/python -c "import dynamic_network_architectures.architectures.unet"
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

# The GPU check the offline way, on this CPU machine: a fresh venv with torch and the scientific stack a GPU
# image ships (nothing of ours), our packages from wheels with --target, then the check's CPU path to the end.
# (No CPU torch exists for Python 3.12 on the registry: the rehearsal uses 3.11 and the wheels for 3.11;
# `make device-wheels` fetches the 3.12 ones the GPU machine takes.)
REHEARSAL_IMAGE := numpy scipy scikit-image tifffile tqdm psutil pandas absl-py packaging tensorboard
gpu-rehearsal:
	rm -rf .venv-rehearsal /tmp/vesuvius_site_rehearsal
	$(PY) -m venv .venv-rehearsal
	.venv-rehearsal/bin/python -m pip install --quiet torch==2.13.0 $(REHEARSAL_IMAGE)
	bash bench/device_wheels.sh --python 3.11 --dest .whl-rehearsal
	PY=.venv-rehearsal/bin/python WHEELS=.whl-rehearsal SITE=/tmp/vesuvius_site_rehearsal \
		bash bench/gpu_check.sh --device --out gpu_rehearsal_out

device-wheels:
	bash bench/device_wheels.sh --python 3.12 --dest .whl
