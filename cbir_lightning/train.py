"""Train a classifier head on a frozen backbone and evaluate it on the held-out split.

Usage::

    python -m cbir_lightning.train backbone=mobilenet
    python -m cbir_lightning.train -m backbone=mobilenet,efficientnet_lite2 seed=0,1,2

The run folder receives ``metrics.json``, ``classification_report.md``, ``confusion_matrix.{png,csv}``,
``split.csv``, ``skipped.csv`` and the head checkpoint ``head.pt``.
"""

import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import RichProgressBar
from pytorch_lightning.loggers import Logger

from cbir_lightning.data.datamodule import ImageFolderDataModule
from cbir_lightning.data.split import SPLIT_NAMES
from cbir_lightning.data.transforms import Preprocessing, build_preprocessing
from cbir_lightning.evaluation.report import (
    write_classification_report,
    write_confusion_matrix,
    write_metrics_json,
)
from cbir_lightning.features.cache import FeatureCache, FeatureKey
from cbir_lightning.models.backbone import FrozenBackbone, build_backbone
from cbir_lightning.models.module import FrozenBackboneClassifier
from cbir_lightning.models.weights.errors import WeightsUnavailableError
from cbir_lightning.utils.cli import exit_on_user_error
from cbir_lightning.utils.paths import default_cache_dir

log = logging.getLogger(__name__)

