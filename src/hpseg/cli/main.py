"""The ``hpseg`` command line: one subcommand per job, each a thin layer over the library.

This module only parses arguments: each command imports what it runs inside its ``cmd_``
function, so that ``hpseg --help`` and argument errors answer without importing torch (seconds).

Output: a command's result goes to stdout; progress bars and notices go to stderr through the
``hpseg`` logger (``--quiet``: warnings only, ``--verbose``: debug records too). Errors: the
errors a user can fix (:class:`hpseg.errors.HpsegError`: ``CheckpointError``, ``DatasetLayoutError``,
``UsageError``, ...) and the system's ``OSError`` (a missing file, a full disk) print one line and
exit with 2; anything else is unexpected and keeps its traceback (exit 1); ``--debug`` shows the
traceback of every error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from pathlib import Path

from hpseg import __version__
from hpseg.cli import export as export_commands  # argparse only at import: the parser stays torch-free
from hpseg.cli.errors import UsageError
from hpseg.errors import HpsegError
from hpseg.logs import configure_logging

#: Exit status of a failure hpseg explains in one line, and of an unexpected one.
USER_ERROR, UNEXPECTED_ERROR = 2, 1


def _config_from(args: argparse.Namespace):
    from hpseg.config import load_preset

    config = load_preset(args.preset)
    overrides = list(args.overrides)
    if getattr(args, "data_root", None):
        overrides.insert(0, f"data.root={args.data_root}")
    if getattr(args, "backbone", None):
        overrides.insert(0, f"backbone.name={args.backbone}")
    if getattr(args, "weights", None):
        overrides.insert(0, f"backbone.weights={args.weights}")
    if getattr(args, "random_backbone", False):
        overrides.insert(0, "backbone.pretrained=false")
    return config.override(overrides)


def _add_backbone_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", help="backbone name (see `hpseg backbones`)")
    p.add_argument("--weights", help="local backbone weights file")
    p.add_argument("--random-backbone", action="store_true", help="randomly initialised backbone (no weights)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be at least 1")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value}: must be 0 or more")
    return value


def _add_threads_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help="torch's CPU threads, as OMP_NUM_THREADS=N (default: OMP_NUM_THREADS if set, else the cores "
                        "available to this process less the worker processes the command starts)")


def _add_crf_workers_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--crf-workers", type=_non_negative_int, default=None, metavar="N",
                   help="with --crf: processes refining images with the CRF while the backbone goes on (default: the "
                        "cores available to this process, or this rank's share under torchrun, less the loader's "
                        "workers; 0 = in the main process)")


def _fit_threads(args: argparse.Namespace, workers_started: int) -> None:
    """torch's CPU threads for this command (logged); ``--threads N`` stands for ``OMP_NUM_THREADS=N``
    in everything the command runs or starts."""
    from hpseg.runtime import fit_threads

    if args.threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    fit_threads(workers_started)


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="cocostuff27", help="shipped preset name or a YAML file (default: cocostuff27)")
    parser.add_argument("--data-root", help="dataset root directory (data.root)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, e.g. train.batch_size=16")


def cmd_backbones(args: argparse.Namespace) -> int:
    from hpseg.backbones import format_backbone_table

    print(format_backbone_table())
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from hpseg.checkpoints.released import format_released_table

    print(format_released_table())
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from hpseg.data import build_raw_dataset, prepare_training_set
    from hpseg.data.prepare import MANIFEST_NAME

    config = _config_from(args)
    data = config.data
    if args.out:
        data.prepared_dir = args.out
    raw = build_raw_dataset(data.dataset, data.root, "train", n_classes=config.method.n_classes,
                            skip_bad_images=data.skip_bad_images, potsdam_lists=data.potsdam_lists())
    rule = data.crop_rule()
    out = prepare_training_set(raw, data.prepared_path(), crop_size=data.crop_size, crop_rule=rule,
                               crop_format=data.crop_format)
    skipped = len(json.loads((out / MANIFEST_NAME).read_text())["skipped"])
    used = len(raw) - skipped
    what = "five-crop" if rule == "five" else "whole-image"
    print(f"{what} training set of {used} image{'s' * (used != 1)} ready in {out}"
          + (f" ({skipped} unreadable image{'s' * (skipped != 1)} skipped: listed under \"skipped\" in "
             f"{out / MANIFEST_NAME})" if skipped else ""))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from hpseg.training.trainer import resume, train

    # Under torchrun every rank runs this; only the first one talks.
    is_main = not _other_rank()
    _fit_threads(args, _loader_workers(args))
    if args.seeds:
        return _train_seeds(args)
    if args.resume:
        run_dir = resume(args.resume)
    else:
        # The resolved config goes to <run>/config.yaml (and to --verbose), not to the screen: ~70
        # lines that would bury a first error such as missing weights.
        config = _config_from(args)
        logging.getLogger("hpseg.cli").debug("resolved config:\n%s", config.to_yaml())
        run_dir = train(config, run_dir=args.run_dir)
    if is_main:
        from hpseg.checkpoints.runs import selected_checkpoint
        from hpseg.checkpoints.store import CheckpointError

        written = ", ".join(f"checkpoints/{path.name}" for path in sorted((run_dir / "checkpoints").glob("*.pt")))
        try:
            chosen = f"the checkpoint train.selection chose, which the run folder stands for: {selected_checkpoint(run_dir)}"
        except CheckpointError as error:
            chosen = str(error)
        print(f"run written to {run_dir} ({written or 'no checkpoint'}, metrics.jsonl, config.yaml); {chosen}")
    return 0


def _loader_workers(args: argparse.Namespace) -> int:
    """The data loader's workers of the run ``hpseg train`` is about to start or resume."""
    from hpseg.config import load_preset

    saved = Path(args.resume) / "config.yaml" if args.resume else None
    if saved is not None and saved.is_file():
        return load_preset(str(saved)).data.num_workers
    return _config_from(args).data.num_workers


