# circuitlab: `make demo` traces a prompt on the embedded model; `make test` runs everything.
PY      := .venv/bin/python
STAMP   := .venv/.setup-done
PROMPT  ?= The opposite of "small" is "
OUT     ?= out/demo

.PHONY: setup demo docs test bench lab clean

setup: $(STAMP) /usr/bin/chromium

# Headless Chromium for the browser tests (Playwright cannot download browsers offline).
/usr/bin/chromium:
	apt-get update && apt-get install -y chromium

# torch first and pinned: an unpinned torch pulls GBs of CUDA wheels.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip show torch >/dev/null 2>&1 || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: setup
	HF_HUB_OFFLINE=1 $(PY) -m circuitlab trace '$(PROMPT)' --out $(OUT) --force

# Regenerate docs/ screenshots from the current demo graph.
docs: demo
	HF_HUB_OFFLINE=1 $(PY) docs/screenshots.py $(OUT)/graph

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider tests --nbmake notebooks --nbmake-timeout=600 --durations=25

bench: setup
	HF_HUB_OFFLINE=1 $(PY) -m circuitlab.bench

lab: setup
	$(PY) -m jupyter lab notebooks/

clean:
	rm -rf out .pytest_cache
