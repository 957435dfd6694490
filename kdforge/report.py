"""A run's report: `runs/<name>/report/report.md` and `report.html` (the same content) with PNG plots.

    paths = write_report(Path("runs/quickstart"))   # -> ReportPaths(markdown=..., html=..., plots=[...])

It holds the summary in the columns of the reference experiments (experiment, teacher, student, baseline ->
distilled top-1), training curves (loss and test top-1 per epoch for teacher, baseline and distilled student),
and for the export: size per format and, once `kdforge bench` has measured it, accuracy against latency.
Everything is read from files the other commands wrote (result.json, metrics.jsonl, the export's
metadata.json, verify.json and bench.json); nothing is re-measured here. Plots use matplotlib's object API
(no pyplot, no global backend).
"""

from __future__ import annotations

import html
import io
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdforge import layout
from kdforge.device import device_verdicts
from kdforge.errors import CheckpointError
from kdforge.fileio import atomic_write_text, read_json, write_bytes
from kdforge.formats import FORMATS
from kdforge.layout import TRAINING_STAGES
from kdforge.locate import export_dir_of_run

LABELS = {"teacher": "teacher", "baseline": "baseline", "student": "distilled"}


@dataclass(frozen=True)
class ReportPaths:
    markdown: Path
    html: Path
    plots: list[Path]


def epoch_curves(metrics: Path) -> dict[str, Any]:
    """Per epoch from a stage's metrics.jsonl: mean training loss, and the loss and top-1 of the split evaluated
    at each epoch end ("split": val when the run held out a validation split, else test)."""
    train: dict[int, list[float]] = defaultdict(list)
    evals: dict[str, dict[int, dict[str, float]]] = defaultdict(dict)
    for line in metrics.read_text().splitlines() if metrics.is_file() else []:
        event = json.loads(line)
        if event.get("event") == "log" and "loss" in event:
            train[event["epoch"] + 1].append(event["loss"])  # logged during epoch N (0-based) -> epoch N+1
        elif event.get("event") == "eval":
            evals[event.get("split", "test")][event["epoch"]] = event
    split = "val" if evals.get("val") else "test"
    per_epoch = evals.get(split, {})
    epochs = sorted(per_epoch)
    return {
        "split": split,
        "epoch": epochs,
        "train_loss": [sum(train[e]) / len(train[e]) if train[e] else float("nan") for e in epochs],
        "eval_loss": [per_epoch[e].get("loss", float("nan")) for e in epochs],
        "eval_top1": [per_epoch[e]["top1"] * 100 for e in epochs],
    }


def _stage_results(run_dir: Path) -> dict[str, dict[str, Any]]:
    results = {stage: read_json(run_dir / stage / layout.RESULT) for stage in TRAINING_STAGES}
    teacher_eval = read_json(run_dir / layout.TEACHER_EVAL / layout.RESULT)  # a teacher given by checkpoint
    if not results["teacher"] and teacher_eval:
        results["teacher"] = teacher_eval
    return {stage: result for stage, result in results.items() if result}


def save_figure(fig, path: Path) -> None:
    """The figure as a PNG at `path`, written atomically and only when its pixels or labels changed."""
    png = io.BytesIO()
    fig.savefig(png, format="png")
    write_bytes(path, png.getvalue())


def _figure(width: float = 6.4, height: float = 4.0):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def evaluated_split(curves: dict[str, dict[str, Any]]) -> str:
    """"validation" when the stages were evaluated on a validation split at each epoch end, else "test"."""
    return "validation" if any(curve["split"] == "val" for curve in curves.values()) else "test"


def plot_curves(curves: dict[str, dict[str, Any]], path: Path) -> Path:
    fig = _figure(10, 4)
    loss_ax, top1_ax = fig.subplots(1, 2)
    colors = {"teacher": "tab:blue", "baseline": "tab:gray", "student": "tab:orange"}
    for stage, curve in curves.items():
        color = colors[stage]
        loss_ax.plot(curve["epoch"], curve["train_loss"], "-o", color=color, label=f"{LABELS[stage]} train")
        loss_ax.plot(curve["epoch"], curve["eval_loss"], "--", color=color, label=f"{LABELS[stage]} {curve['split']}")
        top1_ax.plot(curve["epoch"], curve["eval_top1"], "-o", color=color, label=LABELS[stage])
    split = evaluated_split(curves)
    loss_ax.set(xlabel="epoch", ylabel="loss", title="loss per epoch")
    top1_ax.set(xlabel="epoch", ylabel=f"{split} top-1 (%)", title=f"{split} top-1 per epoch")
    loss_ax.legend(fontsize="small")
    top1_ax.legend(fontsize="small")
    save_figure(fig, path)
    return path


