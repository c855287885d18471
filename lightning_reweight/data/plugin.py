"""DataModule plugin: put indexing and a lightning_reweight sampler into any DataModule's train loader.

``SamplingDataModule(datamodule, sampler="weighted", sampler_kwargs={...})`` wraps a user's
``LightningDataModule`` (or a plain map-style dataset) and delegates every hook to it, except
``train_dataloader``: it takes the user's train loader, wraps its dataset in ``IndexedDataset`` (unless it
already is one; a custom ``collate_fn`` is wrapped with ``indexed_collate``), and rebuilds the loader with
the chosen sampler, keeping ``batch_size``, ``num_workers``, ``collate_fn``, ``pin_memory``, ``drop_last``,
``timeout``, ``worker_init_fn``, ``multiprocessing_context``, ``prefetch_factor``, ``persistent_workers``
and ``pin_memory_device``. It adds ``SamplerState`` to the Trainer (epoch, cursor, checkpoint) if missing.
The sampler is created inside ``train_dataloader()``, after the process group exists, so it shards by the
GLOBAL rank; use ``Trainer(use_distributed_sampler=False)`` under DDP.

From LightningCLI YAML (``lightning-reweight fit --config recipes/weighted_sampler.yaml``)::

    data:
      class_path: lightning_reweight.data.plugin.SamplingDataModule
      init_args:
        datamodule:
          class_path: lightning_reweight.data.DigitsDataModule
          init_args: {imbalance_ratio: 10}
        sampler: weighted
        sampler_kwargs: {weights: class_balanced}

Samplers (``create_sampler`` registry; ``register_sampler`` adds more):

* ``weighted``: ``WeightedSampler``. ``weights`` = ``"class_balanced"`` (w_i = 1/n_{y_i}),
  ``"sqrt_class_balanced"`` (1/√n_{y_i}), ``"group_balanced"`` (1/n_{g_i}, GroupDRO's ``--reweight_groups``),
  a ``.pt`` / ``.npy`` file or a list with one weight per sample; plus ``num_samples``, ``replacement``,
  ``drop_last``.
* ``rs2``: ``RS2Sampler`` (``fraction``, ``replacement``, ``drop_last``).
* ``temperature``: ``TemperatureSampler`` over classes (``by="target"``) or groups (``by="group"``).
* ``none``: keep the loader's own shuffling (only indexing is added).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler, default_collate

from lightning_reweight.data.indexed import IndexedDataset, indexed_collate

__all__ = ["SamplingDataModule", "create_sampler", "register_sampler", "sampler_names", "rebuild_loader"]

SamplerFactory = Callable[..., Any]
_SAMPLERS: dict[str, SamplerFactory] = {}


def register_sampler(name: str, factory: SamplerFactory) -> None:
    """Register ``factory(dataset: IndexedDataset, seed: int, **kwargs) -> Sampler`` under ``name``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"Expected argument `name` to be a non-empty string, but got {name!r}.")
    _SAMPLERS[name] = factory


def sampler_names() -> list[str]:
    return sorted(_SAMPLERS)


def create_sampler(name: str, dataset: IndexedDataset, seed: int = 0, **kwargs: Any) -> Any:
    """Build the registered sampler ``name`` for ``dataset`` (``None`` for ``"none"``)."""
    if name not in _SAMPLERS:
        raise ValueError(f"Expected argument `sampler` to be one of {sampler_names()}, but got {name!r}.")
    return _SAMPLERS[name](dataset, seed=seed, **kwargs)


def _labels(dataset: IndexedDataset, kind: str) -> Tensor:
    values = dataset.targets if kind == "target" else dataset.groups
    if values is None:
        arg = "targets" if kind == "target" else "groups"
        where = f"pass `{arg}=` to SamplingDataModule (or to IndexedDataset when you build it)"
        if kind == "target":
            where += ", or expose `.targets` on the data set"
        raise ValueError(f"Expected the train data set to carry per-sample {kind}s for this sampler, but it has none; "
                         f"{where}.")
    return values


