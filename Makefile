# booking_guard — build with PGXS, plus the project's everyday targets.
#
#   make            build build/booking_guard--<version>.sql, the update scripts from every released
#                   version, and the C library booking_guard-<version>.so
#   make install    install the extension into the server (PGXS; needs write access there)
#   make setup      install OS packages and the .venv (scripts/bootstrap)
#   make test       setup, build, install, then lint + pgTAP + pytest on a throwaway cluster
#   make demo       setup, build, install, then the demo on a throwaway cluster
#   make demo-serve the demo, then its cluster, status page and /metrics stay up until Ctrl-C
#                   (DEMO_LISTEN=HOST:PORT, default 127.0.0.1:9188)
#   make lint       ruff, pgspot on the built script
#   make bench      every benchmark under bench/ on a throwaway cluster (report: bench/results/latest.md)
#   make soak       the fault-injection soak and its verdict (SOAK_CALLS=100000 SOAK_WORKERS=16 SOAK_ARGS=...)
#
# With DATABASE_URL set, test and demo use that server instead of the throwaway cluster.

EXTVERSION := $(shell sed -n "s/^default_version *= *'\(.*\)'/\1/p" extension/booking_guard.control)
# Every released version an update script starts from (released/booking_guard--<v>.sql), but the
# current one: once it is released, its build must equal its released script (check-current-release).
RELEASED   := $(filter-out $(EXTVERSION),$(patsubst released/booking_guard--%.sql,%,$(filter-out released/booking_guard--%--%.sql,$(wildcard released/booking_guard--*.sql))))
BUILT      := build/booking_guard--$(EXTVERSION).sql \
              $(foreach v,$(RELEASED),build/booking_guard--$(v)--$(EXTVERSION).sql)

# The C library carries the version: an old version's library stays installed beside the new one
# (a session still running the old one keeps working while the extension is updated). The 0.1.0
# library, built from its released source, is what 0.1.0's script names.
MODULEDIR  = extension
MODULE_big = booking_guard-$(EXTVERSION)
OBJS       = extension/src/booking_guard.o
MODULES    = released/booking_guard_c
DATA       = extension/booking_guard.control $(filter-out released/booking_guard--$(EXTVERSION).sql,$(wildcard released/booking_guard--*.sql))
DATA_built = $(BUILT)
EXTRA_CLEAN = build

PG_CONFIG ?= $(firstword $(wildcard /usr/lib/postgresql/15/bin/pg_config) $(shell command -v pg_config 2>/dev/null))
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)
VENV := .venv/bin

all: check-released $(BUILT) check-current-release

ifneq ($(PG_CONFIG),)
# no JIT bitcode: nothing here is worth inlining, and it keeps the build to gcc
override with_llvm := no
PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)
endif

SCRIPT_SOURCES := scripts/build-extension $(sort $(wildcard extension/sql/*.sql extension/sql/schema/*.sql extension/plpython/*.py))

build/booking_guard--$(EXTVERSION).sql: $(SCRIPT_SOURCES)
	scripts/build-extension --version $(EXTVERSION) $@

build/booking_guard--%--$(EXTVERSION).sql: $(SCRIPT_SOURCES)
	scripts/build-extension --version $(EXTVERSION) --from $* $@

.PHONY: check-released check-current-release
check-released:
	@scripts/build-extension --check

# A released version is frozen: while default_version still names it, what the sources build must be
# what was released (its script and its C source). A change needs the next version first.
check-current-release: $(BUILT)
	@if { [ -f released/booking_guard--$(EXTVERSION).sql ] && ! cmp -s build/booking_guard--$(EXTVERSION).sql released/booking_guard--$(EXTVERSION).sql; } \
	    || { [ -f released/booking_guard-$(EXTVERSION).c ] && ! cmp -s extension/src/booking_guard.c released/booking_guard-$(EXTVERSION).c; }; then \
	  echo "booking_guard $(EXTVERSION) is released and frozen, but the sources build something else." >&2; \
	  echo "Move default_version in extension/booking_guard.control to the next version, put table changes in" >&2; \
	  echo "extension/sql/schema/<next>.sql, and add released/booking_guard-$(EXTVERSION).c to MODULES (docs/development.md)." >&2; \
	  exit 1; \
	fi

SOAK_CALLS   ?= 100000
SOAK_WORKERS ?= 16
SOAK_ARGS    ?=

DEMO_LISTEN  ?= 127.0.0.1:9188

.PHONY: setup test demo demo-serve lint bench soak install-ext

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

demo-serve: install-ext
	scripts/with-database $(VENV)/booking-guard demo --serve --listen $(DEMO_LISTEN)

bench: install-ext
	scripts/with-database scripts/run-bench

soak: install-ext
	scripts/with-database $(VENV)/booking-guard soak --calls $(SOAK_CALLS) --workers $(SOAK_WORKERS) $(SOAK_ARGS)

lint: setup all
	scripts/lint
