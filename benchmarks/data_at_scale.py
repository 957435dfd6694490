"""Users' own photos at real size: the streaming data path's speed, the training step's wait for data, and the
whole chain's wall time and peak memory, on a generated folder of JPEG photos.

    .venv/bin/python benchmarks/data_at_scale.py throughput --images 2000 --workers 2
    .venv/bin/python benchmarks/data_at_scale.py throughput --images 200 --photo-size 4032x3024 --batches 6
    .venv/bin/python benchmarks/data_at_scale.py throughput --images 2000 --max-size 320
    .venv/bin/python benchmarks/data_at_scale.py remote --images 2000 --workers 2     # local vs HTTP shards (nginx)
    .venv/bin/python benchmarks/data_at_scale.py train-wait --steps 12 --workers 2
    .venv/bin/python benchmarks/data_at_scale.py decode --device cuda --workers 8      # a GPU: nvJPEG vs workers
    .venv/bin/python benchmarks/data_at_scale.py train-wait --device cuda --decode gpu --workers 8
    .venv/bin/python benchmarks/data_at_scale.py chain --images 5000 [--streamed] [--src OTHER_CHECKOUT]

The photo folder (default data/photos-<N>: 10 classes, 80% train / 20% test, 500x375 JPEGs of about 75 KB made by
`kdforge.data.synthetic.write_photo_folder`) is generated on first use. Above 5,000 images the extra ones are
hard links to the first 5,000 under new names (same bytes, new files: what the data path's memory depends on).

- throughput: training images/s at 224 (RandomResizedCrop + flip, uint8) of kdforge's streaming path
  (`FileImages.views` in `prefetch` workers) vs torchvision's `ImageFolder` + `DataLoader` with timm's transform,
  same workers, same images, same batch size. `--photo-size 4032x3024`: a folder of 12-megapixel photos (what
  phones take) instead of 500x375. `--max-size N`: kdforge reads WebDataset shards written by `kdforge data shard
  --max-size N` of the folder (written first, not timed), torchvision the folder itself. `--src`: another
  checkout's kdforge streams (a before/after on one machine).
- remote: the photo folder's shards (`kdforge data shard`, with index.json) read locally and served by nginx on
  127.0.0.1 (range requests): training images/s of the same views, batches and workers.
- decode: the same views made by the workers (`[data] decode = "cpu"`) against planned by them and decoded in
  batches on --device (`decode = "gpu"`: nvJPEG through torchvision on CUDA): images/s. `--device cpu` runs the
  same path on the CPU (torchvision's libjpeg-turbo in the training process), a check, not the GPU's number.
- train-wait: a resnet18 trained at 224 on the streamed folder (the real loop, `train_stage`): images/s and the
  share of step time spent waiting for batches (`data_wait` of the log lines), after the first logged window.
- chain: `kdforge distill` of a resnet10t teacher and a mobilenetv3_small_050 student at 224, 3 steps per stage,
  ONNX + INT8 exported and verified, as a subprocess: wall time, the peak RSS of its largest process
  (`getrusage(RUSAGE_CHILDREN)`, workers included) and the main process's peak anonymous and file-mapped memory
  (sampled from /proc: a mapped decode cache is page cache, shared and evictable, not memory the process owns).
  `--src` runs another checkout's kdforge on the same folder to compare versions; `--streamed` sets
  data.in_memory = false.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BASE = 5000
BOOTSTRAP = "import sys; sys.path.insert(0, {src!r}); sys.argv[0] = 'kdforge'; from kdforge.cli import app; app()"


def photo_folder(images: int, root: Path | None = None, size: tuple[int, int] = (500, 375)) -> Path:
    from kdforge.data.synthetic import write_photo_folder

    tag = "" if size == (500, 375) else f"-{size[0]}x{size[1]}"
    root = root or Path("data") / f"photos-{images}{tag}"
    if (root / "done").is_file():
        return root
    base = Path("data") / f"photos-{BASE}"
    if images <= BASE or tag:
        write_photo_folder(root, train=images * 4 // 5, test=images // 5, classes=10, size=size)
    else:
        photo_folder(BASE, base)
        for split in ("train", "test"):
            files = sorted((base / split).rglob("*.jpg"))
            for copy in range(images // BASE):
                for path in files:
                    target = root / split / path.parent.name / f"{copy}-{path.name}"
                    target.parent.mkdir(parents=True, exist_ok=True)
                    if not target.exists():
                        os.link(path, target)
    (root / "done").write_text("")
    return root


def cpu() -> str:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("model name")),
                 platform.processor())
    return f"{model}, {'AVX-512' if 'avx512f' in flags else 'AVX2' if 'avx2' in flags else 'no AVX2'}, " \
           f"{os.cpu_count()} cores"


def streamed_photos(args) -> dict:
    """The [data] section of the generated photo folder at 224, streamed by `args.workers` workers."""
    return {"dataset": "imagefolder", "root": str(photo_folder(args.images, size=photo_size(args))),
            "image_size": 224, "in_memory": False, "workers": args.workers}


def photo_size(args) -> tuple[int, int]:
    width, _, height = getattr(args, "photo_size", "500x375").partition("x")  # train-wait and chain: the default
    return int(width), int(height)


# kdforge's views of a batch list, in a process of its own (so --src can run another checkout's kdforge): images/s
STREAM = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
import torch
from kdforge.data import load_dataset
from kdforge.data.loader import prefetch
from kdforge.recipe import validate_recipe
data = load_dataset(validate_recipe(json.loads(sys.argv[2])).data)
batches = [torch.tensor(b) for b in json.loads(sys.argv[3])]
data.train.images.views(batches[0][:1], 0, 0)  # imports (timm, the decoders) before the workers fork, as the peer's
started = time.perf_counter()
for _ in prefetch(lambda idx: data.train.images.views(idx, 0, 0), batches, int(sys.argv[4])):
    pass
print(sum(len(b) for b in batches) / (time.perf_counter() - started))
"""


