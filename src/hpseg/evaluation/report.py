"""``hpseg report``: evaluations of several seeds as one table a reviewer can check.

    hpseg report runs/coco-seeds --out report/

Collects ``results.json`` files (given directly, inside an evaluation folder, in a run's
``eval-*`` folders, or in the run folders one level below a sweep folder), groups them by CRF
setting, refuses to average evaluations whose configs differ in anything but the seed (naming
the keys) or whose checkpoints were chosen by different rules, and writes:

* ``report.md`` -- every metric as mean ± std over seeds (sample standard deviation, n - 1),
  min and max, with the selection rule, seeds, config and matching stated above the table;
* ``report.csv`` -- the same numbers, one row per (metric, CRF);
* ``curves.png`` -- the validation curves of every seed, from each run's ``metrics.jsonl``
  (needs matplotlib: ``pip install -e ".[viz]"``).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hpseg.errors import InvalidInputError
from hpseg.files import OutputFolder, atomic_write, holds_only, read_jsonl, write_text_atomic

__all__ = ["aggregate", "collect_results", "config_differences", "report_folder", "write_report"]

logger = logging.getLogger(__name__)

#: What a report writes into its folder.
REPORT_FILES = ("report.md", "report.csv", "curves.png")
#: config keys allowed to differ between the seeds of one report.
SEED_KEYS = frozenset({"train.seed", "train.run_name", "train.output_dir"})
#: result sections holding metrics (name in the table, key in results.json).
SECTIONS = (("HP", "hp"), ("HP, majority matching", "hp_majority"), ("baseline", "baseline"),
            ("baseline, majority matching", "baseline_majority"))


def collect_results(paths: Iterable[str | Path]) -> list[tuple[Path, dict[str, Any]]]:
    """(results.json path, its content) for every evaluation found under ``paths``."""
    found: list[Path] = []
    for item in map(Path, paths):
        if item.is_file():
            found.append(item)
        elif (item / "results.json").is_file():
            found.append(item / "results.json")
        elif item.is_dir():
            below = sorted(item.glob("eval-*/results.json")) or sorted(item.glob("*/eval-*/results.json"))
            if not below:
                raise FileNotFoundError(f"{item}: no results.json here, in eval-*/ nor in */eval-*/ "
                                        "(run `hpseg eval` on the run first)")
            found.extend(below)
        else:
            raise FileNotFoundError(f"{item} does not exist")
    out = []
    for path in dict.fromkeys(found):  # once each, in order
        try:
            results = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise InvalidInputError(f"{path} is not readable JSON: {error}") from None
        if not isinstance(results, dict) or "hp" not in results or "config" not in results:
            raise InvalidInputError(f"{path} is not the results.json of `hpseg eval` (no 'hp' or 'config' key)")
        _check_results(path, results)
        out.append((path, results))
    return out


def _check_results(path: Path, results: dict[str, Any]) -> None:
    """ValueError naming ``path`` and the entry when what the report reads is missing or mistyped."""
    config = results["config"]
    problems = []
    if not isinstance(config, dict) or not all(isinstance(entries, dict) for entries in config.values()):
        problems.append("'config' is not a mapping of sections")
    else:
        if not isinstance(config.get("backbone", {}).get("pretrained"), bool):
            problems.append("no 'config.backbone.pretrained' (true or false)")
        if not isinstance(config.get("method", {}).get("n_classes"), int):
            problems.append("no integer 'config.method.n_classes'")
    problems += [f"'{key}' is not a mapping of metrics" for _, key in SECTIONS
                 if key in results and not isinstance(results[key], dict)]
    if problems:
        raise InvalidInputError(f"{path}: {'; '.join(problems)} (hand-edited, or not written by `hpseg eval`)")


def _flatten(config: dict[str, Any]) -> dict[str, Any]:
    return {f"{section}.{key}": value for section, entries in config.items() for key, value in entries.items()}


def config_differences(configs: Sequence[dict[str, Any]]) -> list[str]:
    """The ``section.key`` names whose values differ between ``configs``, seed keys excluded."""
    flat = [_flatten(c) for c in configs]
    keys = sorted(set().union(*flat))
    return [k for k in keys if k not in SEED_KEYS and len({json.dumps(f.get(k)) for f in flat}) > 1]


def _check_configs(evaluations: list[tuple[Path, dict[str, Any]]]) -> None:
    differing = config_differences([r["config"] for _, r in evaluations])
    if differing:
        detail = "; ".join(f"{k}: " + ", ".join(sorted({json.dumps(_flatten(r['config']).get(k)) for _, r in evaluations}))
                           for k in differing)
        raise InvalidInputError(f"refusing to average runs whose configs differ in more than the seed: {detail}")


def _check_group(group: list[tuple[Path, dict[str, Any]]]) -> None:
    for field in ("checkpoint_kind", "selection_rule"):
        values = {str(r.get(field)) for _, r in group}
        if len(values) > 1:
            raise InvalidInputError(f"refusing to average checkpoints chosen differently ({field}: {', '.join(sorted(values))}); "
                             "report each rule separately")
    seeds = [r.get("seed") for _, r in group]
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        paths = ", ".join(str(p) for p, r in group if r.get("seed") in repeated)
        raise InvalidInputError(f"seed {repeated[0]} appears in several evaluations of the same CRF setting ({paths}): "
                         "pass one evaluation per seed")


def _stats(values: list[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=np.float64)
    return {"n": len(values), "mean": float(array.mean()),
            "std": float(array.std(ddof=1)) if len(values) > 1 else float("nan"),
            "min": float(array.min()), "max": float(array.max())}


def aggregate(evaluations: list[tuple[Path, dict[str, Any]]]) -> dict[str, Any]:
    """Mean, std (n - 1), min and max of every metric over seeds, per CRF setting.

    Returns ``{"groups": [{"crf", "seeds", "selection_rule", "checkpoint_kind", "selection",
    "step", "rows": [{"metric", "n", "mean", "std", "min", "max"}]}], "config": ..., ...}``.
    Raises ValueError naming the differing keys when the evaluations are not seeds of one setup.
    """
    if not evaluations:
        raise InvalidInputError("no evaluations to report")
    by_crf: dict[bool, list[tuple[Path, dict[str, Any]]]] = {}
    for path, results in evaluations:
        by_crf.setdefault(bool(results.get("crf")), []).append((path, results))
    _check_configs(evaluations)
    groups = []
    for crf, group in sorted(by_crf.items()):
        _check_group(group)
        first = group[0][1]
        rows = []
        for title, key in SECTIONS:
            names = sorted(set().union(*(r.get(key, {}) for _, r in group)))
            for name in names:
                values = [r[key][name] for _, r in group if name in r.get(key, {}) and r[key][name] is not None]
                if len(values) == len(group):  # a metric missing for some seed is not averaged
                    rows.append({"metric": f"{title}: {name.replace('_', ' ')}", **_stats(values)})
        groups.append({
            "crf": crf, "seeds": [r.get("seed") for _, r in group], "paths": [str(p) for p, _ in group],
            "selection_rule": first.get("selection_rule", first.get("checkpoint_kind")),
            "checkpoint_kind": first.get("checkpoint_kind"), "selection": first.get("selection"),
            "steps": [r.get("step") for _, r in group], "matching": first.get("matching", {"hp": "hungarian"}),
            "rows": rows,
        })
    config = evaluations[0][1]["config"]
    return {"groups": groups, "config": config, "dataset": evaluations[0][1].get("dataset"),
            "backbone": evaluations[0][1].get("backbone"), "n_images": evaluations[0][1].get("n_images"),
            "backbone_weights": evaluations[0][1].get("backbone_weights")}


def _pct(value: float) -> str:
    return "-" if not math.isfinite(value) else f"{100 * value:.1f}"


def _weights_text(backbone: dict[str, Any], source: str | None) -> str:
    """Where the backbone's weights came from, in words: the run's ``backbone`` config and the
    evaluation's ``backbone_weights`` (``"official"``, ``"random"`` or a file)."""
    if not backbone.get("pretrained", True) or source == "random":
        saved = backbone.get("weights")
        return "randomly initialised weights" + (f", saved in {saved}" if saved else "")
    if backbone.get("weights") or source not in (None, "official"):
        return f"weights from {backbone.get('weights') or source}"
    return "official pretrained weights"