def plot_accuracy_latency(rows: list[dict[str, Any]], path: Path) -> Path:
    fig = _figure()
    ax = fig.subplots()
    for row in rows:
        if row.get("top1") is None:
            continue
        ax.scatter(row["latency_p50_ms"], row["top1"] * 100, s=60)
        ax.annotate(row["format"], (row["latency_p50_ms"], row["top1"] * 100), textcoords="offset points",
                    xytext=(6, 4))
    ax.set(xlabel="latency at batch 1, p50 (ms)", ylabel="test top-1 (%)", title="accuracy vs latency per format")
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    save_figure(fig, path)
    return path


def _named_points(ax, points: list[tuple[str, float, float, str]]) -> None:
    """One labelled dot per (name, x, y, color)."""
    for name, x, y, color in points:
        ax.scatter(x, y, color=color, s=45)
        ax.annotate(name, (x, y), fontsize=7, textcoords="offset points", xytext=(4, 3))


def _finished(fig, ax, path: Path) -> Path:
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    save_figure(fig, path)
    return path


def plot_candidates(search: dict[str, Any], path: Path) -> Path:
    """The student search's candidates (students.json): latency against file size, the budget as a line, those
    within it green, the chosen one red."""
    fig = _figure()
    ax = fig.subplots()
    settings = search["settings"]
    winner = _name(search["winner"]) if search.get("winner") else None
    _named_points(ax, [(_name(row), row["bytes"] / 1e6, row["latency_p50_ms"],
                        "tab:red" if _name(row) == winner else "tab:green" if row["fits"] else "tab:gray")
                       for row in search["rows"]])
    ax.axhline(settings["budget_ms"], color="tab:red", linestyle="--", linewidth=1, label="budget")
    ax.set(xlabel=f"{settings['format']} file (MB)", ylabel=f"p50 latency at batch {settings['batch']} (ms)",
           title=f"student candidates at {_sizes(search)}")
    ax.set_ylim(bottom=0)
    return _finished(fig, ax, path)


def plot_race(search: dict[str, Any], path: Path) -> Path:
    """The race's Pareto view: each raced candidate's latency on the target against its validation top-1 in the
    first round (all raced the same steps there), the chosen one red."""
    fig = _figure()
    ax = fig.subplots()
    first = search["race"][0]
    winner = _name(search["winner"]) if search.get("winner") else None
    latency = {_name(row): row["latency_p50_ms"] for row in search["rows"]}
    _named_points(ax, [(model, latency[model], top1 * 100, "tab:red" if model == winner else "tab:blue")
                       for model, top1 in first["val_top1"].items()])
    ax.axvline(search["settings"]["budget_ms"], color="tab:red", linestyle="--", linewidth=1, label="budget")
    ax.set(xlabel=f"p50 latency on the target ({search['settings']['format']}, ms)",
           ylabel=f"validation top-1 after {first['steps']} steps (%)", title="the race: accuracy vs latency")
    ax.set_xlim(left=0)
    return _finished(fig, ax, path)


def _name(row: dict[str, Any]) -> str:
    """A candidate's label: "model@size" in a search over several sizes, the model alone otherwise."""
    return row.get("name") or row["model"]


def _sizes(search: dict[str, Any]) -> str:
    sizes = sorted({row.get("input_size") or search["input_size"] for row in search["rows"]}) or [search["input_size"]]
    return ", ".join(f"{size}x{size}" for size in sizes)


def plot_sizes(sizes: dict[str, int], path: Path) -> Path:
    fig = _figure()
    ax = fig.subplots()
    names = list(sizes)
    megabytes = [sizes[n] / 1e6 for n in names]
    bars = ax.bar(names, megabytes, color="tab:blue")
    ax.bar_label(bars, labels=[f"{mb:.2f}" for mb in megabytes])
    ax.set(ylabel="file size (MB)", title="size per format")
    save_figure(fig, path)
    return path


