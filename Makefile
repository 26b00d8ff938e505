# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1

.PHONY: demo test test-fast install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,flower,clinical]'
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/fedefm demo --out demo_out

# The suite runs in TEST_WORKERS processes (pytest-xdist), each test file whole in one, in collection order (files
# with slow tests first, tests/conftest.py): the end-to-end Flower tests mostly wait on their federations'
# processes, so a second process nearly halves the suite's time on two cores.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) demo_out .pytest_cache
