"""The HP training loop (spec §6), readable in one sitting.

    hpseg train --preset cocostuff27 --data-root DIR [key=value ...]

One step: backbone features f and LHP weights (from the backbone or the feature cache) ->
S, S' (EMA), s^mix -> z, z^mix -> GHP + LHP loss (+ consistency, + online probes) -> AdamW /
Adam steps with gradient clipping on S -> EMA update. Reference pools are built before the
first step; the task-specific pool is renewed every ``renew_interval`` steps. Validation every
``val_interval`` steps keeps a ``best`` checkpoint (sum of the four metrics, the reference's
rule) beside ``last``; ``--resume RUN_DIR`` continues from ``last`` as if never interrupted.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from hpseg.backbones import Backbone, create_backbone
from hpseg.cache import open_feature_cache
from hpseg.checkpoint import FORMAT, VERSION, load_checkpoint, save_atomic
from hpseg.config import Config
from hpseg.data import ValCrops, build_raw_dataset
from hpseg.evaluate import evaluate_model, selection_score, validation_loader
from hpseg.features import BackboneFeatures, StepInputs, epoch_batches
from hpseg.method import (
    HiddenPositivesModel,
    IndependentContrastDraw,
    SharedContrastPattern,
    collect_pool,
    consistency_loss,
    hidden_positive_loss,
    lambda_schedule,
    propagate_to_neighbours,
    to_rows,
)
from hpseg.runtime import (
    DistributedContext,
    amp_dtype,
    autocast,
    average_gradients,
    init_distributed,
    resolve_device,
    seed_everything,
)
from hpseg.selection import label_free_scores, probe_rows, selection_text


@dataclass
class RunState:
    """What changes during training besides weights and optimiser moments."""

    step: int = 0
    best_score: float = float("-inf")
    best_step: int = -1
    unsupervised_score: float = float("-inf")  # train.selection=unsupervised: best criterion so far
    unsupervised_step: int = -1
    pool_agnostic: torch.Tensor | None = None
    pool_specific: torch.Tensor | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    """Holds the model, optimisers and run state of one training run."""

    def __init__(self, config: Config, run_dir: Path, *, backbone: Backbone | None = None, progress: bool = True,
                 feature_source: Any | None = None) -> None:
        self.config, self.run_dir, self.progress = config, run_dir, progress
        self.device = resolve_device(config.train.device)
        self.context: DistributedContext = init_distributed(self.device)
        self.amp_dtype = amp_dtype(config.train.amp, self.device)
        seed_everything(config.train.seed + self.context.rank)
        method, optim = config.method, config.optim

        self.backbone = backbone or create_backbone(
            config.backbone.name, weights=config.backbone.weights, pretrained=config.backbone.pretrained
        )
        self.backbone.to(self.device)
        # An explicit source, else the feature cache if data.feature_cache picks one (hpseg.cache).
        self.features = feature_source or open_feature_cache(
            config, self.backbone, device=self.device, say=self._say
        ) or BackboneFeatures(
            self.backbone,
            str(config.data.prepared_path()),
            with_augmented=method.alpha > 0,
            sigma=method.sigma,
            device=self.device,
            amp_dtype=self.amp_dtype,
            num_workers=config.data.num_workers,
        )
        self.class_names: list[str] = list(self.features.dataset.class_names)
        self.model = HiddenPositivesModel(self.backbone.embed_dim, method.dim, method.n_classes, method.dropout,
                                          n_clusters=config.n_clusters)
        self.model.to(self.device)
        self.optimizers = {
            "segmentation": torch.optim.AdamW(
                self.model.segmentation.parameters(), lr=optim.head_lr, weight_decay=optim.head_weight_decay
            ),
            "projection": torch.optim.Adam(self.model.projection.parameters(), lr=optim.projection_lr),
            "linear_probe": torch.optim.Adam(self.model.linear_probe.parameters(), lr=optim.linear_lr),
            "cluster_probe": torch.optim.Adam(self.model.cluster_probe.parameters(), lr=optim.cluster_lr),
        }
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.state = RunState()
        self.pool_generator = torch.Generator().manual_seed(config.train.seed + 1)
        self.contrast_generator = torch.Generator(device=self.device).manual_seed(config.train.seed + 2)

        self.steps_per_epoch = len(self.features) // self.context.world_size // config.train.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{len(self.features)} training crops in {config.data.prepared_path()} are fewer than one batch "
                f"of {config.train.batch_size} per rank: lower train.batch_size"
            )
        self.total_steps = config.train.max_steps or config.train.epochs * self.steps_per_epoch
        self.validation = self._validation_set()
        self.label_free_batches = self._label_free_batches()

    # ------------------------------------------------------------------ setup

    def _validation_set(self) -> ValCrops | None:
        data = self.config.data
        try:
            raw = build_raw_dataset(data.dataset, data.root, "val", n_classes=self.config.method.n_classes,
                                    skip_bad_images=data.skip_bad_images)
        except Exception as error:  # noqa: BLE001 - any layout problem means "no validation"
            self._say(f"no validation: {error}")
            return None
        if not raw.has_labels:
            self._say("no validation: the validation images have no labels")
            return None
        return ValCrops(raw, size=data.val_size)

    def _label_free_batches(self) -> list[list[int]]:
        """A fixed sample of training crops for the label-free criteria (same for every checkpoint)."""
        n = min(self.config.train.label_free_crops, len(self.features))
        order = torch.randperm(len(self.features), generator=torch.Generator().manual_seed(self.config.train.seed + 3))
        chosen, size = order[:n].tolist(), self.config.train.batch_size
        return [chosen[i : i + size] for i in range(0, len(chosen), size)]

    def _say(self, message: str) -> None:
        if self.context.is_main:
            tqdm.write(message)

    def _batches(self, epoch: int) -> list[list[int]]:
        return epoch_batches(len(self.features), self.config.train.batch_size, self.config.train.seed, epoch,
                             self.context.rank, self.context.world_size)

    def _pool_batches(self) -> list[list[int]]:
        order = torch.randperm(len(self.features), generator=self.pool_generator).tolist()
        size = self.config.train.batch_size
        return [order[i : i + size] for i in range(0, len(order), size)]

    def _pool_dropout(self, maps: torch.Tensor) -> torch.Tensor:
        # [ref quirk] the reference fills its pools in training mode: the same channel dropout
        # as the similarity features of a step (similarity_dropout=False: clean features).
        method = self.config.method
        return F.dropout2d(maps, method.dropout, training=True) if method.similarity_dropout else maps

    @torch.no_grad()
    def build_agnostic_pool(self) -> torch.Tensor:
        maps = (self._pool_dropout(f.float()) for f in self.features.feature_maps(self._pool_batches()))
        return collect_pool(maps, self.config.method.pool_size, self.pool_generator).to(self.device)

    @torch.no_grad()
    def build_specific_pool(self) -> torch.Tensor:
        head = self.model.ema_segmentation
        head.train(self.config.method.similarity_dropout)
        maps = (self._pool_dropout(head(f.float())) for f in self.features.feature_maps(self._pool_batches()))
        return collect_pool(maps, self.config.method.pool_size, self.pool_generator).to(self.device)

    # ------------------------------------------------------------------ one step

    def training_step(self, inputs: StepInputs, lmbd: float) -> dict[str, float]:
        method = self.config.method
        model = self.model
        model.train()
        hw = inputs.features.shape[-2] * inputs.features.shape[-1]
        with autocast(self.device, self.amp_dtype):
            features = inputs.features.float()
            segmentation = model.segmentation(features)
            with torch.no_grad():
                # [ref quirk] S' sees channel dropout on its input like S (train mode).
                model.ema_segmentation.train(method.similarity_dropout)
                specific = model.ema_segmentation(features)
            mixed = propagate_to_neighbours(segmentation, inputs.neighbour_weights)
            agnostic = features
            if method.similarity_dropout:
                # [ref quirk] a further dropout draw on f, s' and s^mix as the losses use them.
                agnostic = F.dropout2d(agnostic, method.dropout, training=True)
                specific = F.dropout2d(specific, method.dropout, training=True)
                mixed = F.dropout2d(mixed, method.dropout, training=True)
            z = model.projection(to_rows(segmentation))
            z_mix = model.projection(to_rows(mixed))
            if method.alpha > 0 and inputs.images_aug is not None:
                augmented = self.backbone(inputs.images_aug).features.float()
                z_aug = model.projection(to_rows(model.segmentation(augmented)))
                consistency = consistency_loss(z, z_aug)
            else:
                consistency = torch.zeros((), device=self.device)
            detached = segmentation.detach().float()
            linear = model.linear_probe.loss(detached, inputs.labels)
            cluster = model.cluster_probe.loss(detached)
        # The EMA follows S before this step's update, as in the reference.
        model.update_ema(method.ema_momentum)

        if method.contrast_draw == "shared":
            draw = SharedContrastPattern.draw(hw, z.shape[0], method.rho, self.contrast_generator, self.device)
        else:
            seed = int(torch.randint(2**31 - 1, (1,), generator=self.contrast_generator, device=self.device))
            draw = IndependentContrastDraw(method.rho, seed, self.device)
        # Outside autocast: the loss picks its own product dtype and keeps softmax in float32.
        hp = hidden_positive_loss(
            z, z_mix, to_rows(agnostic.float()), to_rows(specific.float()),
            self.state.pool_agnostic, self.state.pool_specific,
            patches_per_image=hw, contrast_draw=draw, lmbd=lmbd, tau=method.tau, tau_base=method.tau_base,
            temperature_factor=method.temperature_factor, reweighting=method.reweighting,
            chunk_size=method.chunk_size or None,
            matmul_dtype=self.amp_dtype if self.device.type == "cuda" and self.amp_dtype else torch.float32,
        )
        total = hp + method.alpha * consistency + linear + cluster

        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        average_gradients([p for p in model.parameters() if p.requires_grad], self.context)
        for optimizer in self.optimizers.values():
            self.scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.segmentation.parameters(), self.config.optim.grad_clip)
        for optimizer in self.optimizers.values():
            self.scaler.step(optimizer)
        self.scaler.update()
        return {
            "loss": total.item(), "hp": hp.item(), "consistency": consistency.item(),
            "linear_probe": linear.item(), "cluster_probe": cluster.item(), "grad_norm": grad_norm.item(),
        }

    # ------------------------------------------------------------------ loop

    def fit(self) -> dict[str, Any]:
        config, state = self.config, self.state
        if state.pool_agnostic is None:
            self._say("building reference pools ...")
            state.pool_agnostic = self.build_agnostic_pool()
            state.pool_specific = self.build_specific_pool()
        metrics_file = self.run_dir / "metrics.jsonl"
        writer = _tensorboard(self.run_dir) if self.context.is_main else None
        bar = tqdm(total=self.total_steps, initial=state.step, desc="train", disable=not (self.progress and self.context.is_main),
                   dynamic_ncols=True)
        steps = None
        started = time.time()
        while state.step < self.total_steps:
            epoch, position = divmod(state.step, self.steps_per_epoch)
            if steps is None or position == 0:
                steps = self.features.steps(self._batches(epoch)[position:])
            step = state.step
            if step > 0 and step % config.method.renew_interval == 0:
                state.pool_specific = self.build_specific_pool()
            lmbd = lambda_schedule(step, config.method.warmup, self.total_steps)
            values = self.training_step(next(steps), lmbd)
            state.step += 1
            values.update(step=state.step, epoch=epoch, **{"lambda": lmbd}, seconds=round(time.time() - started, 3))
            bar.update(1)
            bar.set_postfix(loss=f"{values['loss']:.3f}", hp=f"{values['hp']:.3f}")
            if self.context.is_main and (state.step % config.train.log_interval == 0 or state.step == self.total_steps):
                _append_jsonl(metrics_file, values)
                if writer is not None:
                    for key in ("loss", "hp", "consistency", "linear_probe", "cluster_probe", "lambda", "grad_norm"):
                        writer.add_scalar(f"train/{key}", values[key], state.step)
            is_last = state.step == self.total_steps
            if self.validation is not None and (state.step % config.train.val_interval == 0 or is_last):
                self.validate(metrics_file, writer)
            if self.label_free_batches and (state.step % config.train.val_interval == 0 or is_last):
                self.score_label_free(metrics_file)
            if self.context.is_main and (state.step % config.train.checkpoint_interval == 0 or is_last):
                self.save("last")
        bar.close()
        if writer is not None:
            writer.close()
        return {"steps": state.step, "best_step": state.best_step, "best_score": state.best_score,
                "unsupervised_step": state.unsupervised_step}

    @torch.no_grad()
    def score_label_free(self, metrics_file: Path) -> dict[str, float]:
        """The label-free criteria of the current weights on the fixed training sample (no labels);
        keeps the ``unsupervised`` checkpoint under train.selection=unsupervised."""
        train = self.config.train
        maps = list(self.features.feature_maps(self.label_free_batches))
        rows, ids = probe_rows(self.model, maps)
        scores = label_free_scores(rows, ids, self.config.n_clusters, seed=train.seed)
        if self.context.is_main:
            _append_jsonl(metrics_file, {"step": self.state.step, "label_free": {k: round(v, 5) for k, v in scores.items()}})
            if train.selection == "unsupervised" and scores[train.unsupervised_criterion] >= self.state.unsupervised_score:
                self.state.unsupervised_score = scores[train.unsupervised_criterion]
                self.state.unsupervised_step = self.state.step
                self.save("unsupervised", metrics={"label_free": scores})
        return scores

    def validate(self, metrics_file: Path, writer: Any) -> dict[str, Any]:
        assert self.validation is not None
        loader = validation_loader(self.validation, batch_size=16, num_workers=self.config.data.num_workers,
                                   context=self.context, max_images=self.config.train.val_max_images)
        results = evaluate_model(self.model, self.backbone, loader, self.config.method.n_classes, self.device,
                                 self.amp_dtype)
        score = selection_score(results)
        if self.context.is_main:
            brief = {key: round(results[key], 4) for key in
                     ("unsupervised_accuracy", "unsupervised_miou", "linear_accuracy", "linear_miou")}
            _append_jsonl(metrics_file, {"step": self.state.step, "validation": brief})
            self._say(f"step {self.state.step}: " + ", ".join(f"{k} {v:.3f}" for k, v in brief.items()))
            if writer is not None:
                for key, value in brief.items():
                    writer.add_scalar(f"val/{key}", value, self.state.step)
            # Only the reference's rule writes best.pt: under "last" / "unsupervised" no label-chosen
            # checkpoint exists for eval or predict to pick up.
            if score >= self.state.best_score and self.config.train.selection == "best":
                self.state.best_score, self.state.best_step = score, self.state.step
                self.save("best", metrics=results)
        return results

    # ------------------------------------------------------------------ checkpoints

    def checkpoint(self, kind: str, metrics: dict[str, Any] | None = None) -> dict[str, Any]:
        state = self.state
        rng = {"torch": torch.get_rng_state(), "pool": self.pool_generator.get_state(),
               "contrast": self.contrast_generator.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "format": FORMAT, "version": VERSION, "kind": kind, "step": state.step,
            "selection": selection_text(kind, self.config.train.unsupervised_criterion),
            "selection_rule": self.config.train.selection,
            "config": self.config.to_dict(),
            "backbone": {"name": self.backbone.spec.name, "weights": self.config.backbone.weights,
                         "pretrained": self.config.backbone.pretrained},
            "class_names": self.class_names,
            "model": self.model.state_dict(),
            "metrics": _json_safe(metrics or {}),
            "training": {
                "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
                "scaler": self.scaler.state_dict(),
                "pool_agnostic": state.pool_agnostic, "pool_specific": state.pool_specific,
                "best_score": state.best_score, "best_step": state.best_step,
                "unsupervised_score": state.unsupervised_score, "unsupervised_step": state.unsupervised_step,
                "total_steps": self.total_steps, "rng": rng,
            },
        }

    def save(self, kind: str, metrics: dict[str, Any] | None = None) -> Path:
        return save_atomic(self.checkpoint(kind, metrics), self.run_dir / "checkpoints" / f"{kind}.pt")

    def restore(self, payload: dict[str, Any]) -> None:
        training = payload["training"]
        self.model.load_state_dict(payload["model"])
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(training["optimizers"][name])
        self.scaler.load_state_dict(training["scaler"])
        self.state.step = int(payload["step"])
        self.state.best_score, self.state.best_step = float(training["best_score"]), int(training["best_step"])
        self.state.unsupervised_score = float(training.get("unsupervised_score", float("-inf")))
        self.state.unsupervised_step = int(training.get("unsupervised_step", -1))
        self.state.pool_agnostic = training["pool_agnostic"].to(self.device)
        self.state.pool_specific = training["pool_specific"].to(self.device)
        rng = training["rng"]
        torch.set_rng_state(rng["torch"])
        self.pool_generator.set_state(rng["pool"])
        self.contrast_generator.set_state(rng["contrast"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def _append_jsonl(path: Path, values: dict[str, Any]) -> None:
    with path.open("a") as stream:
        stream.write(json.dumps(values) + "\n")


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop records logged after the checkpoint we resume from, so the curve has no repeats."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= last_step]
    path.write_text("".join(line + "\n" for line in kept))


def _tensorboard(run_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        tqdm.write("TensorBoard is not installed (pip install tensorboard): logging to metrics.jsonl only")
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def default_run_dir(config: Config) -> Path:
    name = config.train.run_name or f"{config.data.dataset}-{config.backbone.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(config.train.output_dir) / name


def train(config: Config, *, run_dir: str | Path | None = None, backbone: Backbone | None = None,
          progress: bool = True, feature_source: Any | None = None) -> Path:
    """Train a new run; returns its directory (config.yaml, metrics.jsonl, tensorboard/, checkpoints/)."""
    run_dir = Path(run_dir) if run_dir else default_run_dir(config)
    if (run_dir / "checkpoints" / "last.pt").exists():
        raise FileExistsError(f"{run_dir} already holds a run: continue it with --resume {run_dir}, or pick another name")
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(config, run_dir, backbone=backbone, progress=progress, feature_source=feature_source)
    if trainer.context.is_main:
        (run_dir / "config.yaml").write_text(config.to_yaml())
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    trainer.fit()
    return run_dir


def resume(run_dir: str | Path, *, backbone: Backbone | None = None, progress: bool = True,
           feature_source: Any | None = None) -> Path:
    """Continue the run in ``run_dir`` from its ``last`` checkpoint, with the run's own config."""
    run_dir = Path(run_dir)
    payload = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    config = Config.from_dict(payload["config"])
    trainer = Trainer(config, run_dir, backbone=backbone, progress=progress, feature_source=feature_source)
    trainer.restore(payload)
    if trainer.context.is_main:
        _truncate_jsonl(run_dir / "metrics.jsonl", trainer.state.step)
    trainer.fit()
    return run_dir
