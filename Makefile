# LoRA Lab: every target sets up what it needs first (scripts/bootstrap.sh is idempotent and
# cheap on re-runs). Honours COMFYUI_PATH (a ComfyUI checkout to test against instead of the
# bundled one) and PYTHON (the interpreter that creates .venv).
PY := .venv/bin/python
PYTEST_ARGS ?= -q

.PHONY: all bootstrap lint test demo serve bench

all: test

bootstrap:
	bash scripts/bootstrap.sh

lint: bootstrap
	.venv/bin/ruff check .

test: lint
	$(PY) -m pytest tests $(PYTEST_ARGS)

demo: bootstrap
	$(PY) scripts/demo.py

serve: bootstrap
	$(PY) scripts/demo.py --serve

bench: bootstrap
	$(PY) -m bench
