# The two set-up commands of the README: `make demo` and `make test`.
# Both create .venv on a fresh machine with pinned versions (CPU torch 2.13.0).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO := demo
export NIPYPE_NO_ET := 1
export HF_HUB_OFFLINE := 1
export MPLBACKEND := Agg

.PHONY: demo test lock

# The demo's own TemplateFlow home, holding the bundled template only (written by
# bids_harmony-demo): no download, and no indexing of TemplateFlow's skeleton in every run.
demo: export TEMPLATEFLOW_HOME := $(CURDIR)/$(DEMO)/templateflow

$(BIN)/bids_harmony: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

## Generate the built-in multi-site demo, then participant -> group -> participant.
demo: $(BIN)/bids_harmony
	$(BIN)/bids_harmony-demo $(DEMO)/bids --subjects 3 --templateflow-home $(DEMO)/templateflow
	$(BIN)/bids_harmony $(DEMO)/bids $(DEMO)/out participant --resolution 2 --nprocs 2 -v
	$(BIN)/bids_harmony $(DEMO)/bids $(DEMO)/out group --resolution 2 --nprocs 2 -v
	$(BIN)/bids_harmony $(DEMO)/bids $(DEMO)/out participant --resolution 2 --nprocs 2 \
		--output-spaces template T1w -v
	@echo "Harmonized derivatives and group QC are in $(DEMO)/out"

## The whole test suite, slow end-to-end tests included.
test: $(BIN)/bids_harmony
	$(BIN)/python -m pytest -q

lock: $(BIN)/bids_harmony
	$(BIN)/pip freeze --exclude-editable | grep -v '^torch==' > requirements.lock.new
	mv requirements.lock.new requirements.lock
