"""Multilingual byte-level streams (the chatterbot corpus: 28 languages, a heavy long tail), one stream per language.

Each language folder of ``root`` holds YAML files of short dialogs (``conversations:``, a list of dialogs, each
a list of utterances). A language's text is its dialogs in file order (utterances joined by a newline, dialogs by a
blank line), read as UTF-8 bytes: a byte-level model (256 symbols) reads every script. The last ``val_frac`` of
each language's bytes (at least ``min_val_windows`` windows) is held out for validation; the rest is cut into
non-overlapping windows of ``seq_len + 1`` bytes, the language's training stream (``n_k`` = its windows).

Training batches come from a ``StreamMixture`` over the languages (domain ``k`` = the ``k``-th language): attach
``StreamMixing`` to choose temperature sampling or upweighting and to checkpoint the mixture. Validation batches
carry their ``domain`` too, so the model can report per-language loss/bits (``CharTransformerLM`` logs
``val/bpc/<language>``, ``val/bpc_worst`` and ``val/bpc_mean``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from lightning_reweight.data.text import CharWindows
from lightning_reweight.samplers.mixture import StreamMixture

__all__ = ["DEFAULT_LANGUAGES", "MultilingualDataModule", "default_multilingual_root", "load_language"]

_REPO = Path(__file__).resolve().parents[2]

#: ten languages spanning the tail: the three largest, four in the middle, the three smallest of the corpus
DEFAULT_LANGUAGES = ("english", "japanese", "italian", "spanish", "dutch", "turkish", "russian", "yoruba", "telugu",
                     "thai")


def default_multilingual_root() -> Path:
    """``../shared/datasets/chatterbot_multilingual`` relative to the repository."""
    return (_REPO / ".." / "shared" / "datasets" / "chatterbot_multilingual").resolve()


def _dialog_text(path: Path) -> str:
    import yaml

    doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    dialogs = doc.get("conversations") or [] if isinstance(doc, dict) else []
    return "\n\n".join("\n".join(str(u) for u in (d if isinstance(d, list) else [d])) for d in dialogs)


def load_language(root: str | Path, language: str) -> Tensor:
    """One language's dialogs as a uint8 tensor of UTF-8 bytes (files in name order)."""
    folder = Path(root) / language
    files = sorted(folder.glob("*.yml")) + sorted(folder.glob("*.yaml"))
    text = "\n\n".join(t for t in (_dialog_text(f) for f in files) if t)
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8) if text else torch.zeros(0, dtype=torch.uint8)


class _DomainWindows(Dataset):
    """Validation windows of one language, each item tagged with its ``domain``."""

    def __init__(self, windows: Dataset, domain: int):
        self.windows, self.domain = windows, domain

    def __len__(self) -> int:
        return len(self.windows)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        item = dict(self.windows[i])
        item["domain"] = torch.tensor(self.domain)
        return item


