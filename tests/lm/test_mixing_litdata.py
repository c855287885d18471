"""StreamMixture over LitData ``StreamingDataset``s: random access by global index, sizes from the chunks."""

import pytest
import torch

pytest.importorskip("litdata")

from lightning_reweight.data.litdata_text import TextWindowDataset, optimize_text_windows  # noqa: E402
from lightning_reweight.rules.balance import TemperatureSchedule  # noqa: E402
from lightning_reweight.samplers.mixture import StreamMixture, source_size  # noqa: E402


def test_litdata_streams_mix_by_global_index_with_sizes_from_their_chunks(text_file, tmp_path):
    n_big = optimize_text_windows(text_file, tmp_path / "big", seq_len=16, span=(0, 4800))
    n_small = optimize_text_windows(text_file, tmp_path / "small", seq_len=16, span=(4800, 5400))
    big, small = TextWindowDataset(str(tmp_path / "big")), TextWindowDataset(str(tmp_path / "small"))
    assert (source_size(big), source_size(small)) == (n_big, n_small)
    mix = StreamMixture([big, small], batch_size=8, schedule=TemperatureSchedule("constant", tau=100.0), seed=2)
    assert mix.random_access == [True, True]
    batches = [b for _, b in zip(range(10), mix.iter_batches(0, 1))]
    for b in batches:
        for row in range(8):
            k = int(b["domain"][row])
            local = int(b["key"][row]) - int(mix.offsets[k])
            item = (big, small)[k][local]
            assert torch.equal(b["x"][row], torch.as_tensor(item["x"]))  # the window the key names
    small_keys = torch.cat([b["key"][b["domain"] == 1] for b in batches]) - n_big
    assert int(batches[-1]["counts"][1]) == small_keys.numel() > n_small  # the small chunk set cycled
    assert sorted(small_keys[:n_small].tolist()) == list(range(n_small))  # a whole pass first, each window once