def throughput(args) -> None:
    import json

    import torch
    import torchvision

    from kdforge.data.stream import create_train_transform
    from kdforge.recipe import validate_recipe

    data = {**streamed_photos(args), "val_fraction": 0}
    folder_root = Path(data["root"])
    if args.max_size:  # kdforge reads shards of the folder with images stored at most max_size a side
        from kdforge.data.shards import write_shards

        data |= {"dataset": "webdataset", "root": str(folder_root.with_name(f"{folder_root.name}-max{args.max_size}"))}
        write_shards(folder_root, data["root"], max_size=args.max_size)
    recipe = validate_recipe({"name": "bench", "data": data})
    train_images = len(torchvision.datasets.ImageFolder(str(folder_root / "train")))
    order = torch.randperm(train_images, generator=torch.Generator().manual_seed(0))
    batches = list(order[: len(order) - len(order) % args.batch].split(args.batch))[: args.batches]
    count = sum(len(b) for b in batches)
    src = str(Path(args.src or Path(__file__).parents[1]).resolve())
    code = [sys.executable, "-c", STREAM, src, recipe.model_dump_json(), json.dumps([b.tolist() for b in batches]),
            str(args.workers)]
    ours = float(subprocess.run(code, capture_output=True, text=True, check=True).stdout.split()[-1])

    transform, _ = create_train_transform(recipe.data.augment, 224)
    folder = torchvision.datasets.ImageFolder(str(folder_root / "train"), transform=transform)
    loader = torch.utils.data.DataLoader(folder, batch_size=args.batch, num_workers=args.workers,
                                         sampler=[int(i) for b in batches for i in b])
    started = time.perf_counter()
    for _ in loader:
        pass
    peer = count / (time.perf_counter() - started)
    source = f"shards --max-size {args.max_size}" if args.max_size else "the folder"
    print(f"{count} training views at 224 (RandomResizedCrop + flip, uint8) of {args.photo_size} JPEGs, batch "
          f"{args.batch}, {args.workers} workers; {cpu()}; torch {torch.__version__}; kdforge from {src}")
    print(f"| path | images/s |\n|---|---|\n| kdforge streaming (FileImages.views) from {source} | {ours:.0f} |\n"
          f"| torchvision ImageFolder + DataLoader (timm's transform) from the folder | {peer:.0f} |\n"
          f"| ratio | {ours / peer:.2f}x |")


