"""Deployment formats side by side: PyTorch eager FP32, ONNX Runtime FP32 and ONNX Runtime INT8 (CPU).

    .venv/bin/python benchmarks/deployment.py --model resnet18 --size 224 --threads 2

For one model: export time, file sizes, and median latency at each batch size (default 1 and 32) for the three
runtimes with the same thread count and the same normalized input, as ratios to PyTorch and INT8 to FP32 ONNX.
Random weights (norm scales made non-zero); INT8 is calibrated on random inputs (latency and size do not depend
on either).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from kdforge.timing import time_calls


def median_seconds(fn, warmup: int, repeats: int) -> float:
    return statistics.median(time_calls(fn, warmup, repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--kwargs", nargs="*", default=[], help="timm model kwargs, e.g. img_size=32 patch_size=4")
    args = parser.parse_args()

    import onnxruntime as ort

    from kdforge.export.converters import onnx_to_int8, torch_to_onnx
    from kdforge.formats import INPUT_NAME
    from kdforge.models import create_model
    from kdforge.recipe import ModelConfig

    torch.set_num_threads(args.threads)
    kwargs = {k: int(v) for k, v in (kv.split("=") for kv in args.kwargs)}
    cfg = ModelConfig(model=args.model, input_size=args.size, model_kwargs=kwargs)
    model = create_model(cfg, num_classes=100, exportable=True).eval()
    # timm zero-initializes the last norm of each residual block; folded into the convolutions, those all-zero
    # weights would be deduplicated by the exporter and make the FP32 file unrealistically small
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)) and module.weight is not None:
                module.weight.uniform_(0.5, 1.5)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8 = Path(tmp) / "model.onnx", Path(tmp) / "model.int8.onnx"
        started = time.perf_counter()
        torch_to_onnx(model, args.size, fp32, opset=17, metadata={})
        export_s = time.perf_counter() - started
        rng = np.random.default_rng(0)
        calibration = [rng.standard_normal((8, 3, args.size, args.size), dtype=np.float32) for _ in range(4)]
        started = time.perf_counter()
        onnx_to_int8(fp32, int8, calibration, target="cpu")
        int8_s = time.perf_counter() - started
        sessions = {name: ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
                    for name, p in (("fp32", fp32), ("int8", int8))}
        print(f"{args.model} at {args.size}x{args.size}, {args.threads} threads, torch {torch.__version__}, "
              f"onnxruntime {ort.__version__}")
        print(f"export: torch_to_onnx {export_s:.2f} s, onnx_to_int8 {int8_s:.2f} s (incl. checks)")
        print(f"size: fp32 {fp32.stat().st_size / 1e6:.2f} MB, int8 {int8.stat().st_size / 1e6:.2f} MB, "
              f"fp32/int8 {fp32.stat().st_size / int8.stat().st_size:.2f}x")
        print(f"{'batch':>5} {'pytorch ms':>11} {'ort fp32 ms':>12} {'ort int8 ms':>12} {'fp32/pt':>8} "
              f"{'int8/pt':>8} {'int8/fp32':>10} {'int8 img/s':>11}")
        for batch in args.batches:
            x = torch.randn(batch, 3, args.size, args.size)
            feed = {INPUT_NAME: x.numpy().astype(np.float32)}
            with torch.inference_mode():
                t_pt = median_seconds(lambda x=x: model(x), args.warmup, args.repeats)
            t_fp32 = median_seconds(lambda f=feed: sessions["fp32"].run(None, f), args.warmup, args.repeats)
            t_int8 = median_seconds(lambda f=feed: sessions["int8"].run(None, f), args.warmup, args.repeats)
            print(f"{batch:>5} {t_pt * 1e3:>11.1f} {t_fp32 * 1e3:>12.1f} {t_int8 * 1e3:>12.1f} {t_fp32 / t_pt:>8.2f} "
                  f"{t_int8 / t_pt:>8.2f} {t_int8 / t_fp32:>10.2f} {batch / t_int8:>11.0f}")


if __name__ == "__main__":
    main()
