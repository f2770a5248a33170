# rollout_buffers: every target works from a fresh clone; `make test` and `make demo` set up first.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
RSL_RL ?= rsl-rl-lib==5.5.1 tensordict==0.14.3 pyvers==0.2.3
RSL_RL_NEEDS ?= cloudpickle==3.1.3 orjson==3.13.0 importlib_metadata==10.2.0 zipp==4.1.2
PY     := $(VENV)/bin/python
# Triton 3.9 warns on every compile unless this is set; 1 keeps its current default (fusion on).
export TRITON_DEFAULT_FP_FUSION ?= 1

.PHONY: setup test test-random test-api-triton test-triton36 aot demo bench bench-sequences bench-client-mix bench-micro bench-gae bench-host-compact fuzz lint mutate mutate-report clean

setup: $(VENV)/.installed

# torch is installed first, pinned: an unpinned torch would pull gigabytes of CUDA packages on
# a machine without a GPU. The project's own `torch>=2.4` is then already satisfied.
#
# rsl_rl is the reference the sequence minibatches are tested and benchmarked against
# (tests/test_sequences.py, bench/bench_sequences.py; bench/rsl_rl_peer.py loads it). It and
# tensordict, which its storage imports, come pinned and without their declared dependencies
# (torch, tensorboard, onnx...): torch stays the one above. Then tensordict's own small needs.
$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test,bench]"
	$(PY) -m pip install --quiet --no-deps $(RSL_RL)
	$(PY) -m pip install --quiet $(RSL_RL_NEEDS)
	touch $@

test: setup
	$(PY) -m pytest -q
	$(MAKE) --no-print-directory test-api-triton
	$(MAKE) --no-print-directory test-triton36
	$(MAKE) --no-print-directory aot

# The whole pytest suite in a random global order, to catch tests that depend on each other.
# SEED=n replays an order (the seed used is printed in the header, "--random-order-seed=").
test-random: setup
	$(PY) -m pytest -p random_order --random-order-bucket=global $(if $(SEED),--random-order-seed=$(SEED))

# The public API suite a second time, on the Triton kernels under Triton's CPU interpreter
# (CPU tensors only: CUDA hidden, since interpreted kernels cannot read device memory).
test-api-triton: setup
	CUDA_VISIBLE_DEVICES= ROLLOUT_BUFFERS_BACKEND=triton TRITON_INTERPRET=1 $(PY) -m pytest -q -m "not gpu" tests/test_api.py tests/test_compat.py

# The kernels and their launch plans again on triton 3.6, the version the GPU machines have:
# the launch-plan checks (Triton's compiled launcher called directly, under a stand-in driver),
# the kernels bit for bit under its interpreter (which needs numpy < 2.4), the call budgets.
VENV36 ?= .venv-triton36
PY36   := $(VENV36)/bin/python
$(VENV36)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV36)
	$(PY36) -m pip install --quiet --upgrade pip
	$(PY36) -m pip install --quiet "$(TORCH)" "triton==3.6.0" "numpy<2.4" "pytest>=7" "hypothesis>=6"
	$(PY36) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

test-triton36: $(VENV36)/.installed
	$(PY36) -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning tests/test_launch_plan.py tests/test_kernels.py

# Compile every kernel specialization for sm_80 and sm_90 without a GPU; fails on error or spill.
aot: setup
	$(PY) -m rollout_buffers.kernels.aot

demo: setup
	$(PY) bench/demo.py

bench: setup
	$(PY) bench/run.py
	$(PY) bench/bench_sequences.py
	$(PY) bench/client_mix.py

# Recorded call mixes of real training code (ProtoMotions AMP, Isaac Lab / rsl_rl), per call
# against the original, on the CPU path and the CUDA path's host cost (also in bench).
# CLIENT_MIX_ARGS: e.g. --path cpu, --envs 1024, --check.
bench-client-mix: setup
	$(PY) bench/client_mix.py $(CLIENT_MIX_ARGS)

# Sequence minibatches for recurrent policies against rsl_rl's recurrent generator (also in bench).
bench-sequences: setup
	$(PY) bench/bench_sequences.py

# Compact storage's host cost on the CUDA path, full keys against compact observation keys
# (update_step, get_dict, dataset[i]), measured without a GPU by the project's instrument
# shared/tools/host_launch.py in its fake mode (needs shared/ beside the checkout, or
# HOST_COMPACT_ARGS="--tool PATH"). Writes bench/results/host_compact-fake-cpu.md.
bench-host-compact: setup
	$(PY) bench/host_compact.py $(HOST_COMPACT_ARGS)

bench-micro: setup
	$(PY) -m pytest -q bench/ --benchmark-only

bench-gae: setup
	$(PY) bench/bench_gae.py

fuzz: setup
	HYPOTHESIS_PROFILE=long $(PY) -m pytest -q tests/test_fuzz.py

lint: setup
	$(VENV)/bin/ruff check rollout_buffers kernels tests bench examples
	$(VENV)/bin/ruff format --check rollout_buffers kernels tests bench examples

# Mutation testing, a habit and not a gate (not in `test`, not in CI): mutmut (the `dev` extra,
# configured in pyproject.toml's [tool.mutmut]) over rollout_buffers/ and the host-side Python of
# kernels/ (the @triton.jit bodies are left alone). It runs the suite once to learn which tests
# call each function, then each mutant against those tests only; results stay in mutants/ and
# the next run resumes. Survivors are printed as file:line: mutation, and the summary written
# to bench/results/mutation.md. Details: bench/mutation.py.
#   make mutate                                   everything, in a 60-minute box (resumable)
#   make mutate PATHS=rollout_buffers/dataset.py  one file (or folder); its mutants all retested
#   make mutate PATHS=... TESTS="tests/test_api.py tests/test_bad_input.py"  against those only
#                                                 (a change of TESTS resets every result)
#   make mutate MUTATE_MINUTES=15 MUTATE_JOBS=1   the time box (whole run), mutants at once
#   make mutate-report                            the report again from mutants/
# The whole library is ~5,900 mutants, some 4-7 hours on 2 cores: run it in boxes, it resumes.
MUTATE_MINUTES ?= 60
MUTATE_JOBS    ?= 2
PATHS          ?=
TESTS          ?=

$(VENV)/.dev-installed: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

mutate: $(VENV)/.dev-installed
	$(PY) bench/mutation.py --minutes $(MUTATE_MINUTES) --jobs $(MUTATE_JOBS) \
		$(if $(PATHS),--paths $(PATHS)) $(if $(TESTS),--tests $(TESTS))

mutate-report: $(VENV)/.dev-installed
	$(PY) bench/mutation.py --report-only

clean:
	rm -rf $(VENV) $(VENV36) build *.egg-info .pytest_cache .ruff_cache .hypothesis mutants
