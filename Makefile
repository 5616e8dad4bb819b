# Two set-up commands (see README):  make quickstart   and   make test
# Each creates .venv and installs what it needs from the package registries.
# The registry's torch build is used (its torchvision matches it); a machine-local
# CPU-only torch wheel found through pip's find-links would leave torchvision unloadable.
PY ?= python3
VENV := .venv
PIP_ENV := env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1
BIN := $(VENV)/bin

.PHONY: quickstart test install clean

# uv (from PyPI) installs the same versions as pip from the same registry, about 5x faster (a fresh venv: 28 s with
# an empty cache against pip's 130-140 s); pip stays the fallback if uv cannot be installed or fails
$(BIN)/roadcascade: pyproject.toml
	$(PY) -m venv $(VENV)
	$(PIP_ENV) $(BIN)/pip install -q --upgrade pip uv
	$(BIN)/uv pip install --python $(BIN)/python -q -e '.[dev]' || $(PIP_ENV) $(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/roadcascade

quickstart: install
	$(BIN)/roadcascade quickstart

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
