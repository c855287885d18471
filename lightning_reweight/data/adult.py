"""UCI Adult (census income) as a group-annotated tabular DataModule."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_reweight.data.indexed import IndexedDataset

__all__ = ["AdultDataModule", "load_adult", "ADULT_COLUMNS", "SEX_GROUPS", "RACE_GROUPS"]

ADULT_COLUMNS = (
    "age", "workclass", "fnlwgt", "education", "education_num", "marital_status", "occupation", "relationship",
    "race", "sex", "capital_gain", "capital_loss", "hours_per_week", "native_country", "income",
)
CONTINUOUS = ("age", "fnlwgt", "education_num", "capital_gain", "capital_loss", "hours_per_week")
LOG_SCALED = ("capital_gain", "capital_loss")
CATEGORICAL = ("workclass", "education", "marital_status", "occupation", "relationship", "race", "sex",
               "native_country")
SEX_GROUPS = ("Male", "Female")
RACE_GROUPS = ("White", "Black", "Asian-Pac-Islander", "Amer-Indian-Eskimo", "Other")
GroupAttribute = Literal["sex", "race", "sex_race"]


def load_adult(path: str | Path) -> dict[str, np.ndarray]:
    """Read an ``adult.data`` / ``adult.test`` file into columns (strings; rows with 15 fields only).

    The test file's first line (``|1x3 Cross validator``) and the trailing ``.`` of its labels are dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Expected the UCI Adult file {path.name} at {str(path)!r}, but it does not exist. Expected layout: "
            "`{root}/adult.data` and `{root}/adult.test` (the UCI files as distributed, no header, ', '-separated; "
            "https://archive.ics.uci.edu/dataset/2/adult). Pass `root=` pointing at your copy (default "
            "'../shared/datasets/adult', relative to the working directory)."
        )
    rows = []
    with path.open() as f:
        for line in f:
            fields = [v.strip() for v in line.strip().split(",")]
            if len(fields) == len(ADULT_COLUMNS):
                rows.append(fields)
    if not rows:
        raise ValueError(f"No 15-field rows in {path}; expected the UCI Adult format.")
    table = np.array(rows, dtype=object)
    cols = {name: table[:, j] for j, name in enumerate(ADULT_COLUMNS)}
    cols["income"] = np.array([v.rstrip(".") for v in cols["income"]], dtype=object)
    return cols


def group_ids(cols: dict[str, np.ndarray], attribute: GroupAttribute) -> np.ndarray:
    """Group id per row: ``sex`` (Male 0, Female 1), ``race`` (order of ``RACE_GROUPS``) or
    ``sex_race`` (``race_id·2 + sex_id``). Unlisted values get −1 ("unknown")."""
    def lookup(values: np.ndarray, names: Sequence[str]) -> np.ndarray:
        index = {n: i for i, n in enumerate(names)}
        return np.array([index.get(v, -1) for v in values], dtype=np.int64)

    if attribute == "sex":
        return lookup(cols["sex"], SEX_GROUPS)
    if attribute == "race":
        return lookup(cols["race"], RACE_GROUPS)
    if attribute == "sex_race":
        sex, race = lookup(cols["sex"], SEX_GROUPS), lookup(cols["race"], RACE_GROUPS)
        return np.where((sex < 0) | (race < 0), -1, race * 2 + sex)
    raise ValueError(f"Expected argument `group_attribute` to be 'sex', 'race' or 'sex_race', but got {attribute!r}.")


def group_names(attribute: GroupAttribute) -> list[str]:
    if attribute == "sex":
        return list(SEX_GROUPS)
    if attribute == "race":
        return list(RACE_GROUPS)
    return [f"{r}_{s}" for r in RACE_GROUPS for s in SEX_GROUPS]


class _Encoder:
    """Standardise continuous columns (log1p for capital gain/loss) and one-hot the categorical ones, with
    statistics and categories from the training rows only (unseen test categories -> all-zero)."""

    def __init__(self, cols: dict[str, np.ndarray], categorical: Sequence[str]):
        self.categorical = list(categorical)
        cont = self._continuous(cols)
        self.mean, self.std = cont.mean(0), cont.std(0) + 1e-8
        self.categories = {c: sorted(set(cols[c].tolist())) for c in self.categorical}

    @staticmethod
    def _continuous(cols: dict[str, np.ndarray]) -> np.ndarray:
        out = []
        for c in CONTINUOUS:
            v = cols[c].astype(np.float64)
            out.append(np.log1p(v) if c in LOG_SCALED else v)
        return np.stack(out, axis=1)

    @property
    def num_features(self) -> int:
        return len(CONTINUOUS) + sum(len(v) for v in self.categories.values())

    def __call__(self, cols: dict[str, np.ndarray]) -> np.ndarray:
        parts = [(self._continuous(cols) - self.mean) / self.std]
        for c in self.categorical:
            index = {v: i for i, v in enumerate(self.categories[c])}
            ids = np.array([index.get(v, -1) for v in cols[c]], dtype=np.int64)
            onehot = np.zeros((len(ids), len(index)), dtype=np.float64)
            known = ids >= 0
            onehot[np.flatnonzero(known), ids[known]] = 1.0
            parts.append(onehot)
        return np.concatenate(parts, axis=1).astype(np.float32)


