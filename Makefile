# The two commands of the README: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test test-quick lint docs clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

demo: install
	$(BIN)/bonedist demo --out runs/demo

test: install
	$(BIN)/python -m pytest -q

# every module in under 5 minutes on 2 cores: no long trainings, no Slurm (the full suite is `make test`)
test-quick: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check bonedist tests

# the user guide (docs/, mkdocs.yml) in strict mode: a broken link or a page left out of the nav fails
docs: install
	$(BIN)/mkdocs build --strict --quiet

clean:
	rm -rf $(VENV) runs/demo shards/phantoms site
