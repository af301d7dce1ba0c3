# Two entry points for a newcomer: `make demo` and `make test`.
# Both create .venv on first use with the CPU build of torch, then the package.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/asap-bench demo build
	$(VENV)/bin/asap-bench run --encoder random --task all --seeds 5

test: install
	$(PY) -m pip install --quiet --no-deps --force-reinstall .
	$(VENV)/bin/pytest -q --durations=10

clean:
	rm -rf $(VENV) build dist
