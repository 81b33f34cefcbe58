"""Evaluation (spec §8): unsupervised (Hungarian-matched cluster probe) and linear metrics,
per-class IoU, confusion-matrix images, CRF on/off, and the k-means "DINO baseline".

Results always say which checkpoint (and its selection rule), seed, config and CRF setting
produced them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from hpseg.backbones import Backbone
from hpseg.checkpoints.released import paper_comparison
from hpseg.checkpoints.trained import TrainedModel, load_trained
from hpseg.config import MethodConfig
from hpseg.data import TrainCrops, ValCrops, build_raw_dataset
from hpseg.data.errors import DatasetLayoutError
from hpseg.errors import InvalidInputError
from hpseg.evaluation.evaluator import METRIC_KEYS, EvaluationResults, HeadScores, SegmentationEvaluator
from hpseg.evaluation.kmeans import kmeans
from hpseg.evaluation.loop import FeatureBatch, backbone_batches, inference_on_dataset
from hpseg.files import OutputFolder, holds_only, write_json_atomic
from hpseg.inference.crf import require_crf
from hpseg.inference.crf_pool import CRFPool
from hpseg.inference.label_maps import KMeansPredictor, ModelPredictor
from hpseg.method.model import HiddenPositivesModel
from hpseg.runtime import (
    DistributedContext,
    autocast,
    broadcast_from_first,
    default_crf_workers,
    fit_threads,
    init_distributed,
)
from hpseg.visualize import confusion_image

logger = logging.getLogger(__name__)


def validation_indices(n_images: int, context: DistributedContext, max_images: int = 0) -> list[int]:
    """The validation images this rank evaluates: every world_size-th of the first ``max_images`` (0: all)."""
    n = min(n_images, max_images) if max_images > 0 else n_images
    return list(range(context.rank, n, context.world_size))


def validation_loader(dataset: Dataset, batch_size: int, num_workers: int, context: DistributedContext,
                      max_images: int = 0) -> DataLoader:
    """Sequential loader over (this rank's share of) the validation set."""
    indices = validation_indices(len(dataset), context, max_images)  # type: ignore[arg-type]
    return DataLoader(Subset(dataset, indices), batch_size=batch_size, num_workers=num_workers, shuffle=False,
                      generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def evaluate_model(
    model: HiddenPositivesModel,
    backbone: Backbone,
    batches: Iterable[dict[str, torch.Tensor]],
    n_classes: int,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    crf: bool = False,
    crf_workers: int = 0,
) -> EvaluationResults:
    """Cluster (Hungarian) and linear accuracy / mIoU of ``model`` on validation batches.

    ``batches`` yield dicts from :class:`hpseg.data.ValCrops`: image (B, 3, S, S), rgb uint8,
    label (B, S, S). With ``crf`` the label maps are refined by the dense CRF in ``crf_workers``
    processes (0: in this one; the same maps either way).
    """
    return evaluate_features(model, backbone_batches(backbone, batches, device, amp_dtype, crf=crf), n_classes,
                             crf_workers=crf_workers if crf else None, total_images=_n_images(batches))


@torch.no_grad()
def evaluate_features(
    model: HiddenPositivesModel,
    batches: Iterable[FeatureBatch],
    n_classes: int,
    *,
    crf_workers: int | None = None,
    total_images: int | None = None,
) -> EvaluationResults:
    """:func:`evaluate_model` from the backbone features already computed (the validation
    feature cache): ``batches`` yield (B, C, h, w) float features f, (B, S, S) int64 labels on
    the model's device and (B, 3, S, S) uint8 images for the CRF (``crf_workers`` not None), or None."""
    was_training = model.training
    model.eval()
    evaluator = SegmentationEvaluator(n_classes, model.cluster_probe.n_clusters)
    with _crf_pool(crf_workers) as pool:
        results = inference_on_dataset(ModelPredictor(model), batches, evaluator, crf_pool=pool,
                                       total_images=total_images)
    model.train(was_training)
    return results


def _crf_pool(workers: int | None) -> contextlib.AbstractContextManager[CRFPool | None]:
    """A CRF pool of ``workers`` processes, or nothing without the CRF (``workers`` None)."""
    return contextlib.nullcontext() if workers is None else CRFPool(workers)


def _n_images(batches: Iterable[Any]) -> int | None:
    """The images a DataLoader will yield (for progress bars), None for other iterables."""
    dataset = getattr(batches, "dataset", None)
    return len(dataset) if dataset is not None else None  # type: ignore[arg-type]


def selection_score(results: EvaluationResults) -> float:
    """[ref quirk] The reference keeps the checkpoint with the best sum of the four metrics."""
    return float(sum(results.metrics()[key] for key in METRIC_KEYS))


__all__ = ["METRIC_KEYS", "evaluate_features", "evaluate_model", "selection_score", "validation_indices",
           "validation_loader"]


# ---------------------------------------------------------------------------- the DINO baseline


@torch.no_grad()
def _training_patches(backbone: Backbone, crops: Dataset, device: torch.device, amp_dtype: torch.dtype | None,
                      max_patches: int, seed: int, batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw backbone features of a random sample of training patches and their patch-centre labels.

    Returns (M, C) features and (M,) labels (-1 where unlabelled).
    """
    order = torch.randperm(len(crops), generator=torch.Generator().manual_seed(seed)).tolist()  # type: ignore[arg-type]
    features, labels = [], []
    count = 0
    loader = DataLoader(Subset(crops, order), batch_size=batch_size, shuffle=False)
    for batch in loader:
        with autocast(device, amp_dtype):
            maps = backbone(batch["image"].to(device)).features.float()
        height, width = maps.shape[-2:]
        # the label at each patch's centre pixel
        label = batch["label"][:, backbone.patch_size // 2 :: backbone.patch_size, backbone.patch_size // 2 :: backbone.patch_size]
        features.append(maps.permute(0, 2, 3, 1).reshape(-1, maps.shape[1]).cpu())
        labels.append(label[:, :height, :width].reshape(-1))
        count += features[-1].shape[0]
        if count >= max_patches:
            break
    return torch.cat(features)[:max_patches], torch.cat(labels)[:max_patches]


def fit_baseline(backbone: Backbone, crops: Dataset, n_classes: int, device: torch.device,
                 amp_dtype: torch.dtype | None = None, *, seed: int = 0, max_patches: int = 200_000,
                 linear_steps: int = 500, n_clusters: int | None = None) -> tuple[torch.Tensor, torch.nn.Module | None]:
    """The paper's "DINO baseline": cosine k-means (K = n_clusters, default n_classes) on raw
    features f of the training crops, and a linear probe on f trained on their labels (None when
    unlabelled)."""
    features, labels = _training_patches(backbone, crops, device, amp_dtype, max_patches, seed)
    centroids, _ = kmeans(features.to(device), n_clusters or n_classes, seed=seed, cosine=True)
    valid = (labels >= 0) & (labels < n_classes)
    if not bool(valid.any()):
        return centroids, None
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the probe's initialisation, without touching the caller's RNG
        probe = torch.nn.Linear(features.shape[1], n_classes).to(device)
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-3)
    x, y = features[valid].to(device), labels[valid].to(device)
    # A fixed number of optimiser steps, not epochs: small datasets would otherwise get a handful.
    for _ in range(linear_steps):
        index = torch.randint(x.shape[0], (min(4096, x.shape[0]),), generator=generator).to(device)
        loss = torch.nn.functional.cross_entropy(probe(x[index]), y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return centroids, probe.eval()


@torch.no_grad()
def evaluate_baseline(backbone: Backbone, centroids: torch.Tensor, probe: torch.nn.Module | None,
                      batches: Iterable[dict[str, torch.Tensor]], n_classes: int, device: torch.device,
                      amp_dtype: torch.dtype | None = None, crf: bool = False, crf_workers: int = 0) -> EvaluationResults:
    """The same protocol as :func:`evaluate_model` on raw backbone features."""
    evaluator = SegmentationEvaluator(n_classes, centroids.shape[0], linear=probe is not None)
    with _crf_pool(crf_workers if crf else None) as pool:
        return inference_on_dataset(KMeansPredictor(centroids, probe),
                                    backbone_batches(backbone, batches, device, amp_dtype, crf=crf), evaluator,
                                    crf_pool=pool, total_images=_n_images(batches))


# ---------------------------------------------------------------------------- hpseg eval


def _per_class_table(head: HeadScores, class_names: list[str]) -> list[dict[str, Any]]:
    return [{"class": name, "iou": iou} for name, iou in zip(class_names, head.iou)]


def format_results(metrics: dict[str, float], title: str) -> str:
    """A short text table of the headline numbers (``METRIC_KEYS``, fractions) in percent."""
    lines = [title]
    for key in METRIC_KEYS:
        if key in metrics:
            lines.append(f"  {key.replace('_', ' '):<24} {100 * metrics[key]:6.2f}")
    return "\n".join(lines)


def _validation_set(trained: TrainedModel) -> ValCrops:
    """The labelled validation split of the checkpoint's dataset, at its validation size."""
    data = trained.config.data
    raw = build_raw_dataset(data.dataset, data.root, "val", n_classes=trained.config.method.n_classes,
                            skip_bad_images=data.skip_bad_images)
    if not raw.has_labels:
        raise DatasetLayoutError(f"{raw.root}: the validation images have no labels, so there is nothing to "
                                 "evaluate against")
    return ValCrops(raw, size=data.val_size)


def _validation_set_or_hint(trained: TrainedModel, moved_hint: bool) -> ValCrops:
    """:func:`_validation_set`; when the recorded dataset root is gone, the error says --data-root."""
    try:
        return _validation_set(trained)
    except DatasetLayoutError:
        root = trained.config.data.root
        if not moved_hint or not root or Path(root).exists():
            raise
        raise DatasetLayoutError(f"{trained.path} was trained on the dataset in {root}, which is not there any more: "
                                 "if it moved, pass --data-root DIR (data_root= in Python)", root) from None


def _hp_report(trained: TrainedModel, results: EvaluationResults, class_names: list[str], crf: bool,
               n_images: int) -> dict[str, Any]:
    """What ``results.json`` says about HP's results and the checkpoint that produced them."""
    config = trained.config
    report: dict[str, Any] = {
        "checkpoint": trained.checkpoint.label,
        "checkpoint_kind": trained.payload.kind,
        "selection": trained.payload.selection,
        # The run's train.selection; only "best" lets validation labels choose the checkpoint.
        "selection_rule": trained.payload.selection_rule or config.train.selection,
        "labels_used_for_selection": trained.payload.kind == "best",
        "step": trained.checkpoint.step,
        "seed": config.train.seed,
        "crf": crf,
        "dataset": config.data.dataset,
        "backbone": config.backbone.name,
        "backbone_weights": trained.weights_source,
        "n_images": n_images,
        "hp": results.metrics(),
        "n_clusters": results.n_clusters,
        "matching": {"hp": "hungarian"},
        "hp_per_class_iou": {
            "unsupervised": _per_class_table(results.unsupervised, class_names),
            "linear": _per_class_table(results.linear, class_names) if results.linear is not None else [],
        },
        "cluster_to_class": results.cluster_to_class,
        "config": config.to_dict(),
    }
    if results.majority is not None:
        report["hp_majority"] = _majority_section(results.majority)
        report["matching"]["hp_majority"] = "majority (many-to-one)"
        report["cluster_to_class_majority"] = results.majority.assignment
    return report


def _majority_section(majority: HeadScores) -> dict[str, float]:
    """The over-clustered (many-to-one) scores under the usual metric names."""
    return {"unsupervised_accuracy": majority.accuracy, "unsupervised_miou": majority.miou}


def _baseline_report(trained: TrainedModel, batches: Callable[[], DataLoader], crf_workers: int | None,
                     extra_clusters: int | None = None, context: DistributedContext | None = None) -> dict[str, Any]:
    """The DINO baseline fitted on the training crops and scored like HP; its k-means has
    n_classes + extra_clusters clusters (default: the run's ``method.extra_clusters``). Under
    torchrun every rank fits it and takes rank 0's fit (k-means on a GPU need not be bit-exact
    from rank to rank), then scores its share of the images."""
    config, n_classes, seed = trained.config, trained.config.method.n_classes, trained.config.train.seed
    k = n_classes + (config.method.extra_clusters if extra_clusters is None else extra_clusters)
    crops = TrainCrops(config.data.prepared_path(), with_augmented=False)
    centroids, probe = fit_baseline(trained.backbone, crops, n_classes, trained.device, trained.amp_dtype, seed=seed,
                                    n_clusters=k)
    broadcast_from_first([centroids, *(probe.parameters() if probe is not None else ())], context or DistributedContext())
    base = evaluate_baseline(trained.backbone, centroids, probe, batches(), n_classes, trained.device,
                             trained.amp_dtype, crf=crf_workers is not None, crf_workers=crf_workers or 0)
    report: dict[str, Any] = {
        "baseline": base.metrics(),
        "baseline_method": (f"cosine k-means (K={k}, seed {seed}) and a linear probe on raw backbone "
                            "features of the training crops"),
    }
    if base.majority is not None:
        report["baseline_majority"] = _majority_section(base.majority)
        report["baseline_n_clusters"] = k
    return report


#: What an evaluation writes into its folder.
EVALUATION_FILES = ("results.json", "confusion_unsupervised.png", "confusion_linear.png")


def _write_results(report: dict[str, Any], results: EvaluationResults, class_names: list[str], out: Path) -> None:
    """``results.json`` and the two confusion-matrix images."""
    write_json_atomic(report, out / "results.json")
    for name, head in (("unsupervised", results.unsupervised), ("linear", results.linear)):
        if head is not None:
            confusion_image(np.asarray(head.confusion), class_names, out / f"confusion_{name}.png")


def evaluate_checkpoint(
    checkpoint: str | Path,
    *,
    data_root: str | None = None,
    out_dir: str | Path | None = None,
    crf: bool = False,
    baseline: bool = False,
    device: str = "auto",
    weights: str | None = None,
    max_images: int = 0,
    batch_size: int = 8,
    extra_clusters: int | None = None,
    crf_workers: int | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Evaluate a checkpoint on its dataset's validation split and write the results.

    Writes ``results.json`` (metrics, per-class IoU, checkpoint, selection rule, step, seed,
    CRF, config) and confusion-matrix images into ``out_dir`` (default:
    :func:`hpseg.checkpoints.mapping.evaluation_dir`, ``<run>/eval-<name>[-crf]`` for a run's
    checkpoint, ``eval-<name>[-crf]`` beside any other). Returns the results dict with ``text``
    (a summary table) and ``out_dir``. ``checkpoint`` may be a run folder: the checkpoint its
    ``train.selection`` chose. ``extra_clusters`` sets the baseline's k-means K = n_classes +
    extra_clusters (default: the run's ``method.extra_clusters``).

    With ``crf`` the dense CRF runs in ``crf_workers`` processes (default: the cores available to
    this process, or this rank's share of them under ``torchrun``, less the loader's workers; 0:
    in this process) while this process computes the next batch. torch's CPU threads: ``threads``,
    else ``OMP_NUM_THREADS``, else the cores the loader and CRF workers leave (logged).

    Under ``torchrun`` the ranks share the validation images (every world_size-th) and sum
    their confusion matrices, so the results equal one process's; only rank 0 writes them.
    """
    rule = MethodConfig.RULES["extra_clusters"]
    if extra_clusters is not None and not rule.allows(extra_clusters):
        raise InvalidInputError(f"--extra-clusters {extra_clusters}: out of range, allowed {rule.describe('extra_clusters')}")
    if crf:
        require_crf()  # fail before any work when the extra is missing
    trained = load_trained(checkpoint, device, weights)
    if data_root:
        trained.config.data.root = data_root
    context = init_distributed(trained.device)
    out = Path(out_dir) if out_dir else trained.checkpoint.evaluation_dir(crf)
    folder = OutputFolder(out, "eval", earlier=lambda path: holds_only(path, EVALUATION_FILES, "results.json"))
    folder.check()  # before the evaluation: a refused folder costs no work
    validation = _validation_set_or_hint(trained, moved_hint=not data_root)
    n_images = min(len(validation), max_images) if max_images else len(validation)
    loader_workers = trained.config.data.num_workers
    if crf and crf_workers is None:
        crf_workers = default_crf_workers(loader_workers)
    crf_workers = crf_workers if crf else None
    fit_threads(loader_workers + (crf_workers or 0), threads)

    def batches() -> DataLoader:
        return validation_loader(validation, batch_size, trained.config.data.num_workers, context, max_images)

    if context.enabled:
        share = len(validation_indices(len(validation), context, max_images))
        logger.info(f"rank {context.rank} of {context.world_size} evaluates {share} of the {n_images} validation "
                    "images (confusion matrices summed over ranks)")
    class_names = list(trained.payload.class_names or validation.raw.class_names)
    results = evaluate_model(trained.model, trained.backbone, batches(), trained.config.method.n_classes,
                             trained.device, trained.amp_dtype, crf, crf_workers or 0)
    report = _hp_report(trained, results, class_names, crf, n_images)
    text = [format_results(results.metrics(), f"HP ({report['checkpoint_kind']} checkpoint, step {report['step']}, "
                                    f"CRF {'on' if crf else 'off'})")]
    if "hp_majority" in report:
        text.append(format_results(report["hp_majority"],
                                   f"HP over-clustered (K={report['n_clusters']}), many-to-one majority matching"))
    text.append(f"  checkpoint chosen by train.selection={report['selection_rule']}: {report['selection']}")
    if baseline:
        report.update(_baseline_report(trained, batches, crf_workers, extra_clusters, context))
        report["matching"]["baseline"] = "hungarian"
        if "baseline_majority" in report:
            report["matching"]["baseline_majority"] = "majority (many-to-one)"
        text.append(format_results(report["baseline"], "Baseline: k-means / linear probe on raw backbone features"))
        if "baseline_majority" in report:
            text.append(format_results(report["baseline_majority"],
                                       f"Baseline over-clustered (K={report['baseline_n_clusters']}), many-to-one "
                                       "majority matching"))
    released = trained.checkpoint.released
    if released is not None:  # the released model's published numbers, side by side
        report["paper"] = {"model": released.name, **dict(released.paper.items()), "note": released.paper.note}
        text.append(paper_comparison(released, report["hp"], crf))
    if context.is_main:
        _write_results(report, results, class_names, folder.claim())
    report["text"] = "\n".join(text)
    report["out_dir"] = str(out)
    return report