class Document:
    """Markdown and HTML written side by side from the same calls, so the two always hold the same content."""

    def __init__(self, title: str) -> None:
        self.md = [f"# {title}", ""]
        self.html = [f"<h1>{html.escape(title)}</h1>"]
        self.title = title

    def heading(self, text: str) -> None:
        self.md += [f"## {text}", ""]
        self.html.append(f"<h2>{html.escape(text)}</h2>")

    def paragraph(self, text: str) -> None:
        self.md += [text, ""]
        self.html.append(f"<p>{html.escape(text)}</p>")

    def table(self, headers: list[str], rows: list[list[str]]) -> None:
        self.md += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        self.md += ["| " + " | ".join(row) + " |" for row in rows] + [""]
        head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
        self.html.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")

    def image(self, path: Path, alt: str) -> None:
        self.md += [f"![{alt}]({path.name})", ""]
        self.html.append(f'<p><img src="{html.escape(path.name)}" alt="{html.escape(alt)}"></p>')

    def render_html(self) -> str:
        style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
                 "td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}td:first-child{text-align:left}"
                 "img{max-width:100%}")
        return (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{html.escape(self.title)}</title>"
                f"<style>{style}</style></head><body>\n" + "\n".join(self.html) + "\n</body></html>\n")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.2f}"


def _model_cell(result: dict[str, Any] | None) -> str:
    return f"{result['model']} ({result['params'] / 1e6:.1f}M, top-1 {result['top1'] * 100:.2f})" if result else "-"


def write_report(run_dir: Path) -> ReportPaths:
    """Write runs/<name>/report/{report.md, report.html, *.png} from what the run and its export hold."""
    results = _stage_results(run_dir)
    if not results:
        raise CheckpointError(f"{run_dir}: no finished stage to report on (no result.json); run `kdforge distill`")
    out = run_dir / layout.REPORT
    out.mkdir(parents=True, exist_ok=True)
    doc = Document(f"kdforge report: {run_dir.name}")
    plots: list[Path] = []

    teacher, baseline, student = (results.get(s) for s in TRAINING_STAGES)
    doc.heading("Summary")
    transfer = f"{_pct(baseline and baseline['top1'])} -> {_pct(student and student['top1'])}"
    doc.table(["experiment", "teacher", "student", "baseline -> distilled top-1"],
              [[run_dir.name, _model_cell(teacher), _model_cell(student or baseline), transfer]])
    doc.paragraph("Test-split top-1 in percent; each stage's final weights (never selected on the test split).")
    held = max((result.get("val_images", 0) for result in results.values()), default=0)
    doc.paragraph(f"The validation split ({held} images held out of the training split, `[data] val_fraction`) "
                  f"chose each stage's `best` checkpoint and judged INT8's accuracy-aware search; the test split "
                  f"only reports." if held else "No validation split (`[data] val_fraction = 0`): the per-epoch "
                  "curves and `best` are on the test split (reported only, never used to choose weights), and "
                  "INT8's accuracy-aware search is judged on held-out training images.")

    curves = {stage: epoch_curves(run_dir / stage / layout.METRICS) for stage in TRAINING_STAGES if stage in results}
    curves = {stage: curve for stage, curve in curves.items() if curve["epoch"]}
    if curves:
        doc.heading("Training")
        plots.append(plot_curves(curves, out / layout.PLOTS["curves"]))
        doc.image(plots[-1], f"loss and {evaluated_split(curves)} top-1 per epoch")
    export_dir = export_dir_of_run(run_dir)
    doc.heading("Export")
    if export_dir is None:
        doc.paragraph("No export yet: run `kdforge export` (and `kdforge bench`) for sizes, accuracy and latency.")
    else:
        meta, verified = read_json(export_dir / layout.METADATA), read_json(export_dir / layout.VERIFY)
        bench = read_json(export_dir / layout.BENCH)
        measured = {row["format"]: row for row in bench.get("rows", [])}
        sizes = {"pytorch": measured["pytorch"]["bytes"]} if "pytorch" in measured else {}
        sizes.update({name: entry["bytes"] for name, entry in meta.get("formats", {}).items()
                      if not FORMATS.get(name).bench_skip})  # not a model file of its own (triton: the onnx)
        rows = []
        for name in sizes:
            timing, check = measured.get(name, {}), verified.get(name, {})
            top1 = timing.get("top1", check.get("candidate_top1"))
            passed = check.get("passed")
            rows.append([name, f"{sizes[name] / 1e6:.2f}", _pct(top1), _pct(check.get("agreement")),
                         "-" if passed is None else "PASS" if passed else "FAIL",
                         f"{timing['latency_p50_ms']:.2f}" if timing else "-",
                         f"{timing['latency_p95_ms']:.2f}" if timing else "-",
                         f"{timing['throughput']:.0f}" if timing else "-"])
        doc.table(["format", "size (MB)", "test top-1", "agreement", "verified", "p50 ms (batch 1)", "p95 ms",
                   f"images/s (batch {bench.get('settings', {}).get('batch_size', '-')})"], rows)
        steps = [(name, step) for name, entry in meta.get("formats", {}).items() for step in entry.get("steps", [])]
        if steps:
            doc.paragraph("INT8 quantization steps, each verified on the test split (McNemar p: the chance of a "
                          "split of changed answers this uneven if INT8 were as accurate as FP32):")
            doc.table(["format", "step", "top-1 change (points)", "agreement", "lost / gained images", "McNemar p",
                       "verified"],
                      [[name, step["step"], f"{step['top1_delta_points']:+.2f}", _pct(step["agreement"]),
                        f"{step['lost']} / {step['gained']}", f"{step['mcnemar_p']:.2g}",
                        "PASS" if step["passed"] else "FAIL"] for name, step in steps])
        if bench:
            machine = bench.get("machine", {})
            cpu = machine.get("cpu", machine.get("processor"))  # "processor": an older bench.json
            doc.paragraph(f"Measured by `kdforge bench` on {cpu} ({machine.get('cpu_count')} "
                          f"CPUs, {bench['settings'].get('threads')} threads, device {machine.get('device')}) "
                          f"at {bench.get('measured_at')}.")
            plots.append(plot_accuracy_latency(bench["rows"], out / layout.PLOTS["accuracy_latency"]))
            doc.image(plots[-1], "test top-1 against latency per format")
        else:
            doc.paragraph("Latency not measured yet: run `kdforge bench` and then `kdforge report` again.")
        plots.append(plot_sizes(sizes, out / layout.PLOTS["size"]))
        doc.image(plots[-1], "file size per format")
        device_section(doc, meta, verified, measured)

    plots += student_search_section(doc, run_dir / layout.STUDENTS, out)
    markdown, page = out / layout.REPORT_MD, out / layout.REPORT_HTML
    atomic_write_text(markdown, "\n".join(doc.md))
    atomic_write_text(page, doc.render_html())
    return ReportPaths(markdown, page, plots)


