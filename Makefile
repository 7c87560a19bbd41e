# The recipe's entry points. Every target depends on the pinned virtual environment,
# so `make repro` and `make test` work on a fresh clone with nothing else typed.

PYTHON_BASE ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
DVC := $(VENV)/bin/dvc
STAMP := $(VENV)/.installed
# dvc.yaml runs `python -m pipeline.stages ...`: the venv's python, wherever dvc is called from.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export PYTHONPATH := $(CURDIR)
export MLFLOW_DISABLE_TELEMETRY := true
# The embedded Ray listens on 127.0.0.1 only (pipeline/runner/cluster.py); on a cluster,
# set RAY_AUTH_MODE=token and the cluster's token (docs/cluster.md).
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED := 0
export HF_DATASETS_OFFLINE := 1
export HF_HUB_OFFLINE := 1
UI_PORT ?= 5000
# Machines that keep a local wheel of torch (the CPU build) there: let pip see it.
ifneq ($(wildcard /opt/wheels),)
export PIP_FIND_LINKS ?= /opt/wheels
endif

# The recipe's stages, as the registry wrote them into dvc.yaml (pipeline/stages/registry.py).
STAGES := mix pretrain midtrain sft qat export profile evalsets eval_pretrain eval_midtrain eval_sft eval_qat report
ARGS ?=
.PHONY: setup system-packages lock params repro test test-fast lint drill sweep seeds scaling-fit closed-loop plan mutants qat-study bench-model bench-train bench-config bench-repro bench-export bench-profile bench-peers \
	profile-paper ui $(STAGES)

setup: $(STAMP) system-packages

# Debian packages the recipe's optional sources read (the default's wordnet-base): installed
# when run as root, else it says how; never fails (pipeline/runner/system_packages.py).
system-packages: params
	$(PY) -m pipeline.runner.system_packages --install --params params.yaml

# One pip command with every version pinned (torch included, so pip takes the CPU
# wheel instead of a multi-GB CUDA build), then the project itself in editable mode.
$(STAMP): requirements.lock pyproject.toml
	$(PYTHON_BASE) -m venv $(VENV)
	$(VENV)/bin/pip install --disable-pip-version-check -r requirements.lock
	$(VENV)/bin/pip install --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(PY) -m pipeline.export.native  # the export's C++ MoE kernel, against the installed ExecuTorch
	$(PY) -m pipeline.model.kernels  # the MoE layer's CPU training kernel, against the installed torch
	touch $(STAMP)

# Regenerate the full pin set from the direct pins in requirements.txt.
lock: $(STAMP)
	$(VENV)/bin/pip install --disable-pip-version-check -r requirements.txt
	$(VENV)/bin/pip freeze --all --exclude-editable | grep -v '^pip==' \
	  | sed -e 's/^torch==\(.*\)+cpu$$/torch==\1/' > requirements.lock

# params.yaml is conf/ composed with its defaults: what `dvc repro` runs.
# A params.yaml edited by hand (or by `dvc exp run -S`) is not overwritten: the command
# names the keys that differ from conf/; FORCE=1 discards them.
# dvc.yaml is generated from the stages' declarations whenever one of them changes.
params: $(STAMP) dvc.yaml
	$(PY) -m pipeline.runner.params -o params.yaml $(if $(FORCE),--force)

