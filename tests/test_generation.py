"""Generation quality: continuations (greedy = a manual argmax loop, seeded sampling), features, perplexity
against a manual computation, MAUVE (built-in and mauve-text), prefix files, the report and train --MAUVE_test."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from abft_lens.cli import main
from abft_lens.errors import AbftLensError
from abft_lens.generation import (
    MauveTest, continuations, generation_report, hidden_features, mauve_available, mauve_from_histograms,
    mauve_score, perplexity, read_prefix_file,
)
from abft_lens.models import load_model

PREFIXES = ["sentence: a gripping and moving film", "sentence: dull, lifeless and far too long",
            "review: the cast is wonderful", "tweet: i can't believe this happened"]
needs_mauve = pytest.mark.skipif(not mauve_available(), reason="mauve-text not installed (optional extra [mauve])")



@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


def _greedy(loaded, text, n):
    ids = loaded.tokenizer(text).input_ids
    with torch.no_grad():
        for _ in range(n):
            ids = ids + [int(loaded.model(torch.tensor([ids]))[0, -1].argmax())]
    return loaded.tokenizer.decode(ids[len(loaded.tokenizer(text).input_ids):], skip_special_tokens=True)


def test_greedy_continuations_equal_a_manual_argmax_loop(tiny):
    assert not tiny.adds_bos
    got = continuations(tiny, PREFIXES[:2], max_new_tokens=6)
    assert got == [_greedy(tiny, p, 6) for p in PREFIXES[:2]]
    assert continuations(tiny, PREFIXES[:2], max_new_tokens=6) == got


def test_sampling_is_seeded_per_prefix(tiny):
    a = continuations(tiny, PREFIXES, max_new_tokens=6, seed=7)
    assert continuations(tiny, PREFIXES, max_new_tokens=6, seed=7) == a
    assert continuations(tiny, PREFIXES[:1], max_new_tokens=6, seed=7) == a[:1]  # independent of later prefixes
    assert continuations(tiny, PREFIXES, max_new_tokens=6, seed=8) != a
    state = torch.get_rng_state()
    continuations(tiny, PREFIXES[:1], max_new_tokens=2, seed=1)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone


def test_hidden_features_are_the_final_normalised_state(tiny):
    feats = hidden_features(tiny, PREFIXES[:2])
    means = hidden_features(tiny, PREFIXES[:2], pooling="mean")
    assert feats.shape == (2, tiny.cfg.d_model) and feats.dtype == torch.float32
    for i, text in enumerate(PREFIXES[:2]):
        _, cache = tiny.model.run_with_cache(torch.tensor([tiny.tokenizer(text).input_ids]))
        final = cache["ln_final.hook_normalized"][0]
        torch.testing.assert_close(feats[i], final[-1])
        torch.testing.assert_close(means[i], final.mean(0))
    with pytest.raises(AbftLensError):
        hidden_features(tiny, PREFIXES[:1], pooling="max")


def test_perplexity_equals_a_manual_computation(tiny):
    result = perplexity(tiny, PREFIXES)
    nll, count = 0.0, 0
    with torch.no_grad():
        for text in PREFIXES:
            ids = torch.tensor(tiny.tokenizer(text).input_ids)
            logp = torch.log_softmax(tiny.model(ids[None])[0].double(), -1)
            nll -= float(logp[torch.arange(len(ids) - 1), ids[1:]].sum())  # first token: no context, no BOS
            count += len(ids) - 1
    assert result.n_tokens == count and result.n_texts == len(PREFIXES)
    assert result.value == pytest.approx(math.exp(nll / count), rel=1e-5)


def _clouds(seed=0, n=100, d=16, shift=10.0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)), rng.normal(size=(n, d)) + shift


@pytest.mark.parametrize("backend", ["builtin", pytest.param("mauve-text", marks=needs_mauve)])
def test_mauve_identical_near_one_and_separated_small(backend):
    p, q = _clouds()
    assert mauve_score(p, p, backend=backend) == pytest.approx(1.0, abs=1e-6)
    assert mauve_score(torch.tensor(p), torch.tensor(p), backend=backend) == pytest.approx(1.0, abs=1e-6)
    assert mauve_score(p, q, backend=backend) < 0.05
    same_law = np.random.default_rng(5).normal(size=(100, 16))
    assert mauve_score(p, same_law, backend=backend) > 0.8


@needs_mauve
def test_builtin_divergence_area_equals_mauve_text_on_given_histograms():
    from mauve.compute_mauve import get_divergence_curve_for_multinomials
    from sklearn.metrics import auc

    rng = np.random.default_rng(0)
    for _ in range(5):
        p, q = rng.dirichlet(np.ones(8)), rng.dirichlet(np.ones(8))
        p[rng.integers(8)] = 0
        p /= p.sum()
        x, y = get_divergence_curve_for_multinomials(p, q, np.linspace(1e-6, 1 - 1e-6, 25), 5).T
        i, j = np.argsort(x), np.argsort(y)
        reference = 0.5 * (auc(x[i], y[i]) + auc(y[j], x[j]))
        assert mauve_from_histograms(p, q) == pytest.approx(reference, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("backend", ["builtin", pytest.param("mauve-text", marks=needs_mauve)])
def test_mauve_of_identical_small_sets_is_one(backend):
    few = np.random.default_rng(0).normal(size=(4, 8))  # identical histograms: ties on the divergence curve
    assert mauve_score(few, few, backend=backend) == pytest.approx(1.0, abs=1e-9)


@needs_mauve
def test_mauve_text_backend_equals_its_own_score_without_ties(no_network):
    import mauve

    p, q = _clouds(shift=0.6)
    assert mauve_score(p, q, backend="mauve-text") == pytest.approx(
        mauve.compute_mauve(p_features=p, q_features=q).mauve, rel=1e-9)
    assert no_network.attempts == []  # features given: mauve-text never fetches gpt2-large


@needs_mauve
def test_builtin_and_mauve_text_agree_on_features():
    p, q = _clouds(shift=0.6)
    assert mauve_score(p, q, backend="builtin") == pytest.approx(mauve_score(p, q, backend="mauve-text"), abs=0.15)


def test_mauve_input_errors():
    with pytest.raises(AbftLensError, match="width"):
        mauve_score(np.zeros((4, 3)), np.zeros((4, 5)))
    with pytest.raises(AbftLensError, match="backend"):
        mauve_score(np.ones((4, 3)), np.ones((4, 3)), backend="gpt2-large")


def test_prefix_files(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("first prefix\n\nsecond prefix\n")
    assert read_prefix_file(plain) == (["first prefix", "second prefix"], None)
    tabbed = tmp_path / "tabbed.txt"
    tabbed.write_text("a prefix\t and its end\nanother\t one\n")
    assert read_prefix_file(tabbed) == (["a prefix", "another"], [" and its end", " one"])
    for text, words in [("", "no prefix"), ("a\tb\nc\n", "some lines"), ("\tb\n", "empty prefix")]:
        bad = tmp_path / "bad.txt"
        bad.write_text(text)
        with pytest.raises(AbftLensError, match=words):
            read_prefix_file(bad)
    with pytest.raises(AbftLensError, match="cannot read"):
        read_prefix_file(tmp_path / "missing.txt")


def test_generation_report_same_and_other_model(tiny):
    refs = [" yes", " no", " maybe", " later"]
    same = generation_report(tiny, tiny, PREFIXES, references=refs, max_new_tokens=4, backend="builtin")
    assert same.mauve["base_vs_tuned"] == pytest.approx(1.0, abs=1e-6)
    assert same.info["identical_continuations"] == len(PREFIXES)
    assert same.perplexity["before"] == same.perplexity["after"]
    assert set(same.mauve) == {"base_vs_tuned", "human_vs_base", "human_vs_tuned"}
    other = generation_report(tiny, load_model("tiny:seed=1"), PREFIXES, max_new_tokens=4, backend="builtin")
    assert set(other.mauve) == {"base_vs_tuned"} and other.info["perplexity_text"] == "the prefixes"
    assert other.perplexity["before"] != other.perplexity["after"]
    data = json.loads(json.dumps(other.to_dict()))
    assert len(data["samples"]) == len(PREFIXES) and data["feature_model"] == "tiny"


def test_mauve_test_leaves_the_trained_weights(tmp_path):
    from abft_lens.runs import run_training
    from abft_lens.tasks import load_task
    from abft_lens.train import TrainConfig

    prefix_file = tmp_path / "prefixes.txt"
    prefix_file.write_text("\n".join(PREFIXES) + "\n")
    loaded = load_model("tiny")
    test = MauveTest(prefix_file, max_new_tokens=3, progress=False)
    test.before(loaded)
    config = TrainConfig(train_samples=8, pseudo_batch_size=4, epochs=1, lr=1e-2, threshold=0.0)
    run_training(loaded, load_task("sst2"), config, n_test=4, fore_test=False, post_test=False, progress=False)
    trained = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    report = test.after(loaded, tmp_path)
    assert all(torch.equal(trained[n], p) for n, p in loaded.model.named_parameters())
    assert report.perplexity["before"] != report.perplexity["after"]
    assert json.loads((tmp_path / "generation.json").read_text())["n_prefixes"] == len(PREFIXES)


def test_train_cli_mauve_test_writes_generation_json(tmp_path, capsys, no_network):
    prefix_file = tmp_path / "prefixes.txt"
    prefix_file.write_text("".join(f"{p}\t the end\n" for p in PREFIXES))
    run_dir = tmp_path / "run"
    quick = ["train", "--model", "tiny", "--dataset", "sst2", "--train-samples", "8", "--pseudo-batch-size", "4",
             "--epochs", "1", "--n-test", "4", "--lr", "1e-2", "--threshold", "0", "--run-dir", str(run_dir)]
    assert main(quick + ["--MAUVE_test", "--MAUVE_prefix", str(prefix_file), "--MAUVE-max-new-tokens", "3"]) == 0
    data = json.loads((run_dir / "generation.json").read_text())
    assert set(data["mauve"]) == {"base_vs_tuned", "human_vs_base", "human_vs_tuned"}
    assert all(0.0 <= v <= 1.0 for v in data["mauve"].values())
    assert data["perplexity"]["before"]["n_texts"] == len(PREFIXES) and data["max_new_tokens"] == 3
    assert [s["reference"] for s in data["samples"]] == [" the end"] * len(PREFIXES)
    assert "MAUVE base vs tuned" in capsys.readouterr().out
    assert no_network.attempts == []
    for extra, words in [(["--MAUVE_test"], "needs --MAUVE_prefix"),
                         (["--MAUVE_prefix", str(prefix_file)], "only with --MAUVE_test"),
                         (["--MAUVE_test", "--MAUVE_prefix", str(tmp_path / "none.txt")], "cannot read")]:
        other = tmp_path / "refused"
        argv = [a if a != str(run_dir) else str(other) for a in quick] + extra
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err
        assert not other.exists()


@pytest.mark.embedded
def test_embedded_greedy_continuation_equals_hugging_face(embedded, embedded_hf):
    assert not embedded.adds_bos  # SmolLM2: no BOS, and none is prepended by generate
    text = PREFIXES[0]
    ids = embedded.tokenizer(text, return_tensors="pt").input_ids
    hf = embedded_hf.generate(ids, max_new_tokens=5, do_sample=False, attention_mask=torch.ones_like(ids))
    expected = embedded.tokenizer.decode(hf[0, ids.shape[1]:], skip_special_tokens=True)
    assert continuations(embedded, [text], max_new_tokens=5) == [expected]
