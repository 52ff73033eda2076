# booking_guard — build with PGXS, plus the project's everyday targets.
#
#   make            build build/booking_guard--<version>.sql and the C module booking_guard_c.so
#                   (not booking_guard.so: Python run from the repository root would import that
#                   in place of the booking_guard package)
#   make install    install the extension into the server (PGXS; needs write access there)
#   make setup      install OS packages and the .venv (scripts/bootstrap)
#   make test       setup, build, install, then lint + pgTAP + pytest on a throwaway cluster
#   make demo       setup, build, install, then the demo on a throwaway cluster
#   make lint       ruff, pgspot on the built script
#   make bench      every benchmark under bench/ on a throwaway cluster (bench/results/latest.md, .json)
#   make soak       the fault-injection soak and its verdict (SOAK_CALLS=100000 SOAK_WORKERS=16 SOAK_ARGS=...)
#
# With DATABASE_URL set, test and demo use that server instead of the throwaway cluster.

EXTVERSION := $(shell sed -n "s/^default_version *= *'\(.*\)'/\1/p" extension/booking_guard.control)
BUILT      := build/booking_guard--$(EXTVERSION).sql

MODULEDIR  = extension
MODULE_big = booking_guard_c
OBJS       = extension/src/booking_path.o
DATA       = extension/booking_guard.control $(wildcard extension/updates/*.sql)
DATA_built = $(BUILT)
EXTRA_CLEAN = build

PG_CONFIG ?= $(firstword $(wildcard /usr/lib/postgresql/15/bin/pg_config) $(shell command -v pg_config 2>/dev/null))
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)
VENV := .venv/bin

all: $(BUILT)

ifneq ($(PG_CONFIG),)
PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)
endif

$(BUILT): scripts/build-extension $(sort $(wildcard extension/sql/*.sql extension/plpython/*.py))
	scripts/build-extension $@

SOAK_CALLS   ?= 100000
SOAK_WORKERS ?= 16
SOAK_ARGS    ?=

.PHONY: setup test demo lint bench soak install-ext

setup:
	@scripts/bootstrap

# A sub-make, so that PGXS is found even when setup has just installed it.
install-ext: setup
	@$(MAKE) --no-print-directory all
	@$(SUDO) $(MAKE) --no-print-directory install >/dev/null

test: install-ext
	scripts/with-database scripts/run-tests

demo: install-ext
	scripts/with-database $(VENV)/booking-guard demo

bench: install-ext
	scripts/with-database scripts/run-bench

soak: install-ext
	scripts/with-database $(VENV)/booking-guard soak --calls $(SOAK_CALLS) --workers $(SOAK_WORKERS) $(SOAK_ARGS)

lint: setup all
	scripts/lint
