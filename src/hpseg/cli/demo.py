"""``hpseg demo``: the whole method in a few CPU minutes, with no data and no network.

    hpseg demo [--out hpseg-demo] [--steps N] [--seed 0] [--weights DINO_FILE]

1. writes a small synthetic dataset (:func:`hpseg.data.make_synthetic_dataset`: regions of a few
   classes, each a colour and a texture, with exact pixel labels);
2. cuts its training images into five crops (the paper's offline step);
3. trains HP on the CPU -- on DINO ViT-S/16 when its weights are at hand (``--weights FILE``,
   or the official file already in the Hugging Face cache; the demo never downloads), otherwise
   on a tiny randomly initialised ViT, and it says which;
4. evaluates HP and the k-means baseline on the raw backbone features with the paper's protocol
   (:func:`hpseg.evaluation.protocol.evaluate_checkpoint` with ``baseline=True``);
5. writes ``figure.png`` (validation image | ground truth | baseline | HP, clusters coloured as
   the classes they are matched to) and ``metrics.json``, and explains the numbers.

Everything lands in ``--out``, marked as the demo's by ``.hpseg-output.json``
(:mod:`hpseg.cli.demo_folder`: a later demo replaces only what the demo wrote, and refuses a
folder holding files of the user's own): ``data/`` (dataset and crops), ``run/`` (checkpoints, metrics
log, TensorBoard events, ``eval-last/results.json``), ``figure.png``, ``metrics.json``.
``hpseg predict IMAGES --checkpoint <out>/run/checkpoints/last.pt --out DIR`` then segments
other images with the demo's model.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import save_file

from hpseg.backbones import Backbone, BackboneOutput, BackboneWeightsError, create_backbone, get_spec
from hpseg.backbones.weights import resolve_official_weights
from hpseg.cli.demo_folder import claim_demo_folder
from hpseg.cli.errors import UsageError
from hpseg.config import Config
from hpseg.data import TrainCrops, ValCrops, build_raw_dataset, make_synthetic_dataset, prepare_five_crops
from hpseg.evaluation.metrics import SegmentationMetrics, apply_assignment
from hpseg.evaluation.protocol import evaluate_checkpoint, fit_baseline
from hpseg.files import write_json_atomic
from hpseg.inference.label_maps import kmeans_label_maps, label_maps
from hpseg.inference.segmenter import Segmenter, load
from hpseg.runtime import resolve_device
from hpseg.training.trainer import train
from hpseg.visualize import figure_grid, palette, save_image_atomic, with_legend

__all__ = ["DemoSettings", "run_demo"]

logger = logging.getLogger(__name__)

#: The official DINO backbone used when its weights are available.
DINO_BACKBONE = "dino_vits16"
#: The random backbone used otherwise.
RANDOM_BACKBONE = "vit_tiny_p8"
#: ``backbone_weights`` in ``metrics.json`` for a randomly initialised backbone.
RANDOM_WEIGHTS = "random initialisation"


@dataclass
class DemoSettings:
    """Sizes of the demo run; the defaults fit in a few minutes on two CPU cores.

    See ``hpseg demo --help``; README's demo table and docs/demo.md report what these give.
    """

    steps: int | None = None  # None: 300 on the tiny random ViT, 150 on DINO ViT-S/16 (slower per step)
    seed: int = 0
    image_size: int | None = None  # synthetic images and validation view; None: 8 patches (64 px at patch 8)
    crop_size: int | None = None  # five-crop training crops; None: 4 patches (32 px at patch 8)
    n_train: int = 32
    n_val: int = 24
    n_classes: int = 6  # with 4 the classes differ by colour alone and k-means on raw features is hard to beat
    batch_size: int = 16
    dim: int = 32  # D, segmentation feature width (half the tiny ViT's 64; see docs/demo.md on how it was chosen)
    pool_size: int = 256
    warmup: int = 50
    renew_interval: int = 20
    figure_images: int = 6


def _official_weights_in_cache(name: str) -> Path | None:
    """The official weights of backbone ``name`` if they are already cached -- never a download."""
    saved = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"  # a pure cache lookup: answers in milliseconds, offline or not
    try:
        return resolve_official_weights(get_spec(name))
    except (BackboneWeightsError, ImportError):
        return None
    finally:
        if saved is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved


def _choose_backbone(out: Path, weights: str | None, backbone: str | None) -> tuple[str, str, bool]:
    """-> (backbone name, weights file, pretrained?). A random backbone is saved to a file so that
    evaluation and prediction load exactly the weights training used."""
    if weights:
        name = backbone or DINO_BACKBONE
        create_backbone(name, weights=weights)  # fail now, clearly, if the file does not fit
        logger.info("backbone: %s with the weights in %s", name, weights)
        return name, str(weights), True
    name = backbone or DINO_BACKBONE
    if get_spec(name).has_official_weights:
        cached = _official_weights_in_cache(name)
        if cached is not None:
            logger.info("backbone: %s with the official DINO weights found in the cache (%s)", name, cached)
            return name, str(cached), True
    if backbone and get_spec(backbone).has_official_weights:
        raise UsageError(f"no weights for {backbone!r} in the cache: pass them with --weights FILE")
    name = backbone or RANDOM_BACKBONE
    # A warning, shown even with --quiet: a random backbone makes the demo's segments meaningless on photos.
    logger.warning(
        "backbone: %s, RANDOMLY INITIALISED -- no DINO weights here (none given with --weights, none in the "
        "Hugging Face cache). HP itself runs as on real weights, but a random network's features only carry "
        "colour and a little texture: on real images this gives meaningless segments. With DINO weights "
        "(`hpseg demo --weights dino_deitsmall16_pretrain.pth`, file from %s) the features carry object parts "
        "and semantics, which is what HP turns into classes on real photos.", name,
        get_spec(DINO_BACKBONE).weights_source)
    model = create_backbone(name, pretrained=False).model  # hpseg's deterministic random initialisation
    file = out / f"backbone-{name}-random.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(file))
    return name, str(file.resolve()), False


def _config(settings: DemoSettings, data: Path, prepared: Path, name: str, weights: str, pretrained: bool,
            out: Path) -> Config:
    s = settings
    # The weights file is what every step loads; backbone.pretrained records whether it holds trained
    # weights (false: the random initialisation saved to a file), which reports and the hub card state.
    return Config().override([
        f"backbone.name={name}", f"backbone.weights={weights}", f"backbone.pretrained={str(pretrained).lower()}",
        "data.dataset=folder", f"data.root={data}", f"data.prepared_dir={prepared}",
        f"data.crop_size={s.crop_size}", f"data.val_size={s.image_size}", "data.num_workers=0",
        f"method.dim={s.dim}", f"method.n_classes={s.n_classes}", f"method.pool_size={s.pool_size}",
        f"method.warmup={min(s.warmup, max(0, s.steps - 1))}", f"method.renew_interval={s.renew_interval}",
        f"train.batch_size={s.batch_size}", f"train.max_steps={s.steps}", f"train.seed={s.seed}",
        f"train.val_interval={s.steps}", "train.log_interval=10", f"train.checkpoint_interval={s.steps}",
        "train.selection=last", f"train.output_dir={out}", "train.run_name=run",
    ])


def _kmeans_maps(extractor: Any, crops: TrainCrops, validation: ValCrops, n_classes: int, device: torch.device,
                 seed: int) -> tuple[list[torch.Tensor], torch.Tensor, dict[str, Any]]:
    """k-means (K = n_classes) on ``extractor``'s features of the training crops -- exactly the
    evaluation's baseline procedure -- then the validation label maps, their Hungarian
    cluster->class matching over the whole validation set and its scores."""
    centroids, _ = fit_baseline(extractor, crops, n_classes, device, seed=seed, linear_steps=0)
    metrics = SegmentationMetrics(n_classes)
    maps = []
    for i in range(len(validation)):
        item = validation[i]
        features = extractor(item["image"][None].to(device)).features
        clusters = kmeans_label_maps(features, centroids, tuple(item["label"].shape))
        metrics.update(clusters, item["label"][None].to(device))
        maps.append(clusters[0])
    scores = metrics.compute()
    return maps, scores["assignment"], scores


class _HeadFeatures(torch.nn.Module):
    """Backbone + HP's segmentation head seen as a backbone whose features are s."""

    def __init__(self, backbone: Backbone, head: torch.nn.Module) -> None:
        super().__init__()
        self.backbone, self.head, self.patch_size = backbone, head, backbone.patch_size

    @torch.no_grad()
    def forward(self, images: torch.Tensor, with_attention: bool = False) -> BackboneOutput:
        return BackboneOutput(self.head(self.backbone(images).features))


