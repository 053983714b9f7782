"""abft-lens's StaICC draws equal StaICC's own functions (the independent reference), number for number."""

from __future__ import annotations

import warnings

import pytest
from StaICC.util.dataset_interface import demonstration_sampler
from StaICC.util.stable_random import stable_random

from abft_lens.data.stable_random import LcgSampler


@pytest.mark.parametrize("seed, k, n, draws", [(42, 4, 100, 50), (42, 1, 3, 20), (7, 8, 1000, 30), (42, 5, 5, 10)])
def test_sample_equals_staicc(seed, k, n, draws):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # StaICC warns about any seed other than 42
        theirs = stable_random(seed)
    mine = LcgSampler(seed)
    for _ in range(draws):
        assert mine.sample(k, n) == theirs.sample_index_set(k, n, False)
    assert mine.sample(k + 3, 2, allow_repetition=True) == theirs.sample_index_set(k + 3, 2, True)


@pytest.mark.parametrize("seed, n", [(42, 0), (42, 1), (42, 2), (42, 37), (3, 1000), (42, 4097)])
def test_shuffle_equals_staicc(seed, n):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = stable_random(seed).shuffle_list(list(range(n)))
    assert LcgSampler(seed).shuffle(list(range(n))) == theirs


def test_test_demonstrations_equal_staiccs_sampler():
    from abft_lens.data.tasks import load_task

    task = load_task("sst2")
    reference = demonstration_sampler(4, len(task.demonstration), 2 * len(task.test), seed=task.seed)
    assert task.test_demonstrations(4) == [reference[j] for j in range(len(reference))]


def test_custom_data_file_family(tmp_path):
    """Issue 18's data family: a folder, an over-long CSV field, nested JSONL fields: one message each; a large
    file loads and gets its test demonstrations (StaICC's own sampler grew with the square of the rows)."""
    from abft_lens.data.tasks import load_task
    from abft_lens.errors import AbftLensError

    folder = tmp_path / "data.csv"
    folder.mkdir()
    with pytest.raises(AbftLensError, match="is a folder"):
        load_task(folder)
    long = tmp_path / "long.csv"
    long.write_text("text,label\n" + "x" * 200_000 + ",a\nb,b\n")
    with pytest.raises(AbftLensError, match="not readable as CSV"):
        load_task(long)
    nested = tmp_path / "nested.jsonl"
    nested.write_text('{"text": "fine", "label": "a"}\n{"text": {"x": 1}, "label": "b"}\n')
    with pytest.raises(AbftLensError, match=r"line 2: field 'text' is a dict"):
        load_task(nested)
    big = tmp_path / "big.csv"
    big.write_text("text,label\n" + "".join(f"row {i},{'ab'[i % 2]}\n" for i in range(60_000)))
    task = load_task(big)
    assert len(task.test) == 15_000 and len(task.test_demonstrations(4)) == 30_000
