# Set-up and everyday commands. `make demo` and `make test` do all the set-up on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch first, pinned: these releases lie on the build machines' disk (a plain resolver would fetch GBs).
TORCH := torch==2.14.1 torchvision==0.29.1
EXTRAS_RUN := elpv
EXTRAS_DEV := elpv,dev,sd,ray,dicom,tracking,pretrain

.PHONY: setup setup-dev demo test lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.torch-stamp: | $(BIN)/python
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH)
	touch $@

$(VENV)/.setup-stamp: pyproject.toml $(VENV)/.torch-stamp
	$(BIN)/pip install -q --disable-pip-version-check -e ".[$(EXTRAS_RUN)]"
	touch $@

$(VENV)/.dev-stamp: pyproject.toml $(VENV)/.torch-stamp
	$(BIN)/pip install -q --disable-pip-version-check -e ".[$(EXTRAS_DEV)]"
	touch $(VENV)/.setup-stamp $@

setup: $(VENV)/.setup-stamp

setup-dev: $(VENV)/.dev-stamp

demo: setup
	$(BIN)/vsi demo

test: setup-dev
	$(BIN)/ruff check .
	@# pytest exits 5 when it collects no tests: nothing would guard main, so that is a failure too.
	$(BIN)/python -m pytest tests; rc=$$?; if [ $$rc -eq 5 ]; then echo 'make test: pytest collected no tests' >&2; exit 1; fi; exit $$rc

lint: setup-dev
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
