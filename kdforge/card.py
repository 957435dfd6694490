"""The model card of an export folder (exports/NAME/README.md, the Hugging Face card format) and what
`kdforge publish` uploads, written from the files the export holds alone (torch-free):

    card = write_model_card(Path("exports/quickstart"))     # README.md: YAML metadata + what was verified, how
    files = publish_files(Path("exports/quickstart"))        # {path in the repo: local file}: verified files only
    publish(Path("exports/quickstart"), "org/quickstart")    # huggingface_hub: one commit of exactly those files

The card's `model-index` holds, per format that passed verification, its test top-1 and its top-1 agreement with
the PyTorch student (verify.json), and the device verdicts verify.json holds; the body says
which recipe, teacher and student, input size, the latency table of bench.json, and how it was verified. A card
is written again whenever the files it reads change (export, `kdforge verify`, `kdforge bench`, `kdforge publish`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdforge import device, layout
from kdforge.errors import KdforgeError
from kdforge.fileio import atomic_write_text, read_json, read_metadata
from kdforge.formats import FORMATS

CARD = "README.md"
HUB_DATASETS = {"cifar100": ("cifar100", "CIFAR-100")}  # kdforge dataset -> (Hub dataset id, name)


class PublishError(KdforgeError):
    """Nothing was uploaded: no network, no token, or a folder without a verified file."""


def read_records(export_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The export's metadata.json and verify.json (empty when nothing was verified), read once per card."""
    verified = read_json(export_dir / layout.VERIFY) if (export_dir / layout.VERIFY).is_file() else {}
    return read_metadata(export_dir), verified