def remote_shards(args) -> None:
    """Local shards against the same shards served by nginx on 127.0.0.1 (range reads through index.json): images/s
    of the same training views, same batches, same workers. Loopback: the cost of the range requests themselves,
    not of a network."""
    import json
    import shutil
    import socket

    import torch

    from kdforge.data.shards import write_shards
    from kdforge.recipe import validate_recipe

    folder_root = Path(streamed_photos(args)["root"])
    shards = folder_root.with_name(f"{folder_root.name}-shards")
    write_shards(folder_root, shards)  # written once (kept on later runs), with its index.json
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    with tempfile.TemporaryDirectory(prefix="kdforge-nginx-") as work, socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        temp = "".join(f"{kind}_temp_path {work}/{kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi",
                                                                          "scgi"))
        Path(work, "nginx.conf").write_text(
            f"daemon off;\npid {work}/nginx.pid;\nerror_log {work}/error.log;\nworker_processes 1;\n"
            + ("user root;\n" if os.geteuid() == 0 else "") + "events {}\n"
            f"http {{\n access_log off;\n {temp} server {{ listen 127.0.0.1:{port}; root {shards.parent.resolve()}; "
            f"location / {{ }} }}\n}}\n")
        index = json.loads((shards / "index.json").read_text())
        train_images = sum(len(shard["samples"]) for shard in index["splits"]["train"])
        order = torch.randperm(train_images, generator=torch.Generator().manual_seed(0))
        batches = list(order[: len(order) - len(order) % args.batch].split(args.batch))[: args.batches]
        count = sum(len(b) for b in batches)
        server = subprocess.Popen([nginx, "-c", f"{work}/nginx.conf", "-p", work])
        try:
            time.sleep(1.0)
            rates = {}
            for label, root in (("local shards", str(shards)), ("HTTP shards (nginx, loopback)",
                                                                f"http://127.0.0.1:{port}/{shards.name}")):
                data = {"dataset": "webdataset", "root": root, "image_size": 224, "in_memory": False,
                        "workers": args.workers, "val_fraction": 0}
                recipe = validate_recipe({"name": "bench", "data": data})
                code = [sys.executable, "-c", STREAM, str(Path(__file__).parents[1].resolve()),
                        recipe.model_dump_json(), json.dumps([b.tolist() for b in batches]), str(args.workers)]
                done = subprocess.run(code, capture_output=True, text=True)
                if done.returncode:
                    sys.exit(f"{label}: the reader failed:\n{done.stderr[-3000:]}")
                rates[label] = float(done.stdout.split()[-1])
        finally:
            server.terminate()
            server.wait(10)
    print(f"{count} training views at 224 (RandomResizedCrop + flip, uint8) of {args.photo_size} JPEGs, batch "
          f"{args.batch}, {args.workers} workers; {cpu()}; torch {torch.__version__}")
    print("| shards | images/s |\n|---|---|")
    for label, rate in rates.items():
        print(f"| {label} | {rate:.0f} |")
    print(f"| ratio | {rates['HTTP shards (nginx, loopback)'] / rates['local shards']:.2f}x |")