def _clusters_used(segmenter: Segmenter, validation: ValCrops, n_classes: int, device: torch.device) -> int:
    """How many of its K centroids HP's cluster probe actually uses on the validation images: a
    centroid that never wins a patch gets no gradient (the reference's probe) and stays unused."""
    usage = torch.zeros(n_classes)
    for i in range(len(validation)):
        item = validation[i]
        features = segmenter.backbone(item["image"][None].to(device)).features
        clusters = label_maps(segmenter.model, features, tuple(item["label"].shape)).clusters
        usage += torch.bincount(clusters.flatten().cpu(), minlength=n_classes).float()
    return int((usage / usage.sum() >= 0.005).sum())


def _figure(segmenter: Segmenter, report: dict[str, Any], config: Config, settings: DemoSettings,
            device: torch.device, path: Path) -> dict[str, Any]:
    """image | ground truth | k-means on raw features | HP | k-means on HP's features, for the first
    validation images; every method's clusters coloured as the classes its Hungarian matching gives."""
    n_classes, seed = config.method.n_classes, config.train.seed
    validation = ValCrops(build_raw_dataset("folder", config.data.root, "val"), size=config.data.val_size)
    crops = TrainCrops(config.data.prepared_path(), with_augmented=False)
    base_maps, base_assignment, base_scores = _kmeans_maps(segmenter.backbone, crops, validation, n_classes, device,
                                                           seed)
    used = _clusters_used(segmenter, validation, n_classes, device)
    head = _HeadFeatures(segmenter.backbone, segmenter.model.segmentation).eval()
    head_maps, head_assignment, head_scores = _kmeans_maps(head, crops, validation, n_classes, device, seed)
    rows = []
    for i in range(min(settings.figure_images, len(validation))):
        item = validation[i]
        rgb = item["rgb"]
        rows.append([
            Image.fromarray(rgb.permute(1, 2, 0).numpy(), "RGB"),
            item["label"].numpy(),
            apply_assignment(base_maps[i], base_assignment).cpu().numpy(),
            segmenter.segment(rgb, head="cluster"),  # mapped to classes by the evaluation's matching
            apply_assignment(head_maps[i], head_assignment).cpu().numpy(),
        ])
    titles = [
        "image", "ground truth",
        f"k-means, raw ({100 * report['baseline']['unsupervised_miou']:.0f})",
        f"HP probe ({100 * report['hp']['unsupervised_miou']:.0f})",
        f"k-means, HP ({100 * head_scores['miou']:.0f})",
    ]
    colours = palette(n_classes)
    entries = [(name, tuple(int(c) for c in colours[k])) for k, name in enumerate(segmenter.class_names)]
    figure = with_legend(figure_grid(rows, titles=titles, cell=128),
                         [*entries, ("(numbers: unsupervised mIoU)", (255, 255, 255))])
    save_image_atomic(figure, path)
    return {
        "hp_features_kmeans": {"unsupervised_accuracy": float(head_scores["accuracy"]),
                               "unsupervised_miou": float(head_scores["miou"]),
                               "cluster_to_class": [int(v) for v in head_assignment]},
        "hp_probe_clusters_used": used,
        "baseline_cluster_to_class": [int(v) for v in base_assignment],
        # The same k-means as the evaluation's baseline (same seed and patches): a check that the
        # figure shows what was scored.
        "figure_baseline_accuracy": float(base_scores["accuracy"]),
    }


