"""The HP training loop (spec §6), readable in one sitting.

    hpseg train --preset cocostuff27 --data-root DIR [key=value ...]

The inputs of a step come from a :class:`~hpseg.training.features.FeatureSource` (the backbone
or the feature cache); the step itself is :func:`hpseg.training.step.training_step`, called from
:meth:`Trainer.fit`. Threshold pools (:mod:`hpseg.training.pools`) are built before the first step; the task-specific pool is renewed every
``renew_interval`` steps (counted within the epoch, [ref quirk]). Validation every
``val_interval`` steps (within the epoch) and at the end of every epoch keeps a ``best``
checkpoint (sum of the four metrics, the reference's rule) beside ``last`` under
``train.selection=best``; the label-free criteria are scored at the same steps
(:mod:`hpseg.training.selection`) and keep ``unsupervised`` under that rule;
``--resume RUN_DIR`` continues from ``last`` as if never interrupted. A non-finite loss stops the
run with :class:`NonFiniteLossError` (the step, the value, the last good checkpoint).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hpseg.backbones import Backbone, create_backbone
from hpseg.checkpoints.payload import BackboneRecord, CheckpointKind, CheckpointPayload, TrainingState
from hpseg.checkpoints.runs import selection_text
from hpseg.checkpoints.store import CheckpointError, save_atomic
from hpseg.config import Config
from hpseg.data import DatasetLayoutError, ValCrops, build_raw_dataset
from hpseg.errors import HpsegError, InvalidInputError
from hpseg.evaluation.evaluator import EvaluationResults
from hpseg.evaluation.protocol import (
    evaluate_features,
    evaluate_model,
    selection_score,
    validation_indices,
    validation_loader,
)
from hpseg.logs import progress_bar
from hpseg.method import lambda_schedule
from hpseg.runtime import DistributedContext, amp_dtype, init_distributed, resolve_device, seed_everything
from hpseg.training import distributed
from hpseg.training.cache import open_feature_cache
from hpseg.training.features import BackboneFeatures, FeatureSource, StepInputs, batch_seeds, epoch_batches
from hpseg.training.lost_ranks import explain_lost_ranks
from hpseg.training.pools import ThresholdPools, collect_pool, pool_batches
from hpseg.training.run_checks import (
    check_class_count,
    check_prepared_recipe,
    resumable_checkpoint,
    training_state_errors,
    truncate_metrics,
)
from hpseg.training.run_lock import run_lock
from hpseg.training.selection import label_free_batches, label_free_scores, probe_rows
from hpseg.training.step import build_learner, draw_contrast, pool_dropout, specific_pool_maps, training_step
from hpseg.training.timers import PhaseTimers, device_synchronizer
from hpseg.training.validation_cache import ValidationFeatures, validation_cache_dir, validation_features

logger = logging.getLogger(__name__)
# Ranks other than the first show no progress bar: their bars log through a logger that is off.
_other_ranks = logging.getLogger(f"{__name__}.other_ranks")
_other_ranks.setLevel(logging.WARNING)


class NonFiniteLossError(HpsegError, RuntimeError):
    """The loss of a step is NaN or infinite: training stops before that step changes any weight."""


@dataclass
class RunState:
    """What changes during training besides weights and optimiser moments (``Trainer.learner``):
    the place of the run, its selection records, its pools and the generators of its draws."""

    pool_generator: torch.Generator  # which crops, and which patch of each, fill a pool
    contrast_generator: torch.Generator  # the random part of each step's contrast sets
    step: int = 0
    best_score: float = float("-inf")
    best_step: int = -1
    unsupervised_score: float = float("-inf")  # train.selection=unsupervised: best criterion so far
    unsupervised_step: int = -1
    pools: ThresholdPools | None = None
    last_saved_step: int | None = None  # the step of checkpoints/last.pt, once this run wrote or resumed it


def renews_pool_before(step: int, steps_per_epoch: int, interval: int, counter: str = "epoch") -> bool:
    """Whether the task-specific pool is renewed before (0-based) ``step``.

    counter="epoch" [ref quirk]: the step's index within its epoch is a non-zero multiple of
    ``interval``; "global": the step itself is.
    """
    index = step % steps_per_epoch if counter == "epoch" else step
    return index > 0 and index % interval == 0


def validates_after(step: int, steps_per_epoch: int, interval: int, total_steps: int,
                    at_epoch_end: bool = True) -> bool:
    """Whether validation runs after the (1-based) ``step``-th step: every ``interval`` steps
    counted within the epoch (as the reference), at the run's last step and, with
    ``at_epoch_end`` [ref quirk], at every epoch's last step."""
    within = (step - 1) % steps_per_epoch + 1
    return within % interval == 0 or step == total_steps or (at_epoch_end and within == steps_per_epoch)


