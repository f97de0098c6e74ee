"""`export_all`: checkpoint -> every requested artifact in one out dir, plus manifest.json."""

from __future__ import annotations

import datetime
import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from marsvision.export.artifacts import (
    check_manifest_owner,
    log,
    prepare_out_dir,
    remove_dead_staging,
    staging_dir,
    write_manifest,
)
from marsvision.export.config import ExportConfig
from marsvision.runtime.errors import MarsvisionError
from marsvision.runtime.files import FolderLock
from marsvision.runtime.metadata import ModelMeta, sha256_file, sidecar_path
from marsvision.runtime.models import artifact_name

CALIB_CACHE_DIR = "calib-cache"
TIMING_CACHE = "tensorrt-timing.cache"


def _entry(
    path: Path, flavour: str, meta: ModelMeta, parity: dict[str, Any], secs: float
) -> dict[str, Any]:
    size = path.stat().st_size
    return {
        "file": path.name,
        "flavour": flavour,
        "precision": meta.precision,
        "size_bytes": size,
        "size_mb": round(size / 1e6, 2),
        # measured against the PyTorch FP32 checkpoint's logits, every file (the FP32 ONNX
        # included); an engine's, not measured, says so instead
        "parity_vs_fp32": {**parity, "reference": "pytorch"} if "images" in parity else parity,
        "build_seconds": round(secs, 2),
        "sha256": sha256_file(path),
        **({"quantization": meta.quantization} if meta.quantization else {}),  # how calibrated
    }


def _tensorrt_plan(config: ExportConfig) -> tuple[bool, str | None]:
    """Whether to build engines, and the line to log when skipping them.

    `on` without TensorRT is a user error.
    """
    from marsvision.export.tensorrt import TRT_INSTALL_HINT, tensorrt_unavailable_reason

    if config.tensorrt == "off":
        return False, None
    reason = tensorrt_unavailable_reason()
    if reason is None:
        return config.fp16 or config.int8, None
    if config.tensorrt == "on":
        raise MarsvisionError(
            f"--tensorrt on, but TensorRT cannot build engines here ({reason}); "
            f"install it with {TRT_INSTALL_HINT} on a machine with an NVIDIA GPU, "
            "or pass --tensorrt off"
        )
    if config.fp16 or config.int8:
        return False, f"skipped the TensorRT engines: {reason} (to build them: {TRT_INSTALL_HINT})"
    return False, None


def export_all(config: ExportConfig) -> dict[str, Any]:
    """Write the artifacts `config` asks for (all or none) and return the manifest. --out is
    locked from its creation to the end (another export into it is refused)."""
    with FolderLock() as lock:
        return _export_all(config, lock)