def train_wait(args) -> None:
    import torch

    from kdforge.recipe import validate_recipe
    from kdforge.train.stages import train_stage

    recipe = validate_recipe({
        "name": "wait", "data": {**streamed_photos(args), "decode": args.decode},
        "runtime": {"device": args.device, "threads": args.threads},
        "train": {"epochs": 1, "batch_size": args.batch, "max_steps": args.steps, "log_every": args.steps // 3,
                  "limit_eval_batches": 1},
        "teacher": {"model": "resnet18"}, "student": {"model": "resnet18"},
    })
    events = []
    with tempfile.TemporaryDirectory() as runs:
        train_stage(recipe, "teacher", runs_dir=runs, consumers=[events.append])
    logs = [e for e in events if e["event"] == "log"][1:]  # after the first window (workers starting)
    wait = sum(e["data_wait"] for e in logs) / len(logs)
    rate = sum(e["images_per_s"] for e in logs) / len(logs)
    print(f"resnet18 at 224 on {args.device}, batch {args.batch}, {args.threads} torch threads, {args.workers} "
          f"workers, decode on the {args.decode}; {cpu()}; torch {torch.__version__}")
    print(f"| steps | images/s | data wait (share of step time) |\n|---|---|---|\n"
          f"| {args.steps} | {rate:.1f} | {wait:.1%} |")


def decode(args) -> None:
    """Streamed training views at 224 made by the workers (decode = "cpu") against planned by the workers and
    decoded in batches on `--device` (decode = "gpu": nvJPEG on CUDA): images/s over the same batches."""
    import torch

    from kdforge.data import load_dataset
    from kdforge.data.crops import finish_views
    from kdforge.data.loader import prefetch
    from kdforge.recipe import validate_recipe

    device = torch.device(args.device)
    rates = {}
    for where in ("cpu", "gpu"):
        data = load_dataset(validate_recipe({"name": "bench", "data": {**streamed_photos(args), "decode": where,
                                                                       "val_fraction": 0}}).data)
        images = data.train.images
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
        batches = list(order[: len(order) - len(order) % args.batch].split(args.batch))[: args.batches]
        make = images.plans if where == "gpu" else images.views
        finish = (lambda plans: finish_views(plans, 224, device)) if where == "gpu" else \
            (lambda views: views.to(device))
        finish(make(batches[0][:2], 0, 0))  # imports and, on CUDA, the decoder's start-up
        started = time.perf_counter()
        for item in prefetch(lambda idx, make=make: make(idx, 0, 0), batches, args.workers):
            finish(item)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates[where] = sum(len(b) for b in batches) / (time.perf_counter() - started)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu()
    print(f"{sum(len(b) for b in batches)} training views at 224 (RandomResizedCrop + flip) of {args.photo_size} "
          f"JPEGs, batch {args.batch}, {args.workers} workers, device {args.device} ({name}); "
          f"torch {torch.__version__}")
    print(f"| decode | images/s |\n|---|---|\n| workers (decode = \"cpu\") | {rates['cpu']:.0f} |\n"
          f"| batched on {args.device} (decode = \"gpu\") | {rates['gpu']:.0f} |\n| ratio | "
          f"{rates['gpu'] / rates['cpu']:.2f}x |")