def _inverse_frequency(labels: Tensor, power: float) -> Tensor:
    valid = labels >= 0
    counts = torch.bincount(labels[valid]).to(torch.float64)
    w = torch.zeros(labels.numel(), dtype=torch.float64)
    w[valid] = counts[labels[valid]].pow(-power)
    return w


def resolve_weights(spec: Any, dataset: IndexedDataset) -> Tensor:
    """Per-sample weights from a spec (see the module docstring)."""
    if isinstance(spec, str):
        if spec == "class_balanced":
            return _inverse_frequency(_labels(dataset, "target"), 1.0)
        if spec == "sqrt_class_balanced":
            return _inverse_frequency(_labels(dataset, "target"), 0.5)
        if spec == "group_balanced":
            return _inverse_frequency(_labels(dataset, "group"), 1.0)
        path = Path(spec)
        if path.suffix in (".pt", ".pth", ".npy") and path.is_file():
            return torch.as_tensor(np.load(path) if path.suffix == ".npy" else torch.load(path, weights_only=True))
        raise ValueError(
            f"Expected argument `weights` to be 'class_balanced', 'sqrt_class_balanced', 'group_balanced', an"
            f" existing .pt/.npy file or one weight per sample, but got {spec!r}."
        )
    return torch.as_tensor(spec)


def _weighted(dataset: IndexedDataset, seed: int = 0, weights: Any = "class_balanced", **kwargs: Any) -> Any:
    from lightning_reweight.samplers.core import WeightedSampler

    w = resolve_weights(weights, dataset)
    if w.numel() != len(dataset):
        raise ValueError(
            f"Expected argument `weights` to have one entry per training sample ({len(dataset)}), but got"
            f" {w.numel()}."
        )
    return WeightedSampler(w, seed=seed, **kwargs)


def _rs2(dataset: IndexedDataset, seed: int = 0, **kwargs: Any) -> Any:
    from lightning_reweight.samplers.rs2 import RS2Sampler

    return RS2Sampler(len(dataset), seed=seed, **kwargs)


def _temperature(dataset: IndexedDataset, seed: int = 0, by: str = "target", **kwargs: Any) -> Any:
    from lightning_reweight.samplers.balanced import TemperatureSampler

    if by not in ("target", "group"):
        raise ValueError(f"Expected argument `by` to be 'target' or 'group', but got {by!r}.")
    return TemperatureSampler(_labels(dataset, by), seed=seed, **kwargs)


register_sampler("weighted", _weighted)
register_sampler("rs2", _rs2)
register_sampler("temperature", _temperature)
register_sampler("none", lambda dataset, seed=0, **kwargs: None)

_KEPT = ("batch_size", "num_workers", "pin_memory", "drop_last", "timeout", "worker_init_fn",
         "multiprocessing_context", "generator", "prefetch_factor", "persistent_workers", "pin_memory_device")


def rebuild_loader(loader: DataLoader, dataset: Dataset, sampler: Any, collate_fn: Callable | None = None,
                   **overrides: Any) -> DataLoader:
    """A plain ``DataLoader`` over ``dataset`` with ``sampler`` and ``loader``'s other settings (``overrides``
    replace single settings, e.g. ``batch_size``). ``sampler=None`` keeps the loader's shuffling decision."""
    if loader.batch_size is None:
        raise ValueError(
            "Expected the train dataloader to use `batch_size=` (not a custom `batch_sampler`), so the sampler can"
            " be replaced; build it with `DataLoader(dataset, batch_size=..., shuffle=True)`."
        )
    kwargs = {k: getattr(loader, k) for k in _KEPT if hasattr(loader, k)}
    kwargs.update(overrides)
    if kwargs.get("num_workers", 0) == 0:
        kwargs.pop("prefetch_factor", None)
        kwargs["persistent_workers"] = False
    elif kwargs.get("prefetch_factor") is None:
        kwargs.pop("prefetch_factor", None)
    if sampler is None:
        kwargs["shuffle"] = isinstance(loader.sampler, RandomSampler)
    else:
        kwargs["sampler"] = sampler
    return DataLoader(dataset, collate_fn=collate_fn or loader.collate_fn, **kwargs)


