# The two commands a newcomer needs on a fresh clone; each sets itself up first:
#   make demo   the main job: export the shipped model, classify the real MSL images, score
#   make test   the test suite, mypy (the package; --strict on the TensorRT code against tensorrt-stubs), ruff
# The venv lives in .venv with the versions pinned in constraints.txt.

PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MARS_DATA ?= ../shared/msl
export MARS_DATA
# torch's OpenMP threads spin while idle by default: 10-20x slower steps on a shared 2-vCPU box.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup demo ship device-data test typecheck lint clean data model

# The pinned versions need Python 3.11 or later; a venv left by a first try with an older one
# (its python links there, and `venv` over it keeps the link) is made anew.
NEW_ENOUGH := -c 'import sys; sys.exit(sys.version_info < (3, 11))'
$(STAMP): pyproject.toml constraints.txt Makefile
	@command -v $(PY) >/dev/null || { echo "no $(PY) here: make ... PY=python3.11" >&2; exit 1; }
	@$(PY) $(NEW_ENOUGH) || { echo "$(PY) is $$($(PY) -V 2>&1); the versions pinned in" \
		"constraints.txt need Python 3.11 or later: make ... PY=python3.11" >&2; exit 1; }
	@# (a link to a Python since removed fails to run too)
	@{ test ! -e $(BIN)/python && test ! -L $(BIN)/python; } || $(BIN)/python $(NEW_ENOUGH) \
		|| rm -rf $(VENV)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e ".[cpu,export,dev]"
	@# tensorrt-stubs declares a dependency on tensorrt, which cannot be installed here
	@# (PyPI holds only a stub that downloads from NVIDIA's index): take the stubs alone.
	$(BIN)/pip install -q --no-deps -c constraints.txt tensorrt-stubs
	touch $(STAMP)

setup: $(STAMP)

# The MSL data, checked before anything is built for it (a relative MARS_DATA is read from here).
data:
	@test -f "$(MARS_DATA)/train-calibrated-shuffled.txt" || { echo "no MSL data set at" \
		"MARS_DATA=$(MARS_DATA) (from $(CURDIR)): make ... MARS_DATA=DIR" >&2; exit 1; }

# The main job. With a shipped model (models/resnet50-binary.pt): export it (FP32 + INT8),
# classify all 6,691 MSL images with the INT8 model, score the test split from that output.
# Without one: the same on a toy model trained here (1 epoch, 64 images, 64 px) so that the
# pipeline still runs end to end (its metrics then mean nothing; its INT8 is not held to
# mars-export's floor on label agreement: a toy's labels are near-ties). A model named with
# MODEL=... must exist (a typo trained the toy), checked before the venv is built.
DEMO ?= runs/demo
MODEL ?= models/resnet50-binary.pt
model:
ifneq ($(origin MODEL),file)
	@test -f "$(MODEL)" || { echo "no model at MODEL=$(MODEL) (from $(CURDIR)); the toy model" \
		"is trained only when no MODEL is named" >&2; exit 1; }
endif

demo: data model $(STAMP)
	rm -rf $(DEMO)
ifeq ($(wildcard $(MODEL)),)
	@echo "no shipped model at $(MODEL) yet: training a toy one to show the pipeline"
	$(BIN)/mars-train --data "$(MARS_DATA)" --task binary --epochs 1 --limit 64 --image-size 64 \
		--device cpu --out $(DEMO)/train
	$(BIN)/mars-export --checkpoint $(DEMO)/train/checkpoint.pt --data "$(MARS_DATA)" \
		--out $(DEMO)/export --int8 --calib-images 32 --int8-min-agreement 0
else
	$(BIN)/mars-export --checkpoint $(MODEL) --data "$(MARS_DATA)" --out $(DEMO)/export --int8
endif
	$(BIN)/mars-infer "$(MARS_DATA)/calibrated" --engine $(DEMO)/export/resnet50-binary.int8-cpu.onnx \
		--out $(DEMO)/predictions.csv
	@echo "first rows of $(DEMO)/predictions.csv:"; head -n 3 $(DEMO)/predictions.csv
	$(BIN)/mars-bench score $(DEMO)/predictions.csv --data "$(MARS_DATA)" --split test --out $(DEMO)

# Ship a finished run: make ship RUN=runs/binary  (fp16 weights, scores, card, SHA256SUMS)
ship: data $(STAMP)
	$(BIN)/python -m marsvision.train.ship $(RUN) --data "$(MARS_DATA)" --models models $(if $(filter 1,$(REPLACE)),--replace)

# The data set inside the repo (ignored), to carry to the GPU machine (DEVELOPERS.md): one gzip
# tar: the device tool refused the folder (58.5 MiB of bytes, 73 MB on disk) and took the tar;
# train/gpu_session.sh unpacks it into .data/msl there.
# tar runs gzip itself (-I), so that its failure fails the target (a pipe's status is gzip's).
device-data: data
	mkdir -p .data && rm -rf .data/msl .data/msl.tgz.tmp
	tar -C "$(MARS_DATA)" -I 'gzip -1' -cf .data/msl.tgz.tmp . && mv .data/msl.tgz.tmp .data/msl.tgz
	@du -h --apparent-size .data/msl.tgz

test: data $(STAMP)
	$(BIN)/python -m pytest -q
	$(MAKE) typecheck lint

typecheck: $(STAMP)
	$(BIN)/python tests/typecheck.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) runs
