# circuitlab: `make demo` traces a prompt on the embedded model; `make test` runs everything.
PY      := .venv/bin/python
STAMP   := .venv/.setup-done
PROMPT  ?= The opposite of "small" is "
OUT     ?= out/demo

.PHONY: setup demo docs test bench lab clean

setup: $(STAMP)

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

# The browser tests need Chromium or Chrome (scripts/find_browser.sh finds one, or installs
# Debian's where apt-get runs as root); without one they are skipped, with one line saying so.
test: setup
	@browser=$$(scripts/find_browser.sh --install) || echo "No Chromium or Chrome found: the browser tests are skipped. Install one (apt-get install chromium) or set CIRCUITLAB_BROWSER to its path to run them."; \
	CIRCUITLAB_BROWSER=$$browser HF_HUB_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider tests --nbmake notebooks --nbmake-timeout=600 --durations=25

bench: setup
	HF_HUB_OFFLINE=1 $(PY) -m circuitlab.bench

lab: setup
	$(PY) -m jupyter lab notebooks/

clean:
	rm -rf out .pytest_cache