def chain(args) -> None:
    root = photo_folder(args.images)
    with tempfile.TemporaryDirectory() as work:
        recipe = Path(work) / "photos.toml"
        recipe.write_text(
            f'name = "photos"\n[data]\ndataset = "imagefolder"\nroot = "{root.resolve()}"\nimage_size = 224\n'
            f'[runtime]\ndevice = "cpu"\nthreads = {args.threads}\n[train]\nepochs = 1\nbatch_size = 32\n'
            f'max_steps = 3\nlog_every = 1\n'
            + (f'limit_eval_batches = {args.eval_batches}\n' if args.eval_batches else '')
            + f'[teacher]\nmodel = "resnet10t"\n[student]\nmodel = "mobilenetv3_small_050"\n'
            f'[export]\nformats = ["onnx", "int8"]\ndir = "{work}/exports"\n[quantize]\nescalate = []\n'
            # what is measured is the data path: a 3-step student's INT8 accuracy is verified, not judged
            + '[verify]\nint8 = { max_top1_delta = 100.0 }\n'
            + (f'limit_batches = {args.verify_batches}\n' if args.verify_batches else ''))
        command = [sys.executable, "-m", "kdforge", "distill", str(recipe), "--runs-dir", f"{work}/runs"]
        if args.streamed:
            command += ["--set", "data.in_memory=false"]
        env = {**os.environ, "KDFORGE_CACHE_DIR": f"{work}/cache"}
        if args.src:  # that checkout's kdforge first on the path, before this one and the installed one
            command[1:3] = ["-c", BOOTSTRAP.format(src=str(Path(args.src).resolve()))]
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        peaks = {"RssAnon": 0, "RssFile": 0}
        while process.poll() is None:  # the main process's own memory, sampled: anonymous vs mapped files
            status = Path(f"/proc/{process.pid}/status")
            try:
                for line in status.read_text().splitlines():
                    key, _, value = line.partition(":")
                    if key in peaks:
                        peaks[key] = max(peaks[key], int(value.split()[0]) // 1024)
            except OSError:
                pass
            time.sleep(0.2)
        stdout, stderr = process.communicate()
        wall = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    if process.returncode:
        sys.exit(f"kdforge distill failed:\n{stderr[-3000:]}")
    how = next((line for line in stderr.splitlines() if line.startswith("ImageFolder")), "(not stated)")
    print(f"{args.images:,} JPEGs (500x375), 3 steps per stage, ONNX + INT8, {args.threads} threads; {cpu()}; "
          f"kdforge from {args.src or 'this checkout'}")
    print(f"data: {how}")
    print("| images | wall s | peak RSS MB (largest process) | main process: peak anonymous MB | peak mapped MB |\n"
          f"|---|---|---|---|---|\n| {args.images:,} | {wall:.0f} | {peak:.0f} | {peaks['RssAnon']} | "
          f"{peaks['RssFile']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("throughput", "remote", "decode", "train-wait", "chain"):
        p = sub.add_parser(name)
        p.add_argument("--images", type=int, default=BASE)
        p.add_argument("--workers", type=int, default=2)
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--batch", type=int, default=32)
    sub.choices["throughput"].add_argument("--batches", type=int, default=40)
    sub.choices["remote"].add_argument("--batches", type=int, default=40)
    sub.choices["remote"].add_argument("--photo-size", default="500x375", help="WIDTHxHEIGHT of the photos")
    sub.choices["throughput"].add_argument("--photo-size", default="500x375", help="WIDTHxHEIGHT of the photos")
    sub.choices["throughput"].add_argument("--max-size", type=int, help="read shards written with --max-size N")
    sub.choices["throughput"].add_argument("--src", help="another checkout whose kdforge streams")
    sub.choices["train-wait"].add_argument("--steps", type=int, default=12)
    sub.choices["train-wait"].add_argument("--decode", choices=["cpu", "gpu"], default="cpu")
    sub.choices["train-wait"].add_argument("--device", default="cpu")
    sub.choices["decode"].add_argument("--batches", type=int, default=40)
    sub.choices["decode"].add_argument("--photo-size", default="500x375", help="WIDTHxHEIGHT of the photos")
    sub.choices["decode"].add_argument("--device", default="cuda")
    sub.choices["chain"].add_argument("--streamed", action="store_true")
    sub.choices["chain"].add_argument("--src", help="another checkout whose kdforge runs the chain")
    sub.choices["chain"].add_argument("--eval-batches", type=int, default=None)
    sub.choices["chain"].add_argument("--verify-batches", type=int, default=None)
    args = parser.parse_args()
    commands = {"throughput": throughput, "remote": remote_shards, "decode": decode, "train-wait": train_wait,
                "chain": chain}
    commands[args.command](args)


if __name__ == "__main__":
    main()