def _export_all(config: ExportConfig, lock: FolderLock) -> dict[str, Any]:
    from marsvision.export.images import load_batch, ort_logits, parity, split_paths
    from marsvision.export.onnx_fp32 import fp32_meta, onnx_from_checkpoint, torch_logits
    from marsvision.train.checkpoint import is_finished, load_checkpoint
    from marsvision.train.data import check_same_data, resolve_data_dir

    ckpt = load_checkpoint(config.checkpoint)
    source_sha = sha256_file(config.checkpoint)
    data_dir = resolve_data_dir(config.data_dir)
    # calibration reads "the train split" of --data: of another data set it could be test images
    check_same_data(ckpt, data_dir, config.checkpoint)
    meta = fp32_meta(ckpt, source_sha)  # the checkpoint's checks, before --out is made
    build_engines, skip_note = _tensorrt_plan(config)  # --tensorrt on without TensorRT too
    task = ckpt["task"]
    spec = meta.preprocess
    calib_paths = split_paths(data_dir, "train", task, config.calib_images) if config.int8 else []
    val_batch = load_batch(split_paths(data_dir, "val", task, config.parity_images), spec)
    # and its weights' checks (fc width, missing tensors, not finite), before --out is made
    ref = torch_logits(ckpt, val_batch)
    out = prepare_out_dir(config.out)
    lock.acquire(out, "mars-export")  # an export of another checkpoint would mix the manifest
    check_manifest_owner(out, source_sha)
    if lock.held:  # (a no-op off POSIX: there an export running beside it may own one)
        remove_dead_staging(out)
    if not is_finished(ckpt):  # the best epoch so far of a run stopped or running
        log(f"note: {config.checkpoint} is from an unfinished run (no test metrics yet: the best "
            "epoch so far); finish it with mars-train --resume and the run's flags for the model "
            "it selects")  # fmt: skip
    if skip_note:
        log(skip_note)

    entries: list[dict[str, Any]] = []
    staged: list[tuple[Path, Path]] = []  # (staged file, final path)
    with staging_dir(out) as tmp:

        def stage(flavour: str) -> tuple[Path, Path]:
            name = artifact_name(task, flavour)
            pair = (tmp / name, out / name)
            staged.append(pair)
            return pair

        t0 = time.perf_counter()
        fp32_path, fp32_final = stage("fp32")
        log(f"exporting {fp32_final.name} (torch.onnx dynamo exporter)")
        fig = onnx_from_checkpoint(ckpt, fp32_path, meta=meta, parity_batch=val_batch,
                                   reference=ref, max_abs_diff=config.parity_tolerance)  # fmt: skip
        entries.append(_entry(fp32_path, "fp32", meta, fig, time.perf_counter() - t0))

        onnx_for_engine: dict[str, tuple[Path, ModelMeta]] = {}
        if config.fp16:
            from marsvision.export.fp16 import fp16_meta, fp16_onnx_from_onnx

            t0 = time.perf_counter()
            path, final = stage("fp16")
            log(f"converting to {final.name}")
            m16 = fp16_meta(meta)
            fp16_onnx_from_onnx(fp32_path, path, meta=m16)
            fig = parity(ref, ort_logits(path, val_batch), meta.decision_threshold, final.name)
            entries.append(_entry(path, "fp16", m16, fig, time.perf_counter() - t0))
            onnx_for_engine["fp16-engine"] = (path, m16)

        if config.int8:
            from marsvision.export.int8 import (
                calibrate,
                calibration_inputs_sha256,
                calibration_key,
                int8_meta,
                int8_onnx_from_onnx,
                preprocess_for_quantization,
                refuse_disagreement,
            )

            t0 = time.perf_counter()
            pre = tmp / "pre-quant.onnx"
            preprocess_for_quantization(fp32_path, pre)
            key = calibration_key(
                model_sha256=sha256_file(pre),
                inputs_sha256=calibration_inputs_sha256(calib_paths, spec),
                method=config.calib_method,
                versions=meta.versions,
            )
            ranges, reused = calibrate(
                pre,
                out / CALIB_CACHE_DIR / f"{key}.json",
                paths=calib_paths,
                spec=spec,
                method=config.calib_method,
                workdir=tmp,
            )
            calib_secs = time.perf_counter() - t0
            for flavour in ("int8-cpu", "int8-trt"):
                t1 = time.perf_counter()
                path, final = stage(flavour)
                log(f"quantizing {final.name}")
                m8 = int8_meta(meta, flavour, method=config.calib_method, images=len(calib_paths))
                assert m8.quantization is not None
                m8.quantization["calibration_cache"] = f"{CALIB_CACHE_DIR}/{key}.json"
                int8_onnx_from_onnx(pre, path, flavour=flavour, cache_path=ranges, meta=m8)
                fig = parity(ref, ort_logits(path, val_batch), meta.decision_threshold,
                             final.name)  # fmt: skip
                refuse_disagreement(fig, final.name, config.int8_min_agreement,
                                    ranges if reused else None)  # fmt: skip
                secs = time.perf_counter() - t1 + calib_secs / 2
                entry = _entry(path, flavour, m8, fig, secs)
                entry["calibration_reused"] = reused
                # the floor it passed, its own: a later export may keep the file (_kept_entries)
                entry["int8_min_agreement"] = config.int8_min_agreement
                entries.append(entry)
                if flavour == "int8-trt":
                    onnx_for_engine["int8-engine"] = (path, m8)

        if build_engines:
            from marsvision.export.tensorrt import engine_from_onnx

            for flavour, (src, src_meta) in onnx_for_engine.items():
                t0 = time.perf_counter()
                path, final = stage(flavour)
                log(f"building {final.name} from {src.name} (TensorRT, max batch "
                     f"{config.max_batch})")  # fmt: skip
                trt_info = engine_from_onnx(
                    src,
                    path,
                    input_name=src_meta.input_name,
                    input_size=spec.input_size,
                    max_batch=config.max_batch,
                    timing_cache=out / TIMING_CACHE,
                )
                emeta = replace(src_meta, tensorrt=trt_info)
                side = sidecar_path(path)
                side.write_text(emeta.to_json() + "\n", encoding="utf-8")
                staged.append((side, sidecar_path(final)))
                fig = {"note": "not measured at export (needs a TensorRT runner)"}
                entry = _entry(path, flavour, emeta, fig, time.perf_counter() - t0)
                # its class names, threshold and shapes, which the runtime takes as they are
                entry["sidecar"] = {"file": side.name, "sha256": sha256_file(side)}
                entries.append(entry)

        manifest = {
            "source_checkpoint": str(config.checkpoint.resolve()),  # usable from any folder
            "source_checkpoint_sha256": source_sha,
            "task": task,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "config": json.loads(json.dumps(asdict(config), default=str)),
            "versions": meta.versions,
            "artifacts": entries,
        }
        # All artifacts complete: into place (sidecars after their engines) with their manifest.
        return write_manifest(out, manifest, staged=staged)