def _numbers_table(metrics: dict[str, Any]) -> list[str]:
    hp, base, head = metrics["hp"], metrics["baseline"], metrics["hp_features_kmeans"]

    def pct(value: float | None) -> str:
        return "    -" if value is None else f"{100 * value:5.1f}"

    return [
        "                         k-means on     HP (cluster   k-means on",
        "                         raw features   probe)        HP's features",
        f"  unsupervised accuracy  {pct(base['unsupervised_accuracy'])}          {pct(hp['unsupervised_accuracy'])}"
        f"         {pct(head['unsupervised_accuracy'])}",
        f"  unsupervised mIoU      {pct(base['unsupervised_miou'])}          {pct(hp['unsupervised_miou'])}"
        f"         {pct(head['unsupervised_miou'])}",
        f"  linear accuracy        {pct(base.get('linear_accuracy'))}          {pct(hp['linear_accuracy'])}",
        f"  linear mIoU            {pct(base.get('linear_miou'))}          {pct(hp['linear_miou'])}",
    ]


def explain(metrics: dict[str, Any]) -> str:
    """The demo's numbers (the content of ``metrics.json``) as a table, and what they mean."""
    lines = [
        *_numbers_table(metrics),
        "",
        "What the numbers mean (percent):",
        "  unsupervised: every pixel gets one of K clusters without ever seeing a label; only to score them are",
        "    clusters matched one-to-one to classes (Hungarian matching on the validation set), then",
        "    accuracy = matched pixels / labelled pixels and mIoU = mean intersection-over-union over classes.",
        "    * k-means on raw features: the paper's baseline, clustering the frozen backbone's features;",
        "    * HP (cluster probe): the paper's protocol, K centroids trained online on HP's features;",
        "    * k-means on HP's features: the baseline's own clustering applied to HP's features -- the same",
        "      algorithm on both sides, so the difference is what HP's training adds to the features.",
        "  linear: a linear classifier trained WITH the training labels on the frozen features; it measures",
        "    how much class information the features hold, not unsupervised segmentation.",
    ]
    k, used = len(metrics["hp_features_kmeans"]["cluster_to_class"]), metrics["hp_probe_clusters_used"]
    if used < k:
        lines.append(f"  Note: HP's cluster probe uses only {used} of its {k} clusters here: a "
                     "randomly initialised centroid that never")
        lines.append("    wins a patch gets no gradient and stays unused (as in the reference), which merges classes;")
        lines.append("    k-means on the same features does not have this failure.")
    if metrics["backbone_weights"] == RANDOM_WEIGHTS:
        lines.append("  The backbone is random here: the columns show what HP adds on top of the same features on toy")
        lines.append("  data, not what it does on real photos (docs/paper.md has the paper's numbers).")
    return "\n".join(lines)