def verified_formats(meta: dict[str, Any], verified: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The formats whose current file passed verification: {format: its verify.json entry}."""
    return {name: report for name, report in verified.items()
            if report.get("passed") and name in meta["formats"]
            and report.get("artifact_sha256") == meta["formats"][name]["sha256"]}


def run_recipe(meta: dict[str, Any]) -> tuple[Path | None, dict[str, Any]]:
    """The recipe the export's run was trained from (its path and contents), when the run is still there."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    path = Path(meta["run"]) / layout.RECIPE
    try:
        return path, tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, {}


def card_data(meta: dict[str, Any], verified: dict[str, Any], recipe: dict[str, Any]) -> dict[str, Any]:
    """The card's YAML metadata (a dict huggingface_hub's ModelCardData reads)."""
    dataset = recipe.get("data", {}).get("dataset", "synthetic")
    hub_id, dataset_name = HUB_DATASETS.get(dataset, (dataset, dataset))
    metrics = []
    for name, report in verified_formats(meta, verified).items():
        metrics += [{"type": "accuracy", "value": round(100 * report["candidate_top1"], 2),
                     "name": f"test top-1 ({name}, {report['candidate']})"},
                    {"type": "agreement", "value": round(100 * report["agreement"], 2),
                     "name": f"top-1 agreement with the PyTorch student ({name})"}]
    for row in device_rows(meta, verified):
        metrics.append({"type": "agreement", "value": round(100 * row["agreement"], 2),
                        "name": f"top-1 agreement on {row['device']} ({row['format']}, {row['runtime']})"})
    data: dict[str, Any] = {
        "library_name": "onnx", "pipeline_tag": "image-classification",
        "tags": sorted({"kdforge", "knowledge-distillation", "image-classification", "timm",
                        *(FORMATS.get(name).precision for name in meta["formats"] if name in FORMATS)}),
        "model-index": [{"name": meta["recipe"], "results": [{
            "task": {"type": "image-classification", "name": "Image Classification"},
            "dataset": {"type": hub_id, "name": dataset_name, "split": "test"},
            "metrics": metrics}]}],
    }
    if dataset in HUB_DATASETS:
        data["datasets"] = [hub_id]
    return data


def device_rows(meta: dict[str, Any], verified: dict[str, Any]) -> list[dict[str, Any]]:
    """The device verdicts verify.json holds for the export's current files (`kdforge verify --device-report`)."""
    return [{"device": name, "format": fmt, "runtime": record.get("runtime") or "?", "passed": record["passed"],
             "agreement": record.get("agreement") or 0.0}
            for fmt, entry in meta["formats"].items()
            for name, record in device.device_verdicts(verified, fmt, entry["sha256"]).items()]


def card_text(export_dir: Path) -> str:
    """The whole card: YAML front matter, then what the export is and how it was verified."""
    import yaml

    meta, records = read_records(export_dir)
    recipe_path, recipe = run_recipe(meta)
    verified = verified_formats(meta, records)
    teacher = recipe.get("teacher", {}).get("model", "?")
    lines = [f"# {meta['recipe']}: {meta['model']}", "",
             f"A {meta['model']} student ({meta['stage']} stage) distilled by kdforge from a {teacher} teacher, "
             f"{meta['input_size']}x{meta['input_size']} RGB input normalized with mean {meta['mean']} and std "
             f"{meta['std']}, {meta['num_classes']} classes (the labels are in metadata.json).", "",
             "## Verified files", "",
             "Each file's answers on the test split were compared with the PyTorch student's (kdforge's judge: top-1, "
             "agreement, largest logit difference, McNemar's test against a tolerance); only files that passed are "
             "listed and published.", "",
             "| format | file | runtime | test top-1 | PyTorch top-1 | agreement | max abs logit diff | images |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in verified.items():
        lines.append(f"| {name} | {meta['formats'][name]['file']} | {r['candidate']} "
                     f"| {100 * r['candidate_top1']:.2f}% | {100 * r['reference_top1']:.2f}% "
                     f"| {100 * r['agreement']:.2f}% | {r['max_abs_diff']:.3g} | {r['count']} |")
    if not verified:
        lines.append("| (none passed) | | | | | | | |")
    rows = device_rows(meta, records)
    if rows:
        lines += ["", "## On the device", "", "| device | format | runtime | passed | agreement |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['device']} | {r['format']} | {r['runtime']} | {'yes' if r['passed'] else 'no'} | "
                  f"{100 * r['agreement']:.2f}% |" for r in rows]
    bench = read_json(export_dir / layout.BENCH) if (export_dir / layout.BENCH).is_file() else None
    if bench:
        lines += ["", f"## Latency ({bench['machine'].get('cpu', '?')}, {bench['settings'].get('threads')} threads)",
                  "", "| format | runtime | p50 ms (batch 1) | p95 ms | images/s |", "|---|---|---|---|---|"]
        lines += [f"| {r['format']} | {r['runtime']} | {r['latency_p50_ms']:.2f} | {r['latency_p95_ms']:.2f} | "
                  f"{r['throughput']:.0f} |" for r in bench["rows"]]
    lines += ["", "## How it was made", "",
              f"- recipe: `{recipe_path.name if recipe_path else '(the run folder is gone)'}` (published beside this "
              f"card), recipe hash {meta['recipe_hash']}",
              f"- kdforge {meta['kdforge_version']}, torch {meta['torch_version']}, timm {meta['timm_version']}, "
              f"ONNX opset {meta['opset']}, exported {meta['exported_at']}",
              f"- serve it: `kdforge serve FOLDER` or the kdforge container (HTTP /predict and the Open Inference "
              f"Protocol at /v2/models/{meta['recipe']}/infer)", ""]
    front = yaml.safe_dump(card_data(meta, records, recipe), sort_keys=False, allow_unicode=True)
    return f"---\n{front}---\n\n" + "\n".join(lines)


def write_model_card(export_dir: Path) -> Path:
    path = Path(export_dir) / CARD
    atomic_write_text(path, card_text(Path(export_dir)))
    return path


def publish_files(export_dir: Path) -> dict[str, Path]:
    """What `kdforge publish` uploads: {path in the repository: local file}. The card, the export's records
    (metadata, verify with the device verdicts, bench), each verified file, and the run's recipe; never anything else of
    the runs folder (checkpoints, logs) and never a file that did not pass verification."""
    export_dir = Path(export_dir)
    meta, records = read_records(export_dir)
    verified = verified_formats(meta, records)
    if not verified:
        raise PublishError(f"{export_dir} holds no verified file: run `kdforge verify {export_dir}` first")
    files = {CARD: export_dir / CARD}
    for record in (layout.METADATA, layout.VERIFY, layout.BENCH):
        if (export_dir / record).is_file():
            files[record] = export_dir / record
    for name in verified:
        file = meta["formats"][name]["file"]
        files[file] = export_dir / file
    recipe_path, _ = run_recipe(meta)
    if recipe_path is not None:
        files[layout.RECIPE] = recipe_path
    return files


def check_repo(repo: str) -> None:
    if repo.count("/") != 1 or not all(part.strip() for part in repo.split("/")):
        raise PublishError(f"--repo must be ORG/NAME (a Hugging Face model repository), got {repo!r}")


def publish(export_dir: Path, repo: str, private: bool = False, token: str | None = None) -> str:
    """Upload `publish_files` to the Hub model repository `repo` (created if missing) in one commit; returns the
    commit's URL. Nothing is uploaded unless every file is read and the Hub answers."""
    from huggingface_hub import CommitOperationAdd, HfApi

    check_repo(repo)
    write_model_card(export_dir)
    files = publish_files(export_dir)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in files.items()]
    api = HfApi(token=token)
    try:
        api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
        commit = api.create_commit(repo, operations, commit_message=f"kdforge: {Path(export_dir).name}")
    except Exception as exc:  # huggingface_hub's HTTP, offline and token errors, and the network's
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise PublishError(f"nothing was uploaded to {repo}: {reason} ({len(files)} files were ready: "
                           f"{', '.join(files)})") from None
    return commit.commit_url