class SamplingDataModule(pl.LightningDataModule):
    """Wrap a DataModule (or a dataset) so its train loader yields indices and uses a chosen sampler.

    Args:
        datamodule: the user's ``LightningDataModule``, or a map-style training ``Dataset``.
        sampler: a registered sampler name (``sampler_names()``): ``weighted``, ``rs2``, ``temperature``, ``none``.
        sampler_kwargs: keyword arguments of that sampler (see the module docstring).
        seed: sampler seed, shared by all ranks.
        batch_size: for a plain ``Dataset`` (required ``batch_size``); with a DataModule they
            override the wrapped train loader's values when given.
        num_workers: for a plain ``Dataset`` (required ``batch_size``); with a DataModule they
            override the wrapped train loader's values when given.
        groups: per-sample group ids for the ``IndexedDataset`` wrapper (when the data set is not one
            already); the ``group_balanced`` weights and the ``temperature`` sampler by group read them.
        targets: per-sample class labels for the ``IndexedDataset`` wrapper (when the data set is not one
            already and exposes no ``targets``); ``class_balanced`` weights read them.
        add_sampler_state: add ``SamplerState()`` to the Trainer's callbacks if it has none.
    """

    def __init__(
        self,
        datamodule: pl.LightningDataModule | Dataset,
        sampler: str = "weighted",
        sampler_kwargs: dict[str, Any] | None = None,
        seed: int = 0,
        batch_size: int | None = None,
        num_workers: int | None = None,
        groups: Any = None,
        targets: Any = None,
        add_sampler_state: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(datamodule, (pl.LightningDataModule, Dataset)):
            raise TypeError(
                f"Expected argument `datamodule` to be a LightningDataModule or a map-style Dataset, but got"
                f" {type(datamodule).__name__}."
            )
        if sampler not in _SAMPLERS:
            raise ValueError(f"Expected argument `sampler` to be one of {sampler_names()}, but got {sampler!r}.")
        if isinstance(datamodule, Dataset) and not isinstance(datamodule, pl.LightningDataModule) and batch_size is None:
            raise ValueError("Expected argument `batch_size` when wrapping a plain Dataset, but got None.")
        for name, value in (("batch_size", batch_size), ("num_workers", num_workers)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0
                                      or (name == "batch_size" and value == 0)):
                raise ValueError(f"Expected argument `{name}` to be a positive int, but got {value!r}.")
        if isinstance(datamodule, pl.LightningDataModule):
            _repair_cli_hparams(datamodule)
        self.datamodule = datamodule
        self.sampler_name = sampler
        self.sampler_kwargs = dict(sampler_kwargs or {})
        self.seed = int(seed)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.groups, self.targets = groups, targets
        self.add_sampler_state = add_sampler_state
        self.sampler: Any = None
        self._is_dm = isinstance(datamodule, pl.LightningDataModule)

    # ---------------------------------------------------------------------------------------- delegation
    def __getattr__(self, name: str) -> Any:
        # only called when normal lookup fails: expose the wrapped module's attributes (e.g. num_classes)
        inner = self.__dict__.get("datamodule")
        if inner is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(inner, name)

    def prepare_data(self) -> None:
        if self._is_dm:
            self.datamodule.prepare_data()

    def setup(self, stage: str) -> None:
        if self._is_dm:
            self.datamodule.trainer = self.trainer
            self.datamodule.setup(stage)
        if stage == "fit" and self.add_sampler_state and self.trainer is not None and self.sampler_name != "none":
            from lightning_reweight.callbacks.sampling import ensure_sampler_state

            ensure_sampler_state(self.trainer, type(self).__name__)

    def teardown(self, stage: str) -> None:
        if self._is_dm:
            self.datamodule.teardown(stage)

    def val_dataloader(self) -> Any:
        return self.datamodule.val_dataloader() if self._is_dm else []

    def test_dataloader(self) -> Any:
        return self.datamodule.test_dataloader() if self._is_dm else []

    def predict_dataloader(self) -> Any:
        return self.datamodule.predict_dataloader() if self._is_dm else []

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        if self._is_dm:
            return self.datamodule.transfer_batch_to_device(batch, device, dataloader_idx)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return self.datamodule.on_before_batch_transfer(batch, dataloader_idx) if self._is_dm else batch

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return self.datamodule.on_after_batch_transfer(batch, dataloader_idx) if self._is_dm else batch

    def state_dict(self) -> dict[str, Any]:
        return self.datamodule.state_dict() if self._is_dm else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the wrapped DataModule's state (the sampler's own state is restored by ``SamplerState``)."""
        from collections.abc import Mapping

        from lightning_reweight.state.validate import CheckpointStateError

        if not isinstance(state_dict, Mapping):
            raise CheckpointStateError(f"{type(self).__name__}.state_dict", None,
                                       f"expected a dict, but got {type(state_dict).__name__}.")
        if self._is_dm:
            self.datamodule.load_state_dict(state_dict)

    # ------------------------------------------------------------------------------------- train loader
    def transform_train_dataset(self, dataset: Dataset) -> Dataset:
        """Hook for subclasses (``SMOTEDataModule``): replace the training set before indexing."""
        return dataset

    def train_dataloader(self) -> DataLoader:
        if self._is_dm:
            loader = self.datamodule.train_dataloader()
            if not isinstance(loader, DataLoader):
                raise TypeError(
                    f"Expected the wrapped `train_dataloader()` to return one torch DataLoader, but got"
                    f" {type(loader).__name__}; wrap each loader separately."
                )
        else:
            loader = DataLoader(self.datamodule, batch_size=self.batch_size, shuffle=True)
        dataset = self.transform_train_dataset(loader.dataset)
        collate = loader.collate_fn
        if not isinstance(dataset, IndexedDataset):
            dataset = IndexedDataset(dataset, groups=self.groups, targets=self.targets)
            if collate is not default_collate:
                collate = indexed_collate(collate, with_group=dataset.groups is not None)
        self.sampler = create_sampler(self.sampler_name, dataset, seed=self.seed, **self.sampler_kwargs)
        overrides = {k: v for k, v in (("batch_size", self.batch_size), ("num_workers", self.num_workers))
                     if v is not None}
        return rebuild_loader(loader, dataset, self.sampler, collate_fn=collate, **overrides)


def _repair_cli_hparams(datamodule: pl.LightningDataModule) -> None:
    """LightningCLI gives a nested DataModule the OUTER DataModule's hyperparameters (its instantiator sets one
    context for the ``data`` key, and the inner class's ``save_hyperparameters()`` reads it). Detect that and
    restore the inner module's own init arguments (from the nested config, completed with signature defaults)."""
    hp = getattr(datamodule, "_hparams", None)
    nested = hp.get("datamodule") if isinstance(hp, dict) else None
    if not (isinstance(nested, dict) and "class_path" in nested and "_instantiator" in hp):
        return
    if str(nested["class_path"]).rsplit(".", 1)[-1] != type(datamodule).__name__:
        return
    import copy
    import inspect

    from lightning.fabric.utilities.data import AttributeDict

    values = {name: p.default for name, p in inspect.signature(type(datamodule).__init__).parameters.items()
              if name != "self" and p.default is not inspect.Parameter.empty
              and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    values.update(nested.get("init_args") or {})
    datamodule._hparams = AttributeDict(values)
    datamodule._hparams_initial = copy.deepcopy(datamodule._hparams)
