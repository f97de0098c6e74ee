# The two commands a newcomer needs on a fresh clone; each sets itself up first:
#   make demo   the main job, small: train, export, classify the real MSL images
#   make test   the test suite, plus mypy on the TensorRT code against tensorrt-stubs
# The venv lives in .venv with the versions pinned in constraints.txt.

PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MARS_DATA ?= ../shared/msl
export MARS_DATA
# torch's OpenMP threads spin while idle by default: 10-20x slower steps on a shared 2-vCPU box.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup demo test typecheck lint clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e ".[export,dev]"
	@# tensorrt-stubs declares a dependency on tensorrt, which cannot be installed here
	@# (PyPI holds only a stub that downloads from NVIDIA's index): take the stubs alone.
	$(BIN)/pip install -q --no-deps -c constraints.txt tensorrt-stubs
	touch $(STAMP)

setup: $(STAMP)

# The whole job on the real images, small: train 1 epoch on 64 images at 64 px, export FP32 and
# INT8, classify all 6,691 MSL images with the INT8 model. About 1.5 minutes on 2 CPU cores.
DEMO ?= runs/demo
demo: $(STAMP)
	rm -rf $(DEMO)
	$(BIN)/mars-train --data $(MARS_DATA) --task binary --epochs 1 --limit 64 --image-size 64 \
		--device cpu --out $(DEMO)/train
	$(BIN)/mars-export --checkpoint $(DEMO)/train/checkpoint.pt --data $(MARS_DATA) \
		--out $(DEMO)/export --int8 --calib-images 32
	$(BIN)/mars-infer $(MARS_DATA)/calibrated --engine $(DEMO)/export/resnet50-binary.int8-cpu.onnx \
		--out $(DEMO)/predictions.csv
	@echo "first rows of $(DEMO)/predictions.csv:"; head -n 4 $(DEMO)/predictions.csv

test: $(STAMP)
	$(BIN)/python -m pytest -q
	$(MAKE) typecheck

typecheck: $(STAMP)
	$(BIN)/python tests/typecheck_tensorrt.py

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs
