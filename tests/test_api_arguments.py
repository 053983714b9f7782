"""The Python API checks its own arguments: one AbftLensError naming the argument and the fix, never a deep
TypeError or a silently wrong result (issue 18's "Python API" family)."""

from __future__ import annotations

import pytest
import torch

import abft_lens
from abft_lens.errors import AbftLensError

CASES = [
    ("load_model(123)", lambda m, t: abft_lens.load_model(123), "spec=123 must be a non-empty string"),
    ("load_model('')", lambda m, t: abft_lens.load_model(""), "spec='' must be a non-empty string"),
    ("device banana", lambda m, t: abft_lens.load_model("tiny", device="banana"), "device='banana' is not a device"),
    ("dtype text", lambda m, t: abft_lens.load_model("tiny", dtype="float32"), "is not a torch dtype"),
    ("evaluate k='4'", lambda m, t: abft_lens.evaluate(m, t, k="4"), "k='4' must be an integer >= 1"),
    ("evaluate k=-2", lambda m, t: abft_lens.evaluate(m, t, k=-2), "k=-2 must be an integer >= 1"),
    ("evaluate k=0", lambda m, t: abft_lens.evaluate(m, t, k=0), "k=0 must be an integer >= 1"),
    ("evaluate n_test=2.5", lambda m, t: abft_lens.evaluate(m, t, n_test=2.5), "n_test=2.5 must be an integer"),
    ("evaluate n_test=True", lambda m, t: abft_lens.evaluate(m, t, n_test=True), "n_test=True must be an integer"),
    ("evaluate batch_size=0", lambda m, t: abft_lens.evaluate(m, t, batch_size=0), "batch_size=0 must be"),
    ("evaluate('tiny')", lambda m, t: abft_lens.evaluate("tiny", t), "'tiny' is not a TransformerLens model"),
    ("evaluate(task='sst2')", lambda m, t: abft_lens.evaluate(m, "sst2"), "'sst2' is not an ICLTask"),
    ("model_info(dict)", lambda m, t: abft_lens.model_info({}), "dict is not a TransformerLens model"),
]


@pytest.mark.parametrize("name, call, words", CASES, ids=[c[0] for c in CASES])
def test_public_functions_refuse_bad_arguments_with_one_message(tiny_loaded, name, call, words):
    task = abft_lens.load_task("sst2")
    with pytest.raises(AbftLensError) as caught:
        call(tiny_loaded, task)
    assert words in caught.value.problem and caught.value.fix


def test_good_arguments_still_evaluate(tiny_loaded):
    result = abft_lens.evaluate(tiny_loaded, abft_lens.load_task("sst2"), k=2, n_test=3, batch_size=2)
    assert len(result.gold) == 3 and result.k == 2
    assert abft_lens.load_model("tiny", dtype=torch.float32, device="cpu").cfg.device in ("cpu", torch.device("cpu"))