# (the report's scaling files are listed in pipeline/report/scaling.py's CONTROLS)
dvc.yaml: $(wildcard pipeline/stages/*.py) pipeline/runner/spec.py pipeline/report/scaling.py | $(STAMP)
	$(PY) -m pipeline.stages dvc -o $@

# The whole recipe under one MLflow parent run; DVC skips stages whose inputs are unchanged.
# params.yaml is recomposed first, so an edit in conf/ is what runs, and the whole file is
# validated before DVC touches anything (DVC_FLAGS go to dvc repro, e.g. DVC_FLAGS=-f).
repro: params system-packages
	@$(call recipe_run,)

# One stage and whatever it needs upstream, e.g. `make pretrain`.
$(STAGES): params system-packages
	@$(call recipe_run,$@)

# Validate params.yaml, stop at once when DVC has nothing to run, else open the MLflow
# parent run and run `dvc repro` inside one Ray that every stage joins
# (pipeline/runner/repro.py).
define recipe_run
$(PY) -m pipeline.runner.repro --params params.yaml $(1) -- $(DVC_FLAGS)
endef
# Two pytest workers (CI's 2 cores; TEST_JOBS=1 runs in one process). xdist hands out whole
# modules (--dist loadscope), so a module's shared fixture (the e2e `make repro`) runs once
# while the other worker runs the rest; the longest modules start first (tests/conftest.py:
# LONG_MODULES; xdist's own reorder would put the few-test e2e modules last).
TEST_JOBS ?= 2
TEST_WORKERS = $(if $(filter 1,$(TEST_JOBS)),,-n $(TEST_JOBS) --dist loadscope --no-loadscope-reorder)
test: $(STAMP)
	$(PY) -m pytest tests -q $(TEST_WORKERS)

# The edit-test loop: everything but the tests marked slow (whole-recipe runs through
# Ray, DVC and MLflow, the two-node cluster, kernel builds for other ISAs).
test-fast: $(STAMP)
	$(PY) -m pytest tests -q -m "not slow" $(TEST_WORKERS)

# Scaling (pipeline/scaling, conf/scaling.yaml; sweeps run beside the recipe, not in dvc.yaml):
# `make sweep` runs the grid conf/sweep/$(SWEEP).yaml under one MLflow parent run
# (resumable: finished points are not rerun; ARGS go to Hydra, e.g. ARGS='ray.address=auto');
# `make scaling-fit` fits the law to its points in MLflow (outputs/scaling/);
# `make plan MEMORY=3GB FLOPS=2e9 [NAME=planned]` plans an architecture with it.
SWEEP ?= moe_grid
sweep: params
	$(DVC) repro mix
	@run_id=$$($(PY) -m pipeline.tracking start --params params.yaml --name sweep:$(SWEEP) --owner-pid $$$$) \
	  || exit 2; \
	MOBILEMOE_PARENT_RUN_ID=$$run_id $(PY) -m pipeline.stages sweep -m sweep=$(SWEEP) $(ARGS); status=$$?; \
	$(PY) -m pipeline.tracking end $$run_id --params params.yaml \
	  --status $$([ $$status -eq 0 ] && echo FINISHED || echo FAILED); \
	exit $$status

# QAT where post-training quantization costs more than at INT4 (docs/qat.md): the qat stage
# by hand with 3- or 2-bit weights (8da3w, 8da2w), from SFT's model, into
# $(STUDY_DIR) (not a DVC stage: the export lowers 8da4w only), e.g. a seed replicate:
# `make qat-study SCHEME=8da2w ARGS=seed=1 STUDY_DIR=outputs/qat_study/8da2w_seed1`.
SCHEME ?= 8da2w
STUDY_DIR ?= outputs/qat_study/$(SCHEME)
qat-study: params
	@$(call recipe_run,sft)
	$(PY) -m pipeline.stages qat stage.qat.scheme=$(SCHEME) stage.qat.out_dir=$(STUDY_DIR) $(ARGS)

# Seed replicates of moe_grid's key cells, points of moe_grid itself (seed 0 is not rerun
# when it finished): seeds 0-2 of the dense twin and the granularity-1/2/4 MoEs at size m
# and 600000 tokens (the noise floor the held-out errors are read against), and at the
# fitted sizes and budgets below it (the noise the fit's weights are estimated from,
# per budget and dense/routed: conf/scaling.yaml's noise_groups; the dense twins at the
# largest budget also at xs, so that their group has 4 degrees of freedom without m).
SEED_CELLS ?= dense,e4k1,e8k2,e16k4
seeds:
	$(MAKE) sweep SWEEP=moe_grid ARGS="sweep.size=m sweep.tokens=600000 sweep.arch=$(SEED_CELLS) seed=0,1,2 $(ARGS)"
	$(MAKE) sweep SWEEP=moe_grid ARGS="sweep.size=s sweep.tokens=120000,300000,600000 sweep.arch=$(SEED_CELLS) seed=0,1,2 $(ARGS)"
	$(MAKE) sweep SWEEP=moe_grid ARGS="sweep.size=m sweep.tokens=120000,300000 sweep.arch=$(SEED_CELLS) seed=0,1,2 $(ARGS)"
	$(MAKE) sweep SWEEP=moe_grid ARGS="sweep.size=xs,s sweep.tokens=600000 sweep.arch=dense,dense_total seed=0,1,2 $(ARGS)"

scaling-fit: $(STAMP)
	$(PY) -m pipeline.stages scaling_fit sweep=$(SWEEP) $(ARGS)

# The planner's choice at the tiny budget trained like the sweep's largest points, and the
# law's prediction for it checked against the run (after make sweep and make scaling-fit).
# Its controls: LOOP=closed_loop_in_range (the choice with depth and width held to the
# sweep's) and LOOP=closed_loop_shared_in_range (the shared expert's share held too), both
# planned by the earlier law; LOOP=loop_extrapolated_l6_e12k4s4 (the choice planned beyond
# the sweep, scaling.plan.within_sweep=false) and LOOP=loop_earlier_l6_e3k1s1 (the earlier
# law's choice).
LOOP ?= closed_loop
closed-loop: $(STAMP)
	$(MAKE) sweep SWEEP=$(LOOP)
	$(PY) -m pipeline.stages closed_loop --params params.yaml --sweep $(LOOP) --fit outputs/scaling/fit.json \
	  --out outputs/scaling

MEMORY ?=
FLOPS ?=
NAME ?= planned
plan: $(STAMP)
	$(PY) -m pipeline.stages plan $(if $(MEMORY),--memory $(MEMORY)) $(if $(FLOPS),--flops $(FLOPS)) --name $(NAME) $(ARGS)

# The layout as drawn (import-linter contracts in pyproject.toml) and ruff's lint and
# format check; the test suite runs the same checks.
lint: $(STAMP)
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Kill a training stage at a random step (by hand and under dvc repro), corrupt its newest
# checkpoint once, rerun, and check the result equals an uninterrupted run's. Works in a
# scratch copy of the repo on the micro preset; DRILL_ARGS are passed on (--help lists them).
drill: $(STAMP)
	$(PY) -m tools.drill $(DRILL_ARGS)

# Mutation testing of the core maths (mutmut, in a scratch copy): the kill rate and every
# surviving mutant, explained or not (tests/equivalent_mutants.txt). Not in CI: about an
# hour on 2 cores. MUTANTS_ARGS go to tools/mutants.py (--without FILE... for a "before").
mutants: $(STAMP)
	$(PY) -m tools.mutants $(MUTANTS_ARGS)

# Export: lowering time/memory of a shape (MODEL, LAYERS: the first N at full width) and
# decode/prefill time against experts and top-k (the sparsity proof), side by side.
bench-export: $(STAMP)
	$(PY) bench/bench_export.py lower --model $(or $(MODEL),tiny) --layers $(or $(LAYERS),0)
	$(PY) bench/bench_export.py sparsity
	$(PY) bench/bench_export.py kernel --model $(if $(filter mobilemoe_%,$(MODEL)),$(MODEL),mobilemoe_s)
	$(PY) bench/bench_export.py head --model $(if $(filter tiny micro,$(MODEL)),mobilemoe_s,$(or $(MODEL),mobilemoe_s))

# Profile: the exported MoE and its dense twins side by side in the ExecuTorch runtime
# (interleaved repetitions, paired ratios), then where a decode step's time goes (ETDump).
# Needs `make profile` outputs; bench/bench_profile.py --help for other programs.
bench-profile: $(STAMP)
	$(PY) bench/bench_profile.py side-by-side
	$(PY) bench/bench_profile.py etdump

# The paper's shapes: mobilemoe_s against mobilellm_pro, INT4, random weights, full width
# at a few layers extrapolated to full depth (tools/profile_paper.py; PAPER_ARGS go on).
profile-paper: mix
	$(PY) -m tools.profile_paper $(PAPER_ARGS)

# Peers on the same weights (bench/bench_peers.py): this program, optimum-executorch's
# export of the HF directory and llama.cpp on a GGUF of it, each runtime in its own venv
# (optimum-executorch pins transformers 5.0.0rc1; llama-cpp-python builds llama.cpp, minutes).
PEERS := .venv-peers
$(PEERS)/optimum/.installed:
	$(PYTHON_BASE) -m venv $(PEERS)/optimum
	$(PEERS)/optimum/bin/pip install --disable-pip-version-check torch==2.13.0 executorch==1.5.1 \
	  torchao==0.18.0 optimum-executorch==1.1.0 transformers==5.0.0rc1
	touch $@
$(PEERS)/llamacpp/.installed:
	$(PYTHON_BASE) -m venv $(PEERS)/llamacpp
	CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_CURL=OFF" $(PEERS)/llamacpp/bin/pip install --disable-pip-version-check \
	  llama-cpp-python==0.3.36 gguf==0.19.0 safetensors==0.8.0 numpy==2.4.6
	touch $@
bench-peers: mix $(PEERS)/optimum/.installed $(PEERS)/llamacpp/.installed
	$(PY) bench/bench_peers.py run $(PEERS_ARGS)

bench-model: $(STAMP)
	$(PY) bench/bench_model.py

bench-train: $(STAMP)
	$(PY) bench/bench_train.py

bench-config: $(STAMP)
	$(PY) bench/bench_config.py

bench-repro: $(STAMP)
	$(PY) bench/bench_repro.py

# The MLflow UI over the embedded store, on loopback only. It prints the address of the
# recipe's runs first: the UI's front page is MLflow's GenAI overview, not training runs.
ui: $(STAMP)
	@echo "the recipe's runs: $$($(PY) -m pipeline.tracking url --params params.yaml --ui http://127.0.0.1:$(UI_PORT))"
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(VENV)/bin/mlflow ui \
	  --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port $(UI_PORT)
