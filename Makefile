# Secondsite — the two README commands bootstrap everything they need.
SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Debian packages the build and the tests need (installed when root and missing).
APT_PACKAGES := python3-venv libdbus-1-dev libglib2.0-dev dbus e2fsprogs util-linux systemd \
                iproute2 zstd openssh-server openssh-client genisoimage sudo

.PHONY: quickstart test lint typecheck unit bench deps venv clean

quickstart: venv
	@trap '$(PY) -m appliance.lab down' EXIT; \
	$(PY) -m appliance.lab up --size 512M --churn 5 || exit 1; \
	trap 'echo; exit 0' INT; \
	while true; do clear; $(PY) -m appliance.lab status; echo "(Ctrl-C: stop and take the lab down)"; sleep 3; done

test: venv lint typecheck unit

lint: venv
	$(VENV)/bin/ruff check appliance agent tui tests
	$(VENV)/bin/ruff format --check appliance agent tui tests

typecheck: venv
	$(VENV)/bin/mypy

unit: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: venv
	$(PY) tests/bench/run.py

deps:
	@bash tools/apt-deps.sh $(APT_PACKAGES)

venv: $(STAMP)

$(STAMP): pyproject.toml | deps
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache

# ---- appliance image (issue 7): image/build.sh, image/boot-test.sh ----------------------
# Debian packages the image build and the boot test need on the build machine.
IMAGE_APT_PACKAGES := systemd mkosi debootstrap debian-archive-keyring systemd-container \
                      fdisk dosfstools mtools grub-common e2fsprogs qemu-utils \
                      qemu-system-x86 ovmf virt-v2v genisoimage

.PHONY: image image-test image-deps units-check

image-deps:
	@bash tools/apt-deps.sh $(IMAGE_APT_PACKAGES)

# The OS tree, a BIOS+UEFI raw disk and the OVA, in mkosi.output/ (root needed).
image: venv image-deps
	bash image/build.sh

# Boots the raw disk from `make image` under QEMU, checks the OVA. IMAGE_BOOTS: default
# "plain:bios ovf:uefi" (no OVF environment on BIOS; an OVF ISO on UEFI).
image-test: venv image-deps
	bash image/boot-test.sh $(IMAGE_BOOTS)

# The unit checks alone (they are also part of `make test`).
units-check: venv
	$(PY) -m pytest -q tests/image