def device_section(doc: Document, meta: dict[str, Any], verified: dict[str, Any],
                   measured: dict[str, dict[str, Any]]) -> None:
    """Per device (`kdforge verify --device-report`): this host's and the device's verdict on the same file side by
    side, cold and sustained latency there, the memory the session added."""
    rows = []
    for name, entry in meta.get("formats", {}).items():
        host = verified.get(name, {})
        for where, there in device_verdicts(verified, name, entry["sha256"]).items():
            timing = measured.get(name, {})
            rows.append([where, name, _pct(host.get("candidate_top1")), _pct(there.get("candidate_top1")),
                         _pct(host.get("agreement")), _pct(there.get("agreement")),
                         "-" if there.get("top1_changed_vs_host") is None else str(there["top1_changed_vs_host"]),
                         f"{timing['latency_p50_ms']:.2f}" if timing else "-",
                         _ms(there.get("latency_cold_p50_ms")), _ms(there.get("latency_sustained_p50_ms")),
                         _ms(there.get("latency_sustained_p95_ms")),
                         "-" if there.get("memory_mb") is None else f"{there['memory_mb']:.0f}",
                         "PASS" if there.get("passed") else "FAIL"])
    if not rows:
        return
    doc.heading("On devices")
    doc.paragraph("Each file judged on the device by the torch-free probe (`python -m kdforge.serve.probe BUNDLE "
                  "--verify`) against the PyTorch student's logits on the bundle's test images, beside this host's "
                  "verdict on the whole test split; latency on the device at batch 1, cold (the first calls) and "
                  "sustained (the last window of its timed run).")
    doc.table(["device", "format", "top-1 host", "top-1 device", "agreement host", "agreement device",
               "top-1 changed vs host", "p50 ms host", "p50 ms cold", "p50 ms sustained", "p95 ms sustained",
               "memory MB", "on device"], rows)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def student_search_section(doc: Document, students: Path, out: Path) -> list[Path]:
    """How the student was chosen (runs/NAME/students/students.json, when the run has one): the candidates, the
    race, the budget on the chain's own file (budget.json)."""
    search, budget = read_json(students / layout.STUDENTS_RECORD), read_json(students / layout.BUDGET)
    if not search:
        return []
    settings, winner = search["settings"], (search.get("winner") or {}).get("model")
    doc.heading("Student search")
    measured = (search.get("profile") or {}).get("cpu") or search.get("machine", {}).get("cpu", "this machine")
    doc.paragraph(f"Candidates at {search['input_size']}x{search['input_size']}, exported to {settings['format']} "
                  f"and timed at batch {settings['batch']} on {measured}; budget {settings['budget_ms']:g} ms (p50).")
    reached = {model: top1 for entry in search.get("race", []) for model, top1 in entry["val_top1"].items()}
    doc.table(["model", "params (M)", "MMACs", "size (MB)", "p50 ms", "p95 ms", "within budget",
               "race validation top-1"],
              [[row["model"] + (" (chosen)" if row["model"] == winner else ""), f"{row['params'] / 1e6:.2f}",
                f"{row['macs'] / 1e6:.1f}", f"{row['bytes'] / 1e6:.2f}", f"{row['latency_p50_ms']:.2f}",
                f"{row['latency_p95_ms']:.2f}", "yes" if row["fits"] else "no",
                _pct(reached.get(row["model"]))] for row in search["rows"]])
    plots = []
    if search.get("race"):
        doc.paragraph("The race (successive halving on the validation split; each round trains its survivors from "
                      "their initial weights for twice the previous round's steps): " + "; ".join(
                          f"round {entry['round']}, {entry['steps']} steps: kept {', '.join(entry['kept'])}"
                          for entry in search["race"]) + ".")
        plots.append(plot_race(search, out / layout.PLOTS["race"]))
        doc.image(plots[-1], "validation top-1 against latency on the target, first round of the race")
    if budget:
        verdict = "met" if budget["met"] else "MISSED"
        doc.paragraph(f"Budget {verdict} by the chain's own file: {budget['model']} {budget['file']} p50 "
                      f"{budget['latency_p50_ms']:.2f} ms (p95 {budget['latency_p95_ms']:.2f}) against "
                      f"{budget['budget_ms']:g} ms, {budget['runtime']} on {budget['measured_on']}."
                      + (f" {budget['note']}." if budget.get("note") else ""))
    return plots