def where_things_are(metrics: dict[str, Any], out: str | Path) -> str:
    """The files the demo wrote, a command to try next and the time it took."""
    out, timings, checkpoint = Path(out), metrics["timings"], metrics["checkpoint"]
    return "\n".join([
        f"figure:  {out / 'figure.png'}  (image | ground truth | k-means on raw features | HP | k-means on HP's "
        "features)",
        f"metrics: {out / 'metrics.json'}",
        f"model:   {checkpoint}  -- try: hpseg predict {out / 'data' / 'val' / 'images'} --checkpoint {checkpoint} "
        f"--out {out / 'predictions'} --figure",
        f"took {timings['total_s']:.0f} s (data {timings['data_s']:.0f}, training {timings['train_s']:.0f}, "
        f"evaluation {timings['eval_s']:.0f}, figure {timings['figure_s']:.0f})",
    ])


def run_demo(
    out: str | Path = "hpseg-demo",
    *,
    settings: DemoSettings | None = None,
    weights: str | None = None,
    backbone: str | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Run the demo into ``out`` and return the content of ``metrics.json`` (progress goes to the
    ``hpseg`` logger; :func:`explain` turns the result into text)."""
    settings = settings or DemoSettings()
    if settings.steps is not None and settings.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {settings.steps}")
    torch_device = resolve_device(device)
    threads = torch.get_num_threads()
    if torch_device.type == "cpu":
        # The demo's tensors are tiny: one thread avoids the per-operation cost of intra-op
        # parallelism, which on two cores made every step several times slower (measured).
        torch.set_num_threads(1)
    try:
        return _run(Path(out), settings, weights, backbone, torch_device)
    finally:
        torch.set_num_threads(threads)


def _synthetic_data(out: Path, settings: DemoSettings) -> tuple[Path, Path]:
    """The synthetic dataset and its five-crop training set: (data root, prepared folder)."""
    logger.info("[1/4] synthetic dataset: %d training and %d validation images of %dx%d, %d classes -> %s",
                settings.n_train, settings.n_val, settings.image_size, settings.image_size, settings.n_classes,
                out / "data")
    data = make_synthetic_dataset(out / "data", n_train=settings.n_train, n_val=settings.n_val,
                                  size=settings.image_size, n_classes=settings.n_classes, seed=settings.seed)
    prepared = data / "hpseg_prepared" / f"train_{settings.crop_size}"
    prepare_five_crops(build_raw_dataset("folder", data, "train"), prepared, crop_size=settings.crop_size)
    return data, prepared


def _train(config: Config, run_dir: Path, settings: DemoSettings, torch_device: torch.device) -> None:
    logger.info("[2/4] training HP for %d steps (batch %d crops of %dpx) on %s", settings.steps, settings.batch_size,
                settings.crop_size, torch_device)
    train(config, run_dir=run_dir)


def _run(out: Path, settings: DemoSettings, weights: str | None, backbone: str | None,
         torch_device: torch.device) -> dict[str, Any]:
    started = time.time()
    claim_demo_folder(out)  # before anything is written: refuses a folder holding the user's own files
    timings: dict[str, float] = {}
    name, weights_file, pretrained = _choose_backbone(out, weights, backbone)
    patch = get_spec(name).patch_size
    settings = replace(settings, image_size=settings.image_size or 8 * patch, crop_size=settings.crop_size or 4 * patch,
                       steps=settings.steps or (150 if pretrained else 300))
    data, prepared = _synthetic_data(out, settings)
    timings["data_s"] = round(time.time() - started, 1)

    config = _config(settings, data, prepared, name, weights_file, pretrained, out)
    config.train.device = str(torch_device)
    run_dir = out / "run"
    mark = time.time()
    _train(config, run_dir, settings, torch_device)
    timings["train_s"] = round(time.time() - mark, 1)

    logger.info("[3/4] evaluating HP and the k-means baseline on the validation images")
    mark = time.time()
    checkpoint = run_dir / "checkpoints" / "last.pt"
    eval_dir = run_dir / "eval-last"
    report = evaluate_checkpoint(checkpoint, out_dir=eval_dir, baseline=True, device=str(torch_device))
    timings["eval_s"] = round(time.time() - mark, 1)

    logger.info("[4/4] drawing the figure")
    mark = time.time()
    segmenter = load(checkpoint, device=str(torch_device), mapping=eval_dir / "results.json")
    extra = _figure(segmenter, report, config, settings, torch_device, out / "figure.png")
    timings["figure_s"] = round(time.time() - mark, 1)
    timings["total_s"] = round(time.time() - started, 1)

    metrics: dict[str, Any] = {
        "hp": report["hp"],
        "baseline": report.get("baseline", {}),
        "hp_beats_baseline_unsupervised_miou": report["hp"]["unsupervised_miou"] > report["baseline"]["unsupervised_miou"],
        "backbone": name,
        "backbone_weights": RANDOM_WEIGHTS if not pretrained else weights_file,
        "checkpoint": str(checkpoint),
        "evaluation": str(eval_dir / "results.json"),
        "cluster_to_class": report["cluster_to_class"],
        **extra,
        "settings": asdict(settings),
        "device": str(torch_device),
        "timings": timings,
        "meaning": {
            "unsupervised": "clusters found without labels, matched one-to-one to classes (Hungarian) only for "
                            "scoring; accuracy = matched pixels / labelled pixels, mIoU = mean per-class IoU",
            "linear": "a linear probe trained with the training labels on the frozen features",
            "baseline": "k-means (K = number of classes) and a linear probe on the raw backbone features",
        },
    }
    write_json_atomic(metrics, out / "metrics.json")
    return metrics


def run_cli(args: Any) -> int:
    """``hpseg demo``: the arguments the parser (:func:`hpseg.cli.main.build_parser`) did not
    leave out override :class:`DemoSettings`' defaults."""
    given = {f.name: getattr(args, f.name) for f in fields(DemoSettings) if getattr(args, f.name, None) is not None}
    metrics = run_demo(args.out, settings=DemoSettings(**given), weights=args.weights, backbone=args.backbone,
                       device=args.device)
    print(f"\n{explain(metrics)}\n\n{where_things_are(metrics, args.out)}")
    return 0