class Trainer:
    """Holds the model, optimisers and run state of one training run."""

    def __init__(self, config: Config, run_dir: Path, *, backbone: Backbone | None = None,
                 feature_source: FeatureSource | None = None, device: torch.device | None = None,
                 context: DistributedContext | None = None) -> None:
        """``device`` and ``context``: where :func:`train` already resolved them (None: here)."""
        self.config, self.run_dir = config, run_dir
        self.device = device or resolve_device(config.train.device)
        self.timers = PhaseTimers(device_synchronizer(self.device))  # where the run's time goes (metrics.jsonl)
        self.context: DistributedContext = context or init_distributed(self.device)
        self.amp_dtype = amp_dtype(config.train.amp, self.device)
        # One seed for what every rank builds (backbone, heads); see _seed_ranks for the rest.
        seed_everything(config.train.seed)
        distributed.check_batch_split(config.train.batch_size, self.context)
        self.backbone = backbone or create_backbone(
            config.backbone.name, weights=config.backbone.weights, pretrained=config.backbone.pretrained
        )
        self.backbone.to(self.device)
        self.features: FeatureSource = feature_source or self._default_feature_source()
        self.features.timers = self.timers  # the loader's waits: timing "loader_wait"
        self.class_names: list[str] = list(self.features.class_names)
        if self.features.has_labels:
            check_class_count(config, len(self.class_names), config.data.prepared_path() / "manifest.json")
        crops = getattr(self.features, "dataset", None)
        if hasattr(crops, "manifest"):  # a run (or a resumed one) on items made otherwise is refused
            check_prepared_recipe(config, crops.manifest, config.data.prepared_path())
        self.learner = build_learner(config, self.backbone.embed_dim, self.device, self.amp_dtype, self.context)
        self.model, self.optimizers, self.scaler = self.learner.model, self.learner.optimizers, self.learner.scaler
        self._seed_ranks()
        self.state = RunState(pool_generator=torch.Generator().manual_seed(config.train.seed + 1),
                              contrast_generator=torch.Generator(device=self.device).manual_seed(config.train.seed + 2))

        self.steps_per_epoch = len(self.features) // config.train.batch_size
        if self.steps_per_epoch == 0:
            raise InvalidInputError(
                f"{len(self.features)} training crops in {config.data.prepared_path()} are fewer than one batch "
                f"of {config.train.batch_size} (train.batch_size, the global batch): lower train.batch_size"
            )
        self.total_steps = config.train.max_steps or config.train.epochs * self.steps_per_epoch
        self.validation = self._validation_set()
        if self.validation is None and config.train.selection == "best":
            # "best" ranks checkpoints by labelled validation metrics: without them it would keep
            # no checkpoint at all. The final weights are the label-free choice that needs nothing.
            self._notice("train.selection=best needs labelled validation images, which this dataset lacks: "
                         "keeping the final weights instead (train.selection=last, checkpoints/last.pt)")
            self.config = config = copy.deepcopy(config)
            config.train.selection = "last"
        self.label_free_batches = label_free_batches(len(self.features), config.train.label_free_crops,
                                                     config.train.batch_size, config.train.seed + 3)
        self.validation_features: ValidationFeatures | None = None  # built at the first validation
        self.timers.add("startup", time.perf_counter() - self.timers.started)

    # ------------------------------------------------------------------ setup

    def _seed_ranks(self) -> None:
        """Rank 0's weights on every rank (the same seed built them: a check that costs one
        broadcast), then a seed of its own per rank for channel dropout."""
        distributed.broadcast_module(self.model, self.context)
        if self.context.rank:
            seed_everything(self.config.train.seed + self.context.rank)

    def _default_feature_source(self) -> FeatureSource:
        """The feature cache if ``data.feature_cache`` picks one (hpseg.training.cache), else the backbone."""
        config = self.config
        prepared = config.data.prepared_path()
        with_augmented = config.method.alpha > 0
        cached = open_feature_cache(
            config.data.feature_cache, prepared, self.backbone, sigma=config.method.sigma,
            with_augmented=with_augmented, device=self.device, amp_dtype=self.amp_dtype,
            num_workers=config.data.num_workers, photometric_input=config.data.photometric_input,
        )
        return cached or BackboneFeatures(
            self.backbone, str(prepared), with_augmented=with_augmented, sigma=config.method.sigma,
            device=self.device, amp_dtype=self.amp_dtype, num_workers=config.data.num_workers,
            photometric_input=config.data.photometric_input,
        )

    def _validation_set(self) -> ValCrops | None:
        """The labelled validation split, or None when it is missing or unlabelled; any other
        problem with it (a damaged layout, an unreadable file ...) stops training."""
        data = self.config.data
        try:
            raw = build_raw_dataset(data.dataset, data.root, "val", n_classes=self.config.method.n_classes,
                                    skip_bad_images=data.skip_bad_images)
        except DatasetLayoutError as error:
            if error.path is None or error.path.exists():
                raise
            self._notice(f"no validation: {error}")
            return None
        if not raw.has_labels:
            self._notice("no validation: the validation images have no labels")
            return None
        check_class_count(self.config, raw.n_classes, f"the validation split of {data.dataset} in {raw.root}")
        return ValCrops(raw, size=data.val_size)

    def _notice(self, message: str) -> None:
        if self.context.is_main:
            logger.info(message)

    def _pool(self, maps_of: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """A pool of the job: each rank computes ``maps_of`` its share of every batch; the rows are gathered."""
        train, pool_size = self.config.train, self.config.method.pool_size
        batches = pool_batches(len(self.features), train.batch_size, pool_size, self.state.pool_generator,
                               self.context.world_size)
        shares = [distributed.rank_share(batch, self.context) for batch in batches]
        # A bar of its own: on a CPU the backbone passes of the first pools take close to a minute.
        feature_maps = progress_bar(self.features.feature_maps(shares), logger if self.context.is_main else _other_ranks,
                                    total=len(shares), desc="threshold pools", unit="batch", leave=False)
        maps = (maps_of(f) for f in feature_maps)
        pool = collect_pool(maps, [len(b) for b in batches], pool_size, self.state.pool_generator, self.context)
        return pool.to(self.device)

    @torch.no_grad()
    def build_agnostic_pool(self) -> torch.Tensor:
        return self._pool(lambda f: pool_dropout(self.config.method, f.float()))

    @torch.no_grad()
    def build_specific_pool(self) -> torch.Tensor:
        return self._pool(lambda f: specific_pool_maps(self.model, self.config.method, f))

    # ------------------------------------------------------------------ loop

    def _epoch_steps(self, epoch: int, position: int) -> Iterator[StepInputs]:
        """The step inputs of ``epoch`` from batch ``position`` on (a resumed run starts mid-epoch)."""
        train = self.config.train
        # The single-process order of global batches; each rank reads its share of each.
        batches = epoch_batches(len(self.features), train.batch_size, train.seed, epoch)
        seeds = batch_seeds(train.seed, epoch, len(batches))
        shares = [distributed.rank_share(batch, self.context) for batch in batches[position:]]
        return self.features.steps(shares, seeds[position:])

    def fit(self) -> dict[str, Any]:
        """Train to ``total_steps``; under torchrun a lost rank stops the others with the resume
        command (hpseg.training.lost_ranks), which the log also gives at the start."""
        config, state, train = self.config, self.state, self.config.train
        if self.context.enabled:
            self._notice(f"{self.context.world_size} ranks train {self.run_dir}: if one fails, the others stop "
                         f"and `hpseg train --resume {self.run_dir}` under the same torchrun command continues "
                         "from checkpoints/last.pt")
        # Under torchrun with global positives the contrast pattern spans the patches of the global batch.
        global_positives = self.context.enabled and train.positives == "global"
        metrics_file = self.run_dir / "metrics.jsonl"
        with explain_lost_ranks(self.context, self.run_dir, lambda: state.step):
            self._initial_pools()
            writer = _tensorboard(self.run_dir) if self.context.is_main else None
            bar = progress_bar(range(state.step, self.total_steps), logger if self.context.is_main else _other_ranks,
                               total=self.total_steps, initial=state.step, desc="train", dynamic_ncols=True)
            steps = None
            started = time.time()
            for step in bar:
                epoch, position = divmod(step, self.steps_per_epoch)
                if steps is None or position == 0:
                    steps = self._epoch_steps(epoch, position)
                if renews_pool_before(step, self.steps_per_epoch, config.method.renew_interval,
                                      config.method.renew_counter):
                    self._renew_specific_pool()
                lmbd = lambda_schedule(step, config.method.warmup, self.total_steps)
                with self.timers.phase("data_wait"):
                    inputs = next(steps)
                with self.timers.phase("step"):
                    batch, _, height, width = inputs.features.shape
                    images = train.batch_size if global_positives else batch
                    draw = draw_contrast(config.method, height * width, images * height * width,
                                         self.state.contrast_generator, self.device)
                    values = training_step(self.learner, inputs, state.pools, draw, lmbd)
                if not math.isfinite(values["loss"]):
                    raise self._non_finite(step + 1, values)
                state.step = step + 1
                values.update(step=state.step, epoch=epoch, **{"lambda": lmbd}, seconds=round(time.time() - started, 3))
                bar.set_postfix(loss=f"{values['loss']:.3f}", hp=f"{values['hp']:.3f}")
                self._after_step(values, metrics_file, writer)
            bar.close()
            if writer is not None:
                writer.close()
            self._log_timing(metrics_file)
        return {"steps": state.step, "best_step": state.best_step, "best_score": state.best_score,
                "unsupervised_step": state.unsupervised_step}

    def _initial_pools(self) -> None:
        """Both threshold pools, unless a resumed run brought them."""
        if self.state.pools is None:
            self._notice("building threshold pools ...")
            with self.timers.phase("initial_pools"):
                agnostic = self.build_agnostic_pool()
                self.state.pools = ThresholdPools(agnostic, self.build_specific_pool())

    def _non_finite(self, step: int, values: dict[str, float]) -> NonFiniteLossError:
        """The error that stops the run at ``step``, whose loss (terms in ``values``) is not finite."""
        terms = ", ".join(f"{key} {values[key]:.6g}" for key in ("hp", "consistency", "linear_probe", "cluster_probe")
                          if key in values)
        last = self.run_dir / "checkpoints" / "last.pt"
        saved = self.state.last_saved_step
        where = (f"the last good checkpoint is {last} (step {saved}): `hpseg train --resume {self.run_dir}` continues "
                 "from it (a lower learning rate, or train.amp=none, may avoid the overflow)" if saved is not None
                 else "no checkpoint was written before it (train.checkpoint_interval)")
        return NonFiniteLossError(f"step {step}: the loss is {values['loss']} ({terms}); training stopped before "
                                  f"that step changed any weight; {where}")

    def _after_step(self, values: dict[str, Any], metrics_file: Path, writer: Any) -> None:
        """Log the step's values, validate and write ``last`` when their intervals say so."""
        train, step = self.config.train, self.state.step
        is_last = step == self.total_steps
        if self.context.is_main and (step % train.log_interval == 0 or is_last):
            _append_jsonl(metrics_file, values)
            if writer is not None:
                for key in ("loss", "hp", "consistency", "linear_probe", "cluster_probe", "lambda", "grad_norm"):
                    if key in values:  # consistency: absent when α = 0 (not computed)
                        writer.add_scalar(f"train/{key}", values[key], step)
        if validates_after(step, self.steps_per_epoch, train.val_interval, self.total_steps,
                           train.validate_at_epoch_end):
            if self.validation is not None:
                self.validate(metrics_file, writer)
            if self.label_free_batches:
                self.score_label_free(metrics_file)
        if step % train.checkpoint_interval == 0 or is_last:
            distributed.check_same_weights(self.model, self.context)
            if self.context.is_main:
                self.save("last")
            self.state.last_saved_step = step

    def validate(self, metrics_file: Path, writer: Any) -> EvaluationResults:
        with self.timers.phase("validation"):
            results = self._evaluate()
        score = selection_score(results)
        if self.context.is_main:
            brief = {key: round(value, 4) for key, value in results.metrics().items()}
            _append_jsonl(metrics_file, {"step": self.state.step, "validation": brief})
            self._notice(f"step {self.state.step}: " + ", ".join(f"{k} {v:.3f}" for k, v in brief.items()))
            if writer is not None:
                for key, value in brief.items():
                    writer.add_scalar(f"val/{key}", value, self.state.step)
            # Only the reference's rule writes best.pt: under "last" / "unsupervised" no label-chosen
            # checkpoint exists for eval or predict to pick up.
            if score >= self.state.best_score and self.config.train.selection == "best":
                self.state.best_score, self.state.best_step = score, self.state.step
                self.save("best", metrics=results.to_dict())
            self._log_timing(metrics_file)
        return results

    @torch.no_grad()
    def score_label_free(self, metrics_file: Path) -> dict[str, float]:
        """The label-free criteria of the current weights on the fixed training sample (no labels);
        keeps the ``unsupervised`` checkpoint under train.selection=unsupervised."""
        train, state = self.config.train, self.state
        rows, ids = probe_rows(self.model, self.features.feature_maps(self.label_free_batches))
        scores = label_free_scores(rows, ids, self.config.n_clusters, seed=train.seed)
        if self.context.is_main:
            _append_jsonl(metrics_file, {"step": state.step, "label_free": {k: round(v, 5) for k, v in scores.items()}})
            if train.selection == "unsupervised" and scores[train.unsupervised_criterion] >= state.unsupervised_score:
                state.unsupervised_score, state.unsupervised_step = scores[train.unsupervised_criterion], state.step
                self.save("unsupervised", metrics={"label_free": scores})
        return scores

    def _evaluate(self) -> EvaluationResults:
        """The validation metrics of this rank's images, from the validation features when
        ``data.val_feature_cache`` keeps them (computed at the first call), else with the backbone."""
        assert self.validation is not None
        data, n_classes = self.config.data, self.config.method.n_classes
        if self.validation_features is None:
            indices = validation_indices(len(self.validation), self.context, self.config.train.val_max_images)
            cache_dir = validation_cache_dir(data.prepared_path(), self.backbone.spec.name, self.validation.size,
                                             self.context.rank, self.context.world_size)
            with self.timers.phase("validation_features"):
                self.validation_features = validation_features(
                    data.val_feature_cache, self.validation, indices, self.backbone, self.device, self.amp_dtype,
                    cache_dir=cache_dir, num_workers=data.num_workers)
        if self.validation_features is not None:
            return evaluate_features(self.model, self.validation_features.batches(16, self.device), n_classes,
                                     total_images=len(self.validation_features.features))
        loader = validation_loader(self.validation, batch_size=16, num_workers=data.num_workers,
                                   context=self.context, max_images=self.config.train.val_max_images)
        return evaluate_model(self.model, self.backbone, loader, n_classes, self.device, self.amp_dtype)

    def _renew_specific_pool(self) -> None:
        """A new task-specific pool (spec §3), its duration logged."""
        assert self.state.pools is not None
        with self.timers.phase("renewal"):
            start = time.perf_counter()
            self.state.pools.specific = self.build_specific_pool()
        self._notice(f"step {self.state.step}: task-specific pool renewed in {time.perf_counter() - start:.2f} s")

    def _log_timing(self, metrics_file: Path) -> None:
        """The run's time per phase so far (hpseg.training.timers) as a metrics.jsonl record."""
        if self.context.is_main:
            _append_jsonl(metrics_file, {"step": self.state.step, "timing": self.timers.summary()})

    # ------------------------------------------------------------------ checkpoints

    def checkpoint(self, kind: CheckpointKind, metrics: dict[str, Any] | None = None) -> CheckpointPayload:
        state, pools = self.state, self.state.pools
        rng = {"torch": torch.get_rng_state(), "pool": self.state.pool_generator.get_state(),
               "contrast": self.state.contrast_generator.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return CheckpointPayload(
            kind=kind, step=state.step, config=self.config,
            backbone=BackboneRecord(self.backbone.spec.name, weights=self.config.backbone.weights,
                                    pretrained=self.config.backbone.pretrained,
                                    # Which official file the name stood for (dino_vits8: the 300-epoch run).
                                    official_weights=_official_source(self.backbone.spec, self.config.backbone)),
            model=self.model.state_dict(), class_names=self.class_names,
            selection=selection_text(kind, self.config.train.unsupervised_criterion),
            metrics=_json_safe(metrics or {}), selection_rule=self.config.train.selection,
            training=TrainingState(
                optimizers={name: opt.state_dict() for name, opt in self.optimizers.items()},
                scaler=self.scaler.state_dict(),
                pool_agnostic=pools.agnostic if pools else None, pool_specific=pools.specific if pools else None,
                best_score=state.best_score, best_step=state.best_step, total_steps=self.total_steps, rng=rng,
                unsupervised_score=state.unsupervised_score, unsupervised_step=state.unsupervised_step),
        )

    def save(self, kind: CheckpointKind, metrics: dict[str, Any] | None = None) -> Path:
        with self.timers.phase("checkpoint"):
            return save_atomic(self.checkpoint(kind, metrics).to_dict(), self.run_dir / "checkpoints" / f"{kind}.pt")

    def restore(self, payload: CheckpointPayload) -> None:
        training = payload.training
        if training is None or payload.step is None:
            raise CheckpointError("no training state to restore")
        self.model.load_state_dict(payload.model)
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(training.optimizers[name])
        self.scaler.load_state_dict(training.scaler)
        self.state.step = payload.step
        self.state.best_score, self.state.best_step = float(training.best_score), int(training.best_step)
        self.state.unsupervised_score = float(training.unsupervised_score)
        self.state.unsupervised_step = int(training.unsupervised_step)
        self.state.pools = ThresholdPools(training.pool_agnostic.to(self.device),
                                          training.pool_specific.to(self.device))
        rng = training.rng
        torch.set_rng_state(rng["torch"])
        self.state.pool_generator.set_state(rng["pool"])
        self.state.contrast_generator.set_state(rng["contrast"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        if self.context.rank:
            # The checkpoint holds rank 0's RNG: the others draw dropout masks of their own again.
            seed_everything((self.config.train.seed + self.context.rank) * 1_000_003 + self.state.step)


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


def _tensorboard(run_dir: Path) -> Any:
    try:
        # Lazy: TensorBoard is optional, and importing it costs about a second.
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        logger.warning("TensorBoard is not installed (pip install tensorboard): logging to metrics.jsonl only")
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def default_run_dir(config: Config) -> Path:
    name = config.train.run_name or f"{config.data.dataset}-{config.backbone.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(config.train.output_dir) / name


def _process(config: Config) -> tuple[torch.device, DistributedContext]:
    """This process's device and its place in a torchrun job: the rank is read here, once per run."""
    device = resolve_device(config.train.device)
    return device, init_distributed(device)


def train(config: Config, *, run_dir: str | Path | None = None, backbone: Backbone | None = None,
          feature_source: FeatureSource | None = None) -> Path:
    """Train a new run; returns its directory (config.yaml, metrics.jsonl, tensorboard/, checkpoints/).

    Progress and notices go to the ``hpseg.training`` loggers (``hpseg.logs``).
    """
    config.validate()  # also a config changed in Python after it was built
    run_dir = Path(run_dir) if run_dir else default_run_dir(config)
    device, context = _process(config)
    with run_lock(run_dir, holder=context.is_main):  # one writer per run folder
        if (run_dir / "checkpoints" / "last.pt").exists():
            raise FileExistsError(f"{run_dir} already holds a run: continue it with --resume {run_dir}, "
                                  "or pick another name")
        trainer = Trainer(config, run_dir, backbone=backbone, feature_source=feature_source, device=device,
                          context=context)
        if context.is_main:
            (run_dir / "config.yaml").write_text(trainer.config.to_yaml())
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        trainer.fit()
    return run_dir


def resume(run_dir: str | Path, *, backbone: Backbone | None = None,
           feature_source: FeatureSource | None = None) -> Path:
    """Continue the run in ``run_dir`` from its ``last`` checkpoint, with the run's own config."""
    run_dir = Path(run_dir)
    checkpoint = resumable_checkpoint(run_dir)
    device, context = _process(checkpoint.config)
    with run_lock(run_dir, holder=context.is_main):
        trainer = Trainer(checkpoint.config, run_dir, backbone=backbone, feature_source=feature_source,
                          device=device, context=context)
        with training_state_errors(checkpoint.path):
            trainer.restore(checkpoint.payload)
        trainer.state.last_saved_step = trainer.state.step
        if context.is_main:
            truncate_metrics(run_dir / "metrics.jsonl", trainer.state.step)
        trainer.fit()
    return run_dir


def _official_source(spec: Any, backbone_config: Any) -> str | None:
    """URL / Hub repository of the official weights a run loaded by name, None for a file or random init."""
    if backbone_config.weights or not backbone_config.pretrained:
        return None
    return spec.download_url or (f"https://huggingface.co/{spec.hf_hub_id}" if spec.hf_hub_id else None)