def to_markdown(summary: dict[str, Any]) -> str:
    """The report as Markdown: what was averaged, then one table per CRF setting (percent)."""
    config = summary["config"]
    lines = ["# hpseg report", "",
             f"Dataset {summary['dataset']}, backbone {summary['backbone']} "
             f"({_weights_text(config['backbone'], summary.get('backbone_weights'))}), "
             f"{config['method']['n_classes']} classes, {config['method']['n_classes'] + config['method'].get('extra_clusters', 0)} "
             f"clusters, {summary['n_images']} validation images. Configs are identical except the seed.", ""]
    for group in summary["groups"]:
        seeds = ", ".join(str(s) for s in group["seeds"])
        matching = "; ".join(f"{k}: {v}" for k, v in group["matching"].items())
        lines += [f"## CRF {'on' if group['crf'] else 'off'}", "",
                  f"Checkpoint selection: `train.selection={group['selection_rule']}` (checkpoint `{group['checkpoint_kind']}`: "
                  f"{group['selection']}); steps {', '.join(str(s) for s in group['steps'])}.  ",
                  f"Seeds: {seeds} (n = {len(group['seeds'])}; std is the sample standard deviation). Matching: {matching}.",
                  "", "| metric | mean ± std | min | max | n |", "|---|---|---|---|---|"]
        for row in group["rows"]:
            lines.append(f"| {row['metric']} | {_pct(row['mean'])} ± {_pct(row['std'])} | {_pct(row['min'])} | "
                         f"{_pct(row['max'])} | {row['n']} |")
        lines.append("")
    return "\n".join(lines)


