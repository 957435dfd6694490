"""PyTorch eager vs ONNX Runtime (CPU, FP32) on the same model: export time and latency at batch 1 and 32.

    .venv/bin/python benchmarks/onnx_vs_torch.py --model resnet18 --size 224 --threads 2

Random weights (latency does not depend on them). Both runtimes get the same thread count and the same
normalized input; each timing is the median of --repeats runs after --warmup runs. Prints the ratio
ONNX Runtime / PyTorch latency (below 1: ONNX Runtime is faster).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def median_seconds(fn, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    import onnxruntime as ort

    from kdforge.export.converters import INPUT_NAME, torch_to_onnx
    from kdforge.models import create_model
    from kdforge.recipe import ModelConfig

    torch.set_num_threads(args.threads)
    model = create_model(ModelConfig(model=args.model, input_size=args.size), num_classes=100, exportable=True).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        started = time.perf_counter()
        torch_to_onnx(model, args.size, path, opset=17, metadata={})
        export_s = time.perf_counter() - started
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        print(f"{args.model} at {args.size}x{args.size}, {args.threads} threads, torch {torch.__version__}, "
              f"onnxruntime {ort.__version__}")
        print(f"export (torch_to_onnx incl. checker and ORT check): {export_s:.2f} s, "
              f"{path.stat().st_size / 1e6:.1f} MB")
        print(f"{'batch':>5} {'pytorch ms':>11} {'onnxrt ms':>10} {'onnxrt/pytorch':>15}")
        for batch in args.batches:
            x = torch.randn(batch, 3, args.size, args.size)
            x_np = x.numpy().astype(np.float32)
            with torch.inference_mode():
                t_torch = median_seconds(lambda x=x: model(x), args.warmup, args.repeats)
            t_ort = median_seconds(lambda x_np=x_np: session.run(None, {INPUT_NAME: x_np}), args.warmup, args.repeats)
            print(f"{batch:>5} {t_torch * 1e3:>11.1f} {t_ort * 1e3:>10.1f} {t_ort / t_torch:>15.2f}")


if __name__ == "__main__":
    main()