# pytorch-lightning 2.6 calls a deprecated torch pytree check on every batch; the warning is not ours to fix.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=Warning)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one training job and return the contents of its ``metrics.json``.

    An open W&B run is always closed on return, so that a multirun does not hang on it.
    """
    try:
        return _run(cfg)
    finally:
        _finish_wandb()


def _run(cfg: DictConfig) -> dict[str, Any]:
    started = time.perf_counter()
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)

    device = _check_device(cfg.features.device)
    cache_dir = Path(cfg.features.cache_dir or default_cache_dir())
    log.info("Building backbone <backbone=%s weights.source=%s>", cfg.backbone.name, cfg.weights.source)
    backbone = build_backbone(
        cfg.backbone.name, cfg.weights.source, cfg.weights.path, cfg.head.pool, cfg.weights.init_seed, cache_dir
    )
    preprocessing = build_preprocessing(backbone.model, cfg.preprocess)
    # The head is built before the slow steps, so that a head configuration error shows at once.
    head_in_features = _feature_size(backbone, preprocessing)

    _build_module(cfg, None, head_in_features)
    log.info("Scanning images <data.root=%s>", cfg.data.root)
    datamodule: ImageFolderDataModule = instantiate(cfg.data)
    datamodule.scan()
    datamodule.write_manifests(run_dir)

    extraction_started = time.perf_counter()
    cache = _extract_features(cfg, datamodule, backbone, preprocessing, cache_dir, device)
    extraction_seconds = time.perf_counter() - extraction_started

    module = _build_module(cfg, datamodule, head_in_features)
    trainer = _build_trainer(cfg)
    trainer.fit(module, datamodule=datamodule)
    val_results = trainer.validate(module, datamodule=datamodule, verbose=False)
    trainer.test(module, datamodule=datamodule, verbose=False)

    metrics = _summarise(cfg, datamodule, backbone, module, cache, val_results)
    metrics["head_in_features"] = head_in_features
    metrics["feature_extraction_seconds"] = round(extraction_seconds, 2)
    metrics["wall_seconds"] = round(time.perf_counter() - started, 2)
    _write_outputs(run_dir, cfg, datamodule, module, metrics)
    log.info(
        "Test accuracy %.4f, macro F1 %.4f (%s, %s weights). Outputs in %s",
        metrics["test_accuracy"],
        metrics["test_f1_macro"],
        cfg.backbone.name,
        metrics["weights_source"],
        run_dir,
    )
    return metrics


def _check_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"Invalid features.device={name!r}: {error}. Use cpu, cuda or cuda:<index>.") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"features.device={name!r} but CUDA is not available here. Use features.device=cpu.")
    return device


def _feature_size(backbone: FrozenBackbone, preprocessing: Preprocessing) -> int:
    with torch.inference_mode():
        return backbone(torch.zeros(1, *preprocessing.input_size)).shape[1]


def _extract_features(
    cfg: DictConfig,
    datamodule: ImageFolderDataModule,
    backbone: FrozenBackbone,
    preprocessing: Preprocessing,
    cache_dir: Path,
    device: torch.device,
) -> FeatureCache:
    backbone.to(device)
    # NOTE: the key does not record the device, so CUDA (TF32) and CPU features share cache entries.
    key = FeatureKey(cfg.backbone.name, backbone.weights_id, preprocessing.preprocess_id, backbone.pool)
    cache = FeatureCache(cache_dir, key)
    records = [record for name in SPLIT_NAMES for record in datamodule.splits[name]]
    features = cache.extract(
        records,
        backbone,
        preprocessing,
        batch_size=cfg.features.batch_size,
        num_workers=cfg.features.num_workers,
        max_pixels=cfg.data.max_pixels,
        show_progress=cfg.data.show_progress,
    )
    backbone.to("cpu")
    per_split, start = {}, 0
    for name in SPLIT_NAMES:
        count = len(datamodule.splits[name])
        per_split[name] = features[start : start + count]
        start += count
    datamodule.set_features(per_split)
    return cache


def _build_module(
    cfg: DictConfig, datamodule: ImageFolderDataModule | None, in_features: int
) -> FrozenBackboneClassifier:
    """Build the module; without a datamodule the class count is a stand-in, to validate the head config."""
    num_classes = len(datamodule.class_names) if datamodule is not None else 2
    if datamodule is not None:
        log.info("Instantiating head <%s> with %d inputs", cfg.head._target_, in_features)
    head = instantiate(cfg.head, in_features=in_features, num_classes=num_classes)
    # The backbone stays out of the module: training reads cached features, and Lightning would
    # otherwise move the whole backbone to the accelerator for nothing.
    return FrozenBackboneClassifier(head, instantiate(cfg.optimizer), num_classes)


def _build_trainer(cfg: DictConfig) -> pl.Trainer:
    loggers = [_build_logger(config) for config in (cfg.get("logger") or {}).values()]
    callbacks = [RichProgressBar()] if cfg.trainer.get("enable_progress_bar", True) else []
    return instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks)


def _build_logger(config: DictConfig) -> Logger:
    if config._target_.endswith("WandbLogger") and not config.get("group"):
        # One W&B group per sweep, named after the sweep folder, so that its runs compare side by side.
        group = Path(HydraConfig.get().sweep.dir).name if _in_multirun() else "single-runs"
        return instantiate(config, group=group)
    return instantiate(config)


def _summarise(
    cfg: DictConfig,
    datamodule: ImageFolderDataModule,
    backbone: FrozenBackbone,
    module: FrozenBackboneClassifier,
    cache: FeatureCache,
    val_results: list[dict[str, float]],
) -> dict[str, Any]:
    scalars = module.test_scalars
    weights_source = backbone.weights_id.split(":", 1)[0]
    return {
        "status": "trained",
        "backbone": cfg.backbone.name,
        "timm_arch": backbone.spec.timm_arch,
        "weights_source": weights_source,
        "weights_id": backbone.weights_id,
        "random_weights": weights_source == "none",
        "preprocess": cfg.preprocess,
        "preprocess_id": cache.key.preprocess_id,
        "pool": backbone.pool,
        "head": OmegaConf.to_container(cfg.head, resolve=True),
        "seed": cfg.seed,
        "split_seed": cfg.data.split_seed,
        "max_epochs": cfg.trainer.max_epochs,
        "test_accuracy": scalars["acc"],
        "test_precision_macro": scalars["precision_macro"],
        "test_recall_macro": scalars["recall_macro"],
        "test_f1_macro": scalars["f1_macro"],
        "val_accuracy": val_results[0]["val/acc"] if val_results else None,
        "num_classes": len(datamodule.class_names),
        "class_names": datamodule.class_names,
        "num_train": len(datamodule.splits["train"]),
        "num_val": len(datamodule.splits["val"]),
        "num_test": len(datamodule.splits["test"]),
        "num_skipped": len(datamodule.folder.skipped),
        "features_computed": cache.stats.computed,
        "features_cached": cache.stats.cached,
        "data_root": str(datamodule.folder.root),
    }


def _write_outputs(
    run_dir: Path,
    cfg: DictConfig,
    datamodule: ImageFolderDataModule,
    module: FrozenBackboneClassifier,
    metrics: dict[str, Any],
) -> None:
    class_names = datamodule.class_names
    write_metrics_json(run_dir / "metrics.json", metrics)
    write_classification_report(
        run_dir / "classification_report.md", class_names, module.test_tensors, module.test_scalars
    )
    weights_label = "RANDOM" if metrics["random_weights"] else metrics["weights_source"]
    title = (
        f"{cfg.backbone.name}, {weights_label} weights, preprocess={cfg.preprocess}, "
        f"pool={metrics['pool']}: test accuracy {metrics['test_accuracy']:.3f}"
    )
    write_confusion_matrix(run_dir, class_names, module.test_tensors["confusion_matrix"], title)
    checkpoint = {
        "state_dict": module.head.state_dict(),
        "head": metrics["head"],
        "class_names": class_names,
        "backbone": cfg.backbone.name,
        "weights_source": metrics["weights_source"],
        "weights_path": cfg.weights.path,
        "weights_id": metrics["weights_id"],
        "preprocess": cfg.preprocess,
        "pool": metrics["pool"],
    }
    torch.save(checkpoint, run_dir / "head.pt")


def _finish_wandb() -> None:
    # Only a run that logger=wandb opened can exist, so an unimported wandb needs no import here.
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


def record_unavailable(cfg: DictConfig, error: Exception) -> dict[str, Any]:
    """Write a ``metrics.json`` that marks this job's weights as unavailable, with the reason."""
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    status = "not implemented" if isinstance(error, NotImplementedError) else "weights unavailable"
    metrics = {
        "status": status,
        "reason": str(error),
        "backbone": cfg.backbone.name,
        "weights_source": cfg.weights.source,
        "preprocess": cfg.preprocess,
        "pool": cfg.head.pool,
        "seed": cfg.seed,
    }
    write_metrics_json(run_dir / "metrics.json", metrics)
    return metrics


def _in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Run :func:`train` from the command line and return the validation accuracy for Hydra sweepers.

    In a multirun, a job whose backbone or weights cannot be had records that in its ``metrics.json``
    and returns ``None``, so the other jobs carry on. A single run exits with status 1 instead.
    """
    return exit_on_user_error(lambda: _train_or_record_unavailable(cfg))


def _train_or_record_unavailable(cfg: DictConfig) -> float | None:
    try:
        return train(cfg)["val_accuracy"]
    except (WeightsUnavailableError, NotImplementedError) as error:
        if not _in_multirun():
            raise
        record_unavailable(cfg, error)
        log.error("Skipping this job, the sweep goes on: %s", error)
        return None


if __name__ == "__main__":
    main()