def plot_seeds(per_seed: list[dict[str, Any]], path: Path) -> Path:
    """Top-1 of teacher, baseline and distilled student per seed, each seed's baseline and student joined."""
    fig = _figure()
    ax = fig.subplots()
    seeds = [row["seed"] for row in per_seed]
    colors = {"teacher": "tab:blue", "baseline": "tab:gray", "student": "tab:orange"}
    for role in TRAINING_STAGES:
        ax.plot(seeds, [row[role] for row in per_seed], "o", color=colors[role], label=LABELS[role])
    for row in per_seed:
        ax.plot([row["seed"]] * 2, [row["baseline"], row["student"]], "-", color="tab:orange", alpha=0.4)
    ax.set(xlabel="seed", ylabel="test top-1 (%)", title="test top-1 per seed")
    ax.set_xticks(seeds)
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    save_figure(fig, path)
    return path


def write_seeds_report(group_dir: Path, summary: dict[str, Any]) -> Path:
    """runs/<name>/report/seeds.md (+ .html, seeds.png): a recipe run over several seeds (kdforge/seeds.py)."""
    out = group_dir / layout.REPORT
    out.mkdir(parents=True, exist_ok=True)
    doc = Document(f"kdforge report: {summary['recipe']} over {len(summary['seeds'])} seeds")
    doc.paragraph(summary["verdict"] + ".")
    rows = [[str(row["seed"]), *(f"{row[role]:.2f}" for role in TRAINING_STAGES), f"{row['gain']:+.2f}"]
            for row in summary["per_seed"]]
    stats, gain = summary["stats"], summary["gain"]
    rows.append(["mean +- sd", *(f"{stats[role]['mean']:.2f} +- {stats[role]['sd']:.2f}" for role in TRAINING_STAGES),
                 f"{gain['mean']:+.2f} +- {gain['sd']:.2f}"])
    doc.table(["seed", "teacher", "baseline", "distilled", "gain (points)"], rows)
    teacher = ("one teacher, trained with the first seed, for every seed (the spread is the students')"
               if summary["shared_teacher"] else "a teacher per seed (the spread includes the teacher's)")
    doc.paragraph(f"Test-split top-1 in percent. The gain is each seed's distilled student minus its baseline "
                  f"(both start from the same weights); its interval uses the t distribution over the per-seed "
                  f"gains. Teacher: {teacher}. Each seed's own report: "
                  f"runs/{summary['recipe']}-seed<s>/report/report.md.")
    doc.image(plot_seeds(summary["per_seed"], out / layout.PLOTS["seeds"]), "test top-1 per seed")
    markdown = out / layout.SEEDS_MD
    atomic_write_text(markdown, "\n".join(doc.md))
    atomic_write_text(out / layout.SEEDS_HTML, doc.render_html())
    return markdown