class AdultDataModule(pl.LightningDataModule):
    """UCI Adult: predict income > 50K from 14 census attributes, with ``sex`` / ``race`` groups.

    Reads ``adult.data`` (32,561 rows; a seeded ``val_fraction`` is held out for validation) and
    ``adult.test`` (16,281 rows, the test set) from ``root``. Continuous features are standardised (capital
    gain/loss after log1p) and categorical ones one-hot encoded, both fitted on the training rows; "?" is
    kept as its own category. Every split is an ``IndexedDataset`` with group ids, so batches are
    ``(x, y, index, group)``.

    Args:
        root: folder with ``adult.data`` and ``adult.test`` (default ``../shared/datasets/adult``, relative to
            the working directory).
        group_attribute: ``"sex"`` (2 groups), ``"race"`` (5) or ``"sex_race"`` (10).
        include_group_features: keep the sensitive attributes (sex, race) among the inputs.
        val_fraction: share of ``adult.data`` held out for validation.
        max_train_samples: subsample the training rows (seeded; ``None`` = all), for quick runs.
        batch_size: training batch size (evaluation uses ``eval_batch_size``).
        seed: seed of the validation split and subsampling.

    Example::

        dm = AdultDataModule(group_attribute="race")
        trainer.fit(TabularClassifier(), datamodule=dm)
    """

    def __init__(
        self,
        root: str = "../shared/datasets/adult",
        group_attribute: GroupAttribute = "sex",
        include_group_features: bool = True,
        val_fraction: float = 0.1,
        max_train_samples: int | None = None,
        batch_size: int = 256,
        eval_batch_size: int = 2048,
        seed: int = 0,
        num_workers: int = 0,
    ):
        super().__init__()
        if group_attribute not in ("sex", "race", "sex_race"):
            raise ValueError(
                f"Expected argument `group_attribute` to be 'sex', 'race' or 'sex_race', but got {group_attribute!r}."
            )
        if not 0 < val_fraction < 1:
            raise ValueError(f"Expected argument `val_fraction` in (0, 1), but got {val_fraction!r}.")
        if max_train_samples is not None and max_train_samples < 1:
            raise ValueError(f"Expected argument `max_train_samples` to be positive or None, but got {max_train_samples!r}.")
        self.save_hyperparameters()
        self.group_names = group_names(group_attribute)
        self.num_groups = len(self.group_names)
        self.num_classes = 2
        self.num_features: int | None = None
        self.train_set: IndexedDataset | None = None
        self.val_set: IndexedDataset | None = None
        self.test_set: IndexedDataset | None = None

    def _split(self, x: np.ndarray, y: np.ndarray, g: np.ndarray) -> IndexedDataset:
        ds = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
        return IndexedDataset(ds, groups=torch.from_numpy(g), targets=torch.from_numpy(y))

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        hp = self.hparams
        root = Path(hp.root)
        train_cols, test_cols = load_adult(root / "adult.data"), load_adult(root / "adult.test")
        rng = np.random.default_rng(hp.seed)
        n = len(train_cols["age"])
        perm = rng.permutation(n)
        n_val = int(round(hp.val_fraction * n))
        val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
        if hp.max_train_samples is not None and hp.max_train_samples < len(train_idx):
            train_idx = np.sort(rng.choice(train_idx, hp.max_train_samples, replace=False))
        categorical = [c for c in CATEGORICAL if hp.include_group_features or c not in ("sex", "race")]
        tr = {k: v[train_idx] for k, v in train_cols.items()}
        va = {k: v[val_idx] for k, v in train_cols.items()}
        encoder = _Encoder(tr, categorical)
        self.num_features = encoder.num_features

        def make(cols: dict[str, np.ndarray]) -> IndexedDataset:
            y = (cols["income"] == ">50K").astype(np.int64)
            return self._split(encoder(cols), y, group_ids(cols, hp.group_attribute))

        self.train_set, self.val_set, self.test_set = make(tr), make(va), make(test_cols)

    def group_counts(self) -> torch.Tensor:
        """Training-set sample count per group."""
        self.setup()
        g = self.train_set.groups
        return torch.bincount(g[g >= 0], minlength=self.num_groups)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True,
                          num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.eval_batch_size, num_workers=self.hparams.num_workers)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=self.hparams.eval_batch_size, num_workers=self.hparams.num_workers)