def to_csv(summary: dict[str, Any]) -> str:
    """One line per (metric, CRF); values are fractions in [0, 1] as in results.json."""
    out = ["metric,crf,selection_rule,checkpoint_kind,seeds,n,mean,std,min,max"]
    for group in summary["groups"]:
        seeds = " ".join(str(s) for s in group["seeds"])
        for row in group["rows"]:
            out.append(f"\"{row['metric']}\",{str(group['crf']).lower()},{group['selection_rule']},"
                       f"{group['checkpoint_kind']},{seeds},{row['n']},{row['mean']:.6f},{row['std']:.6f},"
                       f"{row['min']:.6f},{row['max']:.6f}")
    return "\n".join(out) + "\n"


def _validation_records(log: Path) -> list[dict[str, Any]] | None:
    """The validation records of a run's metrics.jsonl; None (with a warning naming the file, line
    and what is missing) when one of them lacks its step or metrics: that run gets no curve."""
    records, _ = read_jsonl(log)  # a torn last line (a crash mid-write) is left out, not fatal
    validation = []
    for number, _, record in records:
        if "validation" not in record:
            continue
        if not isinstance(record.get("step"), int) or not isinstance(record["validation"], dict):
            missing = "an integer 'step'" if not isinstance(record.get("step"), int) else "a 'validation' mapping"
            logger.warning("%s line %d: a validation record without %s; the validation curve of this run is "
                           "left out of the report", log, number, missing)
            return None
        validation.append(record)
    return validation


def validation_curves(evaluations: list[tuple[Path, dict[str, Any]]]) -> dict[int, dict[str, list[float]]]:
    """seed -> {"step": [...], metric: [...]} from the metrics.jsonl of each evaluated run.

    A results.json without its ``checkpoint`` (older or hand-edited) or a metrics.jsonl with a
    malformed validation record gives no curve for that run, with a warning naming the file."""
    curves: dict[int, dict[str, list[float]]] = {}
    for path, results in evaluations:
        if not isinstance(results.get("checkpoint"), str):
            logger.warning("%s has no 'checkpoint' entry, so its run's metrics.jsonl cannot be found: its "
                           "validation curve is left out of the report (its metrics are reported)", path)
            continue
        log = Path(results["checkpoint"]).parent.parent / "metrics.jsonl"
        if results.get("seed") in curves or not log.is_file():
            continue
        validation = _validation_records(log)
        if validation is None:
            continue
        curve: dict[str, list[float]] = {"step": [r["step"] for r in validation]}
        for key in ("unsupervised_miou", "unsupervised_accuracy", "linear_miou", "linear_accuracy"):
            curve[key] = [r["validation"].get(key, float("nan")) for r in validation]
        curves[int(results.get("seed", 0))] = curve
    return curves


def plot_curves(curves: dict[int, dict[str, list[float]]], path: Path, rule: str) -> Path | None:
    """Validation curves of every seed (two panels: unsupervised and linear mIoU); None without matplotlib."""
    try:
        # Lazy: matplotlib is the optional ``hpseg[viz]`` extra (no curves without it) and costs a
        # second to import.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    figure = Figure(figsize=(9, 3.4), dpi=110)
    FigureCanvasAgg(figure)
    for i, (key, title) in enumerate((("unsupervised_miou", "unsupervised mIoU"), ("linear_miou", "linear mIoU"))):
        axes = figure.add_subplot(1, 2, i + 1)
        for seed, curve in sorted(curves.items()):
            axes.plot(curve["step"], [100 * v for v in curve[key]], marker=".", label=f"seed {seed}")
        axes.set_xlabel("step")
        axes.set_ylabel(f"{title} (%)")
        axes.set_title(f"validation {title}")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure.suptitle(f"validation curves of every seed (selection rule: {rule})", fontsize=9)
    figure.tight_layout()
    with atomic_write(path) as handle:
        figure.savefig(handle, format="png")
    return path


def report_folder(out_dir: str | Path) -> OutputFolder:
    """``out_dir`` under the rule of every output folder (:class:`hpseg.files.OutputFolder`), a
    report folder of an earlier hpseg included."""
    return OutputFolder(Path(out_dir), "report", earlier=lambda path: holds_only(path, REPORT_FILES, "report.md"))


def write_report(paths: Iterable[str | Path], out_dir: str | Path) -> dict[str, Any]:
    """Aggregate the evaluations under ``paths`` into ``out_dir``/report.md, report.csv, curves.png."""
    folder = report_folder(out_dir)
    folder.check()
    evaluations = collect_results(paths)
    summary = aggregate(evaluations)
    out = folder.claim()
    markdown = to_markdown(summary)
    write_text_atomic(markdown, out / "report.md")
    write_text_atomic(to_csv(summary), out / "report.csv")
    curves = validation_curves(evaluations)
    plot = plot_curves(curves, out / "curves.png", summary["groups"][0]["selection_rule"]) if curves else None
    summary.update(markdown=markdown, out_dir=str(out), curves=str(plot) if plot else None)
    return summary
