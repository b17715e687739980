# svq.py: tests and the VM rig (see vm/). Everything downloaded or built goes
# to .cache/ (git-ignored).
PYTHON ?= python3
PYTEST = $(PYTHON) -m pytest
TESTS ?= test_svq.py
VM_RUN = $(PYTHON) vm/run

export PYTHON

.PHONY: all setup test unit vmtest initramfs-test demo migrate-demo bench smoke fuzz clean distclean

all: test

# Install packages, fetch the pinned kernel, build the modules and the initrd.
# Idempotent: a quick no-op once .cache/ is filled.
setup:
	vm/setup

# Set-up, unit tests on the host, device tests in the VM (or on this host when
# it has /dev/vhost-vdpa-* and SVQ_NET_DEV set); fails if either fails.
test:
	vm/test

unit:
	$(PYTEST) -m "not vdpa" $(TESTS)

vmtest: setup
	$(VM_RUN) $(PYTHON) -m pytest -p no:cacheprovider -m vdpa -v $(TESTS)

# svq.py on a bare initramfs (busybox, a minimal CPython, svq.py, the vdpa
# modules; no iproute2, no host share) on the rig's kernel: make test runs it.
initramfs-test: setup
	$(PYTHON) vm/initramfs-test

# The serve fuzzer, long (make test runs it for 12 s): SECONDS, SEED to vary.
SECONDS ?= 600
SEED ?= 1
fuzz:
	SVQ_FUZZ_SECONDS=$(SECONDS) SVQ_FUZZ_SEED=$(SEED) $(PYTEST) -q -k fuzz $(TESTS)

# svq.py on a vdpa_sim net device, for a machine with no vDPA device.
demo: setup
	$(VM_RUN) sh -c 'exec $(PYTHON) svq.py "$$SVQ_NET_DEV"'

# A nested Linux guest on QEMU live-migrated through svq.py serve, then the
# same guest on QEMU's emulated virtio-blk: migration figures side by side.
migrate-demo: setup
	SVQ_VM_TIMEOUT=1200 $(VM_RUN) $(PYTHON) vm/migrate-demo

# Benchmarks: the copier and import time here, direct against shadow on the
# three devices in one VM run; prints the table, writes .cache/bench/*.json.
# BASELINE=old.json prints the change against an earlier results file.
BENCH_ARGS ?=
bench: setup
	$(PYTHON) bench.py run $(if $(BASELINE),--compare $(BASELINE)) $(BENCH_ARGS)

# The rig's own check: device ids of the three devices, SVQ_OUT writable.
smoke: setup
	$(VM_RUN) $(PYTHON) vm/smoke.py

# Old VM runs and the console log; keeps the kernel, modules and downloads.
clean:
	rm -rf .cache/vm/runs .cache/vm/console.log .pytest_cache

distclean:
	rm -rf .cache .pytest_cache
