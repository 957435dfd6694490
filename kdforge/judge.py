"""Parity, judged: the same test images through the PyTorch student and a candidate runner, logits compared first,
metrics derived from them. Pure: it reads no file; the export job calls it with what it holds (student, data,
the runner on the file it just made), `kdforge verify` (verify.py) with what it read from an export folder.

    report = verify_runner(candidate, lambda: student, data.test, recipe.verify, "fp32", runtime, references={},
                           batch_size=20, what="onnx of resnet18")
    ref, labels = predict_all(TorchRunner(...), data.test, batch_size=256)    # the pieces
    report = compare("pytorch", "onnxruntime", ref.numpy(), cand.numpy(), labels.numpy(), recipe.verify.fp32)

This module runs the PyTorch side; the arithmetic (top-1/top-5 of each runner, the top-1 delta, argmax agreement,
max/mean absolute logit difference, McNemar, pass or fail against the recipe's [verify] tolerance for the
artifact's precision) is `kdforge.parity`, torch-free.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kdforge.data import ImageDataset, eval_batches
from kdforge.data.loader import read_batches
from kdforge.errors import VerificationError
from kdforge.fileio import read_json, write_json
from kdforge.layout import VERIFY
from kdforge.models import resolve_input_spec
from kdforge.parity import VerifyReport, compare
from kdforge.runners import Runner, TorchRunner
from kdforge.runtime import Runtime, out_of_memory_as_error

if TYPE_CHECKING:
    from kdforge.recipe import ModelConfig, VerifyConfig


def predict_all(
    runner: Runner, dataset: ImageDataset, batch_size: int, limit_batches: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of one runner on the dataset's evaluation batches (the same batches for every runner), and labels."""
    logits, labels = [], []
    batches = eval_batches(len(dataset), batch_size)[:limit_batches]
    # streamed data is decoded by the data's workers, ahead of the runner
    for idx, images in zip(batches, read_batches(dataset.images, batches), strict=True):
        logits.append(runner.predict(images))
        labels.append(dataset.labels[idx])
    return torch.cat(logits), torch.cat(labels)


def resolve_verify_batch(batch_size: int | None, cfg: ModelConfig) -> int:
    """`verify.batch_size`, or by default 256 images at inputs up to 64x64 and as many pixels a batch above (at 224:
    20 images; a batch of 256 there held about 1 GB of runner activations for nothing)."""
    if batch_size is not None:
        return batch_size
    size = resolve_input_spec(cfg).size
    return max(1, min(256, 256 * 64 * 64 // (size * size)))


def verify_runner(candidate: Runner, student: Callable[[], torch.nn.Module], data: ImageDataset,
                  checks: VerifyConfig, precision: str, runtime: Runtime, references: dict[Any, Any],
                  batch_size: int, what: str) -> VerifyReport:
    """Judge `candidate` against the PyTorch student (`student()` gives it, called only when its logits are not in
    `references` yet) on `data` (the test split) with the tolerance of `precision` in `checks` ([verify]).

    `references` (a dict the caller keeps for one student) holds the student's logits per (device, input spec,
    batch, limit), so verifying several formats runs the PyTorch student once, not once per format."""
    limit = checks.limit_batches
    key = (str(runtime.device), candidate.spec, batch_size, limit)
    with out_of_memory_as_error(
        f"verifying {what} on {runtime.device} at batch size {batch_size}",
        "lower verify.batch_size (or compare fewer batches with verify.limit_batches)",
    ):
        if key not in references:
            reference = TorchRunner(student(), candidate.spec, runtime)
            references[key] = (reference.name, *predict_all(reference, data, batch_size, limit))
        reference_name, ref, labels = references[key]
        cand, _ = predict_all(candidate, data, batch_size, limit)
        single, batched = one_per_call_agreement(candidate, data, cand, ref)
    report = compare(reference_name, candidate.name, ref.numpy(), cand.numpy(), labels.numpy(),
                     getattr(checks, precision))
    if single >= batched - MAX_ONE_PER_CALL_DROP:
        return replace(report, one_per_call_agreement=single)
    count = min(ONE_PER_CALL, len(cand))
    why = (f"one image per call (as the server's /predict runs it) answers unlike batches of {batch_size}: on the "
           f"first {count} test images, top-1 agreement with PyTorch {single:.2%} one per call, {batched:.2%} in "
           f"batches")
    return replace(report, one_per_call_agreement=single, passed=False, failures=[*report.failures, why])


# a file is also run one image per call on the first test images, as a server runs /predict: its top-1 agreement
# with PyTorch there may not fall more than MAX_ONE_PER_CALL_DROP below its agreement on the same images in batches
# (INT8 kernels for one image and for batches round differently: a few low-margin images flip). OpenVINO 2026.4's
# dynamic-batch INT8 CPU kernels fell from 82.1% to 15.8% on an AVX-512/AMX Xeon (kdforge/sessions.py)
ONE_PER_CALL = 64
MAX_ONE_PER_CALL_DROP = 0.1


def one_per_call_agreement(candidate: Runner, data: ImageDataset, batched: torch.Tensor,
                           reference: torch.Tensor) -> tuple[float, float]:
    """On the first ONE_PER_CALL test images: the candidate's top-1 agreement with `reference` run one image per
    call, and in batches (`batched`: its logits on the split, in order)."""
    count = min(ONE_PER_CALL, len(batched))
    images = next(iter(read_batches(data.images, [torch.arange(count)])))
    single = torch.cat([candidate.predict(images[i:i + 1]) for i in range(count)])
    expected = reference[:count].argmax(1)
    return (float((single.argmax(1) == expected).float().mean()),
            float((batched[:count].argmax(1) == expected).float().mean()))


def record_verification(export_dir: Path, name: str, entry: dict[str, Any], report: VerifyReport,
                        started: float) -> None:
    """Add format `name`'s report (with the artifact it judged, metadata.json's `entry`) to verify.json."""
    # verified_at: each verification is a new record, never byte-equal to the one before (a rewrite that found
    # the same bytes would skip the write, and a full or read-only disk would go unreported)
    record = {**report.to_dict(), "format": name, "artifact": entry["file"], "artifact_sha256": entry["sha256"],
              "seconds": round(time.perf_counter() - started, 3),
              "verified_at": datetime.now(timezone.utc).isoformat(timespec="microseconds")}
    if "method" in entry:  # how an INT8 file was made (ptq, bias_correction, accuracy_aware, qad)
        record["method"] = entry["method"]
    write_json(export_dir / VERIFY, {**read_json(export_dir / VERIFY), name: record})


def verification_failed(artifact: Path, report: VerifyReport) -> VerificationError:
    return VerificationError(f"{artifact} FAILED verification against the PyTorch student: "
                             + "; ".join(report.failures), report)
