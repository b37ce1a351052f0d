# groundlab: every target sets the environment up first (make setup), so a fresh clone just works.
# Package targets take the package name or its alias: omg, claw, vp, ivm, tldr.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.groundlab-setup
# every folder of packages/ with a pyproject.toml is a package: a new one needs no list edited
PKGS := $(patsubst packages/%/pyproject.toml,%,$(wildcard packages/*/pyproject.toml))
ALIASES := omg claw vp
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.torch_extensions
export PY

.PHONY: help setup test test-fast lint check-imports bench bases clean

help:
	@echo "make setup            create .venv and install shared + all packages editable (with test extras)"
	@echo "make test             the whole test suite (everything but GPU tests)"
	@echo "make test-fast        the test suite without the slow tests"
	@echo "make test-<pkg>       one package's tests (pkg: shared, omg, claw, vp, ivm, tldr)"
	@echo "make train-<pkg>      the package's default run on the synthetic world"
	@echo "make eval-<pkg>       evaluate the package's default run"
	@echo "make bases            train the tiny pretrained bases"
	@echo "make ablate-tldr      TLDR's Table 2 ablation and the naive RM over three seeds (its own budget)"
	@echo "make ablate-ivm       IVM's DWSL comparison over three seeds (its own budget, after make train-ivm)"
	@echo "make ablate-omg       OMG-LLaVA's Table 5 ablation over three seeds (after make train-omg)"
	@echo "make bench            benchmarks (JSON + table under runs/bench/)"
	@echo "make lint             ruff"

setup: $(STAMP)

$(STAMP): shared/pyproject.toml $(wildcard packages/*/pyproject.toml)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(foreach p,$(PKGS),-e "packages/$(p)[test]")
	# shared last, so that it is editable too (the packages pulled it in as a plain install)
	$(PY) -m pip install -q -e "shared[test,lint]"
	touch $(STAMP)

test: setup
	$(PY) -m pytest shared/tests $(wildcard packages/*/tests) -m "not gpu"
	@for p in $(PKGS); do [ -d packages/$$p/tests ] || echo "note: groundlab-$$p has no tests yet (scaffold only)"; done

test-fast: setup
	$(PY) -m pytest shared/tests $(wildcard packages/*/tests) -m "not gpu and not slow"

test-shared: setup
	@tools/pkg.sh test shared

define PKG_TARGETS
.PHONY: test-$(1) train-$(1) eval-$(1)
test-$(1): setup
	@tools/pkg.sh test $(1)
train-$(1): setup
	@tools/pkg.sh train $(1)
eval-$(1): setup
	@tools/pkg.sh eval $(1)
endef
$(foreach p,$(PKGS) $(ALIASES),$(eval $(call PKG_TARGETS,$(p))))

lint: setup
	$(PY) -m ruff check .

check-imports: setup
	$(PY) tools/import_check.py

bench: setup
	$(PY) benchmarks/run.py

bases: setup
	$(PY) -m groundlab.shared.bases build $(if $(FORCE),--force,)

.PHONY: ablate-omg
ablate-omg: setup  # its own stage-2 schedule (800 steps), scored on RES and GCG as the paper's table (README)
	$(PY) -m groundlab.omg_llava.cli ablate --config packages/omg_llava/configs/tiny.yaml --stage2.max_steps 800

.PHONY: ablate-ivm
ablate-ivm: setup
	$(PY) -m groundlab.ivm.cli ablate --config packages/ivm/configs/tiny.yaml

.PHONY: ablate-tldr
ablate-tldr: setup
	$(PY) -m groundlab.tldr.cli ablate --config packages/tldr/configs/tiny.yaml

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .torch_extensions

.PHONY: world
world: setup
	$(PY) -m groundlab.shared.world_io --out runs/world/default
