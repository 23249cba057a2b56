# One place for the project's commands. `make demo` and `make test` work from a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch==2.13.0 is a CPU wheel on local disk; --find-links makes pip take it instead of a CUDA build.
WHEELS ?= /opt/wheels
PIP_FLAGS := $(if $(wildcard $(WHEELS)),--find-links $(WHEELS),)
DEMO_OUT ?= demo_out

.PHONY: setup sysdeps test lint demo clean help

help:
	@echo "make demo   - set up, then run the whole system on the embedded sample world (output: $(DEMO_OUT)/)"
	@echo "make test   - set up, then run the test suite"
	@echo "make lint   - ruff"

# System libraries: open3d needs libusb-1.0; the audit screenshot test needs chromium.
sysdeps:
	@if ! ldconfig -p | grep -q libusb-1.0.so.0 || ! command -v chromium >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libusb-1.0-0 chromium >/dev/null; \
	  else echo "need: libusb-1.0-0 chromium (apt-get install as root)"; fi; fi

$(VENV)/.installed: pyproject.toml requirements.lock
	@$(MAKE) --no-print-directory sysdeps
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(PIP_FLAGS) -r requirements.lock
	$(PIP) install -q $(PIP_FLAGS) --no-deps -e .
	touch $@

setup: $(VENV)/.installed

test: setup
	$(VENV)/bin/pytest -q tests

lint: setup
	$(VENV)/bin/ruff check .

demo: setup
	$(VENV)/bin/gr3d demo --out $(DEMO_OUT)

clean:
	rm -rf $(DEMO_OUT) .pytest_cache build *.egg-info
