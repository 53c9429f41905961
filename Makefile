# One command to run, one to test. Everything lands in .venv; nothing is installed by hand.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install run test lint typecheck pytest bench chaos clean browser promtool nginx

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/taskmanager run

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: install
	$(BIN)/mypy

# The dashboard test (tests/web/test_dashboard.py) drives Debian's Chromium, never a browser
# build downloaded by Playwright: install the package when it is missing and we are root.
CHROMIUM := /usr/bin/chromium

browser:
	@if [ -x $(CHROMIUM) ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "make: installing Debian's chromium for the dashboard test"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else \
	  echo "make: $(CHROMIUM) is missing and this is not root: run 'sudo apt-get install chromium'" \
	    "(tests/web/test_dashboard.py fails without it)"; \
	fi

# The alert rules (deploy/prometheus) are checked and unit-tested by promtool, from Debian's
# prometheus package (tests/deploy/test_manifests.py fails without it).
PROMTOOL := /usr/bin/promtool

promtool:
	@if [ -x $(PROMTOOL) ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "make: installing Debian's prometheus (for promtool)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	else \
	  echo "make: $(PROMTOOL) is missing and this is not root: run 'sudo apt-get install prometheus'" \
	    "(tests/deploy/test_manifests.py fails without it)"; \
	fi

pytest: install browser promtool
	$(BIN)/pytest

test: lint typecheck pytest

# Runs the benchmarks (about 25 min, bounded) and writes BENCHMARKS.md and docs/bench/*.png.
# SOAK_SECONDS sets the memory soak's length (the issue's 10 minutes by default).
SOAK_SECONDS ?= 600

bench: install
	$(BIN)/python -m bench report --soak-seconds $(SOAK_SECONDS)

# The chaos runner (chaos/, writes RELIABILITY.md) puts Debian's nginx in front of two web
# processes for the rolling-restart scenario: install the package when missing and root.
NGINX := /usr/sbin/nginx

nginx:
	@if [ -x $(NGINX) ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "make: installing Debian's nginx for the chaos runner"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null; \
	else \
	  echo "make: $(NGINX) is missing and this is not root: run 'sudo apt-get install nginx-light'" \
	    "(the rolling-restart scenario of make chaos fails without it)"; \
	fi

chaos: install nginx
	$(BIN)/python -m chaos

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