class MultilingualDataModule(pl.LightningDataModule):
    """Byte-level language streams mixed by temperature, with a held-out split per language.

    Args:
        root: the corpus folder (default ``../shared/datasets/chatterbot_multilingual`` next to the repository):
            one sub-folder of ``*.yml`` dialog files per language.
        languages: the languages (sub-folder names) to read, in domain order (default ``DEFAULT_LANGUAGES``).
        seq_len: bytes per training sequence.
        batch_size: sequences per rank per step.
        val_batch_size: validation batch size (default ``batch_size``).
        val_frac: fraction of each language's bytes, at its end, held out for validation.
        min_val_windows: at least this many validation windows per language (small languages).
        max_val_windows: at most this many validation windows per language (``None``: all).
        seed: the mixture's draw seed.
        num_workers: DataLoader workers of the training mixture.

    Attributes (after ``setup``): ``domain_names``, ``sizes`` (training windows per language), ``mixture``.
    A missing folder or language raises ``FileNotFoundError`` naming the path and the fix.
    """

    def __init__(self, root: str | None = None, languages: list[str] | None = None, seq_len: int = 64,
                 batch_size: int = 16, val_batch_size: int | None = None, val_frac: float = 0.1,
                 min_val_windows: int = 2, max_val_windows: int | None = None, seed: int = 0, num_workers: int = 0):
        super().__init__()
        if not 0.0 < val_frac < 1.0:
            raise ValueError(f"Expected argument `val_frac` in (0, 1), but got {val_frac!r}.")
        if seq_len < 1 or batch_size < 1 or min_val_windows < 1:
            raise ValueError(f"Expected seq_len, batch_size and min_val_windows >= 1, but got {seq_len}, "
                             f"{batch_size} and {min_val_windows}.")
        languages = list(DEFAULT_LANGUAGES if languages is None else languages)
        if not languages or len(set(languages)) != len(languages):
            raise ValueError(f"Expected a non-empty list of distinct languages, but got {languages}.")
        self.root = Path(root) if root is not None else default_multilingual_root()
        self.languages = languages
        self.seq_len, self.batch_size = seq_len, batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.val_frac, self.min_val_windows, self.max_val_windows = val_frac, min_val_windows, max_val_windows
        self.seed, self.num_workers = seed, num_workers
        self.mixture: StreamMixture | None = None
        self.val_sets: list[Dataset] = []

    @property
    def domain_names(self) -> list[str]:
        return list(self.languages)

    def _read(self) -> list[Tensor]:
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"Expected the multilingual corpus at {self.root} (one folder per language of YAML dialogs: "
                "../shared/datasets/chatterbot_multilingual next to the repository), but it does not exist. Pass "
                "`root=` to your copy (the `chatterbot-corpus` package's `chatterbot_corpus/data` folder).")
        available = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        missing = [lang for lang in self.languages if lang not in available]
        if missing:
            raise FileNotFoundError(f"Expected language folder(s) {missing} under {self.root}, but they do not exist. "
                                    f"Choose `languages=` from {available}.")
        return [load_language(self.root, lang) for lang in self.languages]

    def setup(self, stage: str | None = None) -> None:
        if self.mixture is not None:
            return
        L = self.seq_len
        train, val = [], []
        for lang, data in zip(self.languages, self._read()):
            n_val = max(int(round(self.val_frac * data.numel())), self.min_val_windows * L + 1)
            if data.numel() - n_val < L + 1:
                raise ValueError(f"Expected language {lang!r} to hold more than {n_val + L + 1} bytes (a validation "
                                 f"part and one training window), but it holds {data.numel()}. Lower `seq_len` or "
                                 "`min_val_windows`, or leave the language out.")
            train.append(CharWindows(data[:-n_val], L))
            windows = CharWindows(data[-n_val:], L)
            if self.max_val_windows is not None and len(windows) > self.max_val_windows:
                windows = torch.utils.data.Subset(windows, range(self.max_val_windows))  # type: ignore[assignment]
            val.append(_DomainWindows(windows, len(val)))
        self.mixture = StreamMixture(train, names=self.languages, batch_size=self.batch_size, seed=self.seed)
        self.val_sets = val

    @property
    def sizes(self) -> list[int]:
        """Training windows per language (``n_k``)."""
        self.setup()
        assert self.mixture is not None
        return self.mixture.sizes.tolist()

    def train_dataloader(self) -> DataLoader:
        self.setup()
        trainer = self.trainer
        if trainer is not None:
            from lightning_reweight.callbacks.mixing import StreamMixing

            if not any(isinstance(c, StreamMixing) for c in trainer.callbacks):
                raise ValueError(
                    "Expected a `StreamMixing` callback for MultilingualDataModule's training mixture (it sets the "
                    "temperature and checkpoints the mixture's position), but the Trainer has none. Add "
                    "`StreamMixing(mode='upsample', tau=1.0)` for the natural mixture, or another setting.")
        return DataLoader(self.mixture, batch_size=None, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(ConcatDataset(self.val_sets), batch_size=self.val_batch_size, shuffle=False)

    def state_dict(self) -> dict[str, Any]:
        return {}  # the mixture's position is checkpointed by `StreamMixing`