def _train_seeds(args: argparse.Namespace) -> int:
    from hpseg.config import SEEDS
    from hpseg.training.multi_seed import train_seeds

    if args.resume or not args.run_dir:
        raise UsageError("--seeds needs --run-dir DIR (one folder seed-<s>/ per seed inside it) and no --resume")
    for seed in args.seeds:
        if not SEEDS.allows(seed):
            raise UsageError(f"--seeds {seed}: out of range, allowed {SEEDS.describe('seed')}")
    if not args.no_eval:  # the report's folder, checked before hours of training rather than after
        from hpseg.evaluation.report import report_folder

        report_folder(Path(args.run_dir) / "report").check()
    result = train_seeds(_config_from(args), args.run_dir, args.seeds, evaluate=not args.no_eval, crf=args.crf)
    if result["report"]:
        print(result["report"]["markdown"])
        print(f"report written to {result['report']['out_dir']} (report.md, report.csv, curves.png)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from hpseg.evaluation.report import write_report

    summary = write_report(args.paths, args.out)
    print(summary["markdown"])
    print(f"report written to {summary['out_dir']} (report.md, report.csv"
          + (", curves.png)" if summary["curves"] else "; no curves.png: no metrics.jsonl found, or no matplotlib)"))
    return 0


def cmd_clusters(args: argparse.Namespace) -> int:
    from hpseg.evaluation.clusters import DEFAULT_CRITERION, parse_k_range, run_clusters

    if args.max_images < 0:
        raise UsageError(f"--max-images {args.max_images}: must be 0 (all images) or more")
    _fit_threads(args, 0)  # images are read in this process
    report = run_clusters(args.source, args.data_root, parse_k_range(args.k, args.max_patches), out_dir=args.out,
                          criterion=args.criterion or DEFAULT_CRITERION, max_patches=args.max_patches, seed=args.seed, split=args.split,
                          size=args.size, max_images=args.max_images, weights=args.weights,
                          random_backbone=args.random_backbone, device=args.device)
    print(f"features: {report['features']}")
    print("   K  silhouette  davies-bouldin  stability  eigengap")
    for row in report["rows"]:
        print(f"{row['k']:4d}  {row['silhouette']:10.3f}  {row['davies_bouldin']:14.3f}  {row['stability']:9.3f}  "
              f"{row['eigengap']:8.4f}")
    print(f"suggested K = {report['suggested_k']} (by {report['criterion']}; by each criterion: "
          f"{report['suggested_k_by_criterion']}). How often this was right on data with known classes: "
          "docs/results.md, 'How many clusters?'.")
    print(f"written to {args.out}/clusters.json" + (" and clusters.png" if report["plot"] else ""))
    return 0


def _other_rank() -> bool:
    """Whether this process is a rank other than the first of a ``torchrun`` job."""
    return os.environ.get("RANK", "0") != "0"


def cmd_cache(args: argparse.Namespace) -> int:
    if _other_rank():
        return 0  # rank 0 builds the cache (its progress file resumes one writer), the others have nothing to do
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        logging.getLogger("hpseg.cli").info("hpseg cache runs on rank 0 only: the other ranks of this torchrun job "
                                            "exit at once (running it without torchrun writes the same cache)")
    from hpseg.backbones import create_backbone
    from hpseg.runtime import amp_dtype, resolve_device
    from hpseg.training.cache import build_feature_cache, default_cache_dir, resolve_cache_dir

    config = _config_from(args)
    _fit_threads(args, config.data.num_workers)
    prepared = config.data.prepared_path()
    out = Path(args.out) if args.out else resolve_cache_dir(config)
    if out is None:
        out = default_cache_dir(prepared, config.backbone.name)  # data.feature_cache=off: the default place
    device = resolve_device(config.train.device)
    backbone = create_backbone(config.backbone.name, weights=config.backbone.weights,
                               pretrained=config.backbone.pretrained).to(device)
    path = build_feature_cache(
        backbone, prepared, out, sigma=config.method.sigma, batch_size=args.batch_size or config.train.batch_size,
        device=device, amp_dtype=amp_dtype(config.train.amp, device), dtype=args.dtype,
        num_workers=config.data.num_workers, weights_path=config.backbone.weights, overwrite=args.overwrite,
    )
    print(f"feature cache ready in {path}")
    if path.resolve() != default_cache_dir(prepared, config.backbone.name).resolve():
        print(f"train from it with: hpseg train ... data.feature_cache={path}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from hpseg.evaluation.protocol import evaluate_checkpoint

    if args.threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # evaluate_checkpoint knows the workers it starts
    report = evaluate_checkpoint(
        args.checkpoint, data_root=args.data_root, out_dir=args.out, crf=args.crf, baseline=args.baseline,
        device=args.device, weights=args.weights, max_images=args.max_images, extra_clusters=args.extra_clusters,
        crf_workers=args.crf_workers,
    )
    if _other_rank():
        return 0  # under torchrun every rank evaluates its share of the images; rank 0 writes and tells
    print(report["text"])
    print(f"results written to {report['out_dir']}/results.json")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from hpseg.cli.predict import run_cli

    return run_cli(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from hpseg.cli.demo import run_cli

    return run_cli(args)


def cmd_import_checkpoint(args: argparse.Namespace) -> int:
    from hpseg.checkpoints.authors import import_authors_checkpoint

    summary = import_authors_checkpoint(args.authors, args.out, dataset=args.dataset, backbone=args.backbone,
                                          data_root=args.data_root)
    print(f"converted {args.authors} ({summary['backbone']}, D={summary['dim']}, {summary['n_classes']} classes, "
          f"dataset {summary['dataset']}) to {summary['checkpoint']}; backbone weights in {summary['weights']}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from hpseg.cli.export import run_export

    return run_export(args)


def cmd_push(args: argparse.Namespace) -> int:
    from hpseg.cli.export import run_push

    return run_push(args)


def cmd_app(args: argparse.Namespace) -> int:
    from hpseg.cli.app import run_cli

    return run_cli(args)


def _add_use_elsewhere_commands(sub: argparse._SubParsersAction) -> None:
    """``export``, ``push`` and ``app``: using a trained segmenter outside this repository."""
    p = sub.add_parser("export", help="export a checkpoint to ONNX or to a Hugging Face Hub folder")
    export_commands.add_export_arguments(p)
    p.set_defaults(run=cmd_export)

    p = sub.add_parser("push", help="upload a hub folder to the Hugging Face Hub (your token)")
    export_commands.add_push_arguments(p)
    p.set_defaults(run=cmd_push)

    p = sub.add_parser("app", help="a local web app to segment images (pip install 'hpseg[app]')")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="checkpoint, run folder, authors' checkpoint, hub folder or "
                                             "hf://owner/name[@revision]")
    source.add_argument("--model", dest="checkpoint", metavar="NAME", help="a released model (`hpseg models`)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default: loopback only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--mapping", metavar="RESULTS_JSON", help="cluster->class mapping (default: as hpseg predict)")
    p.add_argument("--no-mapping", action="store_true", help="show raw cluster ids")
    p.add_argument("--size", type=int, default=None, help="shorter side images are resized to")
    p.add_argument("--window", type=int, default=None, help="sliding-window side")
    p.add_argument("--weights", help="local backbone weights file")
    p.add_argument("--device", default="auto")
    p.set_defaults(run=cmd_app)


def _add_output_arguments(parser: argparse.ArgumentParser, default: object) -> None:
    """--quiet / --verbose / --debug, accepted before the command and after it; on the
    subcommands the default is ``argparse.SUPPRESS`` so an option given before is kept."""
    group = parser.add_argument_group("output")
    group.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const=-1, default=default,
                       help="warnings and results only: no progress bars, no notices")
    group.add_argument("-v", "--verbose", dest="verbosity", action="store_const", const=1, default=default,
                       help="also debug records")
    group.add_argument("--debug", action="store_true", default=default, help="show the traceback of every error")


def _add_no_progress(parser: argparse.ArgumentParser) -> None:
    # Kept for existing scripts: progress bars follow the log level, so this is --quiet.
    parser.add_argument("--no-progress", dest="verbosity", action="store_const", const=-1, default=argparse.SUPPRESS,
                        help="same as --quiet")


def _add_demo_arguments(p: argparse.ArgumentParser) -> None:
    """The ``hpseg demo`` arguments; the settings left out keep :class:`hpseg.cli.demo.DemoSettings`'
    defaults (defined there, not imported here: the demo module imports torch)."""
    p.add_argument("--out", default="hpseg-demo", help="output folder (default: hpseg-demo/)")
    p.add_argument("--steps", type=int, help="training steps (default: 300 on the random tiny ViT, 150 on DINO)")
    p.add_argument("--seed", type=int, help="seed of the data, the training and the baseline (default 0)")
    p.add_argument("--weights", help="DINO backbone weights file (default: the official dino_vits16 weights if "
                                     "cached, else a random tiny ViT)")
    p.add_argument("--backbone", help="backbone name (default dino_vits16 with weights, vit_tiny_p8 without)")
    p.add_argument("--device", default="auto")
    p.add_argument("--image-size", type=int, help="synthetic image side (default: 8 patches, 64 px on vit_tiny_p8)")
    p.add_argument("--crop-size", type=int, help="training crop side (default: 4 patches, 32 px on vit_tiny_p8)")
    p.add_argument("--n-train", type=int, help="synthetic training images")
    p.add_argument("--n-val", type=int, help="synthetic validation images")
    p.add_argument("--n-classes", type=int, help="synthetic classes (= clusters)")
    p.add_argument("--batch-size", type=int, help="training crops per step")
    _add_no_progress(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hpseg", description="Unsupervised semantic segmentation with Hidden Positives.")
    parser.add_argument("--version", action="version", version=f"hpseg {__version__}")
    _add_output_arguments(parser, default=None)
    parser.set_defaults(verbosity=0, debug=False)
    output = argparse.ArgumentParser(add_help=False)
    _add_output_arguments(output, default=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=lambda **kwargs: argparse.ArgumentParser(parents=[output], **kwargs))

    p = sub.add_parser("backbones", help="list the supported backbones")
    p.set_defaults(run=cmd_backbones)

    p = sub.add_parser("models", help="list the authors' released models (hpseg predict --model NAME)")
    p.set_defaults(run=cmd_models)

    p = sub.add_parser("prepare", help="prepare the training set: five crops, or whole Potsdam tiles (offline step of the protocol)")
    _add_config_arguments(p)
    p.add_argument("--out", help="output directory (default: <data-root>/hpseg_prepared/train_<crop>)")
    _add_no_progress(p)
    p.set_defaults(run=cmd_prepare)

    p = sub.add_parser("train", help="train HP on a prepared dataset")
    _add_config_arguments(p)
    _add_backbone_arguments(p)
    p.add_argument("--run-dir", help="run directory (default: <train.output_dir>/<dataset>-<backbone>-<time>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    p.add_argument("--seeds", type=int, nargs="+", metavar="SEED",
                   help="train once per seed into RUN_DIR/seed-<s>/, evaluate each and write RUN_DIR/report/")
    p.add_argument("--crf", action="store_true", help="with --seeds: evaluate with the dense CRF")
    p.add_argument("--no-eval", action="store_true", help="with --seeds: train only")
    _add_threads_argument(p)
    _add_no_progress(p)
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("report", help="mean ± std over seeds of evaluations (Markdown, CSV, validation curves)")
    p.add_argument("paths", nargs="+", metavar="RUN_OR_RESULTS",
                   help="results.json files, evaluation folders, run folders or a --seeds folder")
    p.add_argument("--out", default="report", help="output folder (default: report)")
    p.set_defaults(run=cmd_report)

    p = sub.add_parser("clusters", help="how many clusters do unlabelled images hold? (label-free criteria per K)")
    p.add_argument("source", metavar="CHECKPOINT_OR_BACKBONE",
                   help="a trained model: checkpoint, run folder, hub folder or hf://owner/name (HP's features); "
                        "or a backbone name (raw features)")
    p.add_argument("--data-root", required=True, help="folder dataset: DIR/images or DIR/<split>/images")
    p.add_argument("--split", default="train")
    p.add_argument("--k", default="2..40", help="Ks to try: LOW..HIGH or a list 3,5,8 (default 2..40)")
    p.add_argument("--criterion", default=None, help="criterion of the suggestion: silhouette, davies_bouldin, "
                                                     "stability or eigengap (default: the best on known data)")
    p.add_argument("--max-images", type=int, default=200, help="images read (default 200; 0 = all)")
    p.add_argument("--max-patches", type=int, default=2000, help="patches sampled and clustered (default 2000)")
    p.add_argument("--size", type=int, default=None, help="image side (default: the checkpoint's data.val_size, else 224)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="clusters", help="output folder (default: clusters)")
    p.add_argument("--weights", help="local backbone weights file")
    p.add_argument("--random-backbone", action="store_true", help="randomly initialised backbone (no weights)")
    p.add_argument("--device", default="auto")
    _add_threads_argument(p)
    p.set_defaults(run=cmd_clusters)

    p = sub.add_parser("cache", help="precompute the frozen backbone's features of the training crops (optional)")
    _add_config_arguments(p)
    _add_backbone_arguments(p)
    p.add_argument("--out", help="cache directory (default: data.feature_cache, else "
                                 "<prepared dir>/feature_cache/<backbone>, where `hpseg train` looks)")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                   help="storage of the features (default float16: half the size)")
    p.add_argument("--batch-size", type=int, default=0, help="crops per backbone pass (default: train.batch_size)")
    p.add_argument("--overwrite", action="store_true", help="replace a cache built for another backbone / data / sigma")
    _add_threads_argument(p)
    _add_no_progress(p)
    p.set_defaults(run=cmd_cache)

    p = sub.add_parser("eval", help="evaluate a checkpoint (unsupervised and linear accuracy / mIoU)")
    p.add_argument("checkpoint", help="checkpoint file (a run's checkpoints/best.pt or last.pt), a run folder (the "
                                      "checkpoint its train.selection chose), an authors' checkpoint, a hub folder, "
                                      "hf://owner/name[@revision] or a released model's name (`hpseg models`): "
                                      "the paper's numbers are shown beside the results")
    p.add_argument("--data-root", help="dataset root, when it moved since training")
    p.add_argument("--out", help="output directory (default: <run>/eval-<name>[-crf] for a run's checkpoints/<name>.pt, "
                                 "eval-<name>[-crf] beside any other checkpoint)")
    p.add_argument("--crf", action="store_true", help="refine with a dense CRF (pip install 'hpseg[crf]')")
    p.add_argument("--baseline", action="store_true", help="also evaluate k-means / linear probe on raw backbone features")
    p.add_argument("--extra-clusters", type=int, default=None, metavar="N",
                   help="k-means baseline with n_classes + N clusters, scored by Hungarian and majority matching "
                        "(default: the run's method.extra_clusters)")
    p.add_argument("--weights", help="local backbone weights file (overrides the checkpoint's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--max-images", type=int, default=0, help="evaluate on the first N validation images only")
    _add_crf_workers_argument(p)
    _add_threads_argument(p)
    _add_no_progress(p)
    p.set_defaults(run=cmd_eval)

    p = sub.add_parser("predict", help="segment your own images (files, folders, globs) with a checkpoint")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders (searched recursively) or glob patterns")
    p.add_argument("--checkpoint", help="hpseg checkpoint, a run folder (the checkpoint its train.selection chose), "
                                        "an authors' checkpoint, a hub folder or hf://owner/name[@revision]")
    p.add_argument("--model", dest="checkpoint", metavar="NAME",
                   help="a released model, e.g. hp/cocostuff27-vits8 (`hpseg models`), downloaded on first use")
    p.add_argument("--onnx", metavar="MODEL", help="segment with a model of `hpseg export --format onnx` "
                                                   "(onnxruntime, instead of --checkpoint)")
    p.add_argument("--out", required=True, help="output folder (labels/, overlays/, figures/, predictions.json)")
    p.add_argument("--head", choices=("cluster", "linear"), default=None,
                   help="cluster probe (unsupervised; the default) or linear probe (trained with labels; the default "
                        "of a released model, whose clusters have no class names without an evaluation)")
    p.add_argument("--mapping", metavar="RESULTS_JSON",
                   help="cluster->class mapping: the results.json of `hpseg eval` (default: the evaluation of this "
                        "checkpoint beside it, <run>/eval-<name>[-crf]/results.json, when there is one; with "
                        "--crf a CRF evaluation first)")
    p.add_argument("--no-mapping", action="store_true", help="write raw cluster ids even when a mapping exists")
    p.add_argument("--figure", action="store_true", help="also write image | segmentation panels with a legend")
    p.add_argument("--crf", action="store_true", help="refine with the dense CRF (pip install 'hpseg[crf]')")
    p.add_argument("--size", type=int, default=None,
                   help="resize the shorter side to this many pixels (default: the checkpoint's data.val_size; "
                        "0 = keep each image's size)")
    p.add_argument("--window", type=int, default=None,
                   help="sliding-window side in pixels (default: --size; 0 = whole image in one pass)")
    p.add_argument("--weights", help="local backbone weights file (overrides the checkpoint's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    _add_crf_workers_argument(p)
    _add_threads_argument(p)
    _add_no_progress(p)
    p.set_defaults(run=cmd_predict)

    p = sub.add_parser("demo", help="train and evaluate HP on synthetic data on the CPU, no data or network needed")
    _add_demo_arguments(p)
    p.set_defaults(run=cmd_demo)

    p = sub.add_parser("import-checkpoint", help="convert a checkpoint of the authors' code")
    p.add_argument("authors", metavar="AUTHORS_CHECKPOINT", help="the authors' .pth file (net_model_state_dict, linear_model_state_dict, ...)")
    p.add_argument("--out", required=True, help="hpseg checkpoint to write (backbone weights go beside it)")
    p.add_argument("--dataset", choices=("cocostuff27", "cityscapes27", "potsdam3", "folder"),
                   help="the dataset it was trained on: class names and preset (default: from the class count)")
    p.add_argument("--backbone", help="backbone name (default: inferred from the weights' shapes)")
    p.add_argument("--data-root", help="dataset root to record, for `hpseg eval`")
    p.set_defaults(run=cmd_import_checkpoint)
    _add_use_elsewhere_commands(sub)
    return parser


def is_user_error(error: BaseException) -> bool:
    """Whether ``error``'s message is written for users, so that one line says it all: an
    :class:`~hpseg.errors.HpsegError`, or the system's ``OSError`` (its message names the file).
    Anything else, e.g. a ``RuntimeError`` inside torch or a ``KeyError``, is a bug whose
    traceback is needed."""
    return isinstance(error, (HpsegError, OSError))


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may also follow options (argparse stops collecting positionals at the first option).
    if extra:
        if not hasattr(args, "overrides") or any(item.startswith("-") or "=" not in item for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    configure_logging(args.verbosity)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("hpseg: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - the command line's last word on every failure
        expected = is_user_error(error)
        if args.debug or not expected:
            traceback.print_exc()
        print(f"hpseg {args.command}: error: {error}", file=sys.stderr)
        return USER_ERROR if expected else UNEXPECTED_ERROR


if __name__ == "__main__":
    sys.exit(main())
