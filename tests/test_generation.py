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
from abft_lens.studies.generation import continuations, generate_batch, hidden_features, perplexity, read_prefix_file
from abft_lens.studies.generation_report import MauveTest, generation_report
from abft_lens.studies.mauve import auto_buckets, mauve_available, mauve_from_histograms, mauve_score
from abft_lens.backends.loading import load_model
from abft_lens.backends.provenance import model_info

PREFIXES = ["sentence: a gripping and moving film", "sentence: dull, lifeless and far too long",
            "review: the cast is wonderful", "tweet: i can't believe this happened"]
needs_mauve = pytest.mark.skipif(not mauve_available(), reason="mauve-text not installed (optional extra [mauve])")



@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


def _greedy(model, text, n):
    ids = model.tokenizer(text).input_ids
    with torch.no_grad():
        for _ in range(n):
            ids = ids + [int(model(torch.tensor([ids]))[0, -1].argmax())]
    return model.tokenizer.decode(ids[len(model.tokenizer(text).input_ids):], skip_special_tokens=True)


def _tl_generate(model, text, n):
    """The previous implementation: TransformerLens ``generate`` on one prefix, no padding."""
    ids = model.tokenizer(text).input_ids
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, verbose=False,
                                    stop_at_eos=model.tokenizer.eos_token_id is not None, return_type="tokens",
                                    prepend_bos=False)
    return model.tokenizer.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)


def test_greedy_continuations_equal_a_manual_argmax_loop(tiny):
    assert not model_info(tiny).adds_bos
    got = continuations(tiny, PREFIXES[:2], max_new_tokens=6)
    assert got == [_greedy(tiny, p, 6) for p in PREFIXES[:2]]
    assert continuations(tiny, PREFIXES[:2], max_new_tokens=6) == got


MIXED = PREFIXES + ["x", "a b c d e f g h i j k l m n o p q r s t u v w x y z", "the end"]


def test_batched_greedy_equals_one_prefix_at_a_time(tiny):
    """Left padding, masks and the KV cache change nothing: every batching gives each prefix's own result,
    equal to TransformerLens ``generate`` on that prefix alone and to a manual argmax loop without a cache."""
    lengths = {len(tiny.tokenizer(p).input_ids) for p in MIXED}
    assert len(lengths) >= 5  # the batches really are padded
    alone = [_tl_generate(tiny, p, 10) for p in MIXED]
    assert alone == [_greedy(tiny, p, 10) for p in MIXED]
    for batch_size in (1, 3, len(MIXED)):
        assert continuations(tiny, MIXED, max_new_tokens=10, batch_size=batch_size) == alone
    assert continuations(tiny, MIXED[::-1], max_new_tokens=10) == alone[::-1]  # order-independent


def test_generate_batch_stops_each_row_at_its_own_eos(tiny):
    prompts = [tiny.tokenizer(p).input_ids for p in PREFIXES[:3]]
    free = generate_batch(tiny, prompts, 8, eos_token_id=None)
    assert [len(row) for row in free] == [8, 8, 8]
    eos = free[0][2]  # a token row 0 emits at step 3
    stopped = generate_batch(tiny, prompts, 8, eos_token_id=eos)
    for row, full in zip(stopped, free):
        assert row == (full[:full.index(eos)] if eos in full else full)
    assert len(stopped[0]) == 2


def test_generation_arguments_are_checked(tiny):
    for kwargs, words in [(dict(max_new_tokens=0), "max_new_tokens"), (dict(batch_size=0), "batch_size"),
                          (dict(seed=1, temperature=0.0), "temperature")]:
        with pytest.raises(AbftLensError, match=words):
            continuations(tiny, PREFIXES[:1], **{"max_new_tokens": 2, **kwargs})


def test_sampling_is_seeded_per_prefix(tiny):
    a = continuations(tiny, PREFIXES, max_new_tokens=6, seed=7)
    assert continuations(tiny, PREFIXES, max_new_tokens=6, seed=7) == a
    assert continuations(tiny, PREFIXES[:1], max_new_tokens=6, seed=7) == a[:1]  # independent of later prefixes
    assert continuations(tiny, PREFIXES, max_new_tokens=6, seed=7, batch_size=1) == a  # and of batching
    # a nucleus that holds only the top token is greedy decoding
    assert continuations(tiny, PREFIXES, max_new_tokens=6, seed=7, top_p=1e-9) == continuations(tiny, PREFIXES, 6)
    assert continuations(tiny, PREFIXES, max_new_tokens=6, seed=8) != a
    state = torch.get_rng_state()
    continuations(tiny, PREFIXES[:1], max_new_tokens=2, seed=1)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone


def test_hidden_features_are_the_final_normalised_state(tiny):
    alone = hidden_features(tiny, MIXED, batch_size=1)
    alone_means = hidden_features(tiny, MIXED, pooling="mean", batch_size=1)
    assert alone.shape == (len(MIXED), tiny.cfg.d_model) and alone.dtype == torch.float32
    for i, text in enumerate(MIXED):
        _, cache = tiny.run_with_cache(torch.tensor([tiny.tokenizer(text).input_ids]))
        final = cache["ln_final.hook_normalized"][0]
        torch.testing.assert_close(alone[i], final[-1])
        torch.testing.assert_close(alone_means[i], final.mean(0))
    # left-padded batches (masked, positions from the first real token): the same up to float rounding
    torch.testing.assert_close(hidden_features(tiny, MIXED), alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(hidden_features(tiny, MIXED, pooling="mean", batch_size=3), alone_means,
                               rtol=0, atol=1e-5)
    with pytest.raises(AbftLensError):
        hidden_features(tiny, PREFIXES[:1], pooling="max")


def test_perplexity_equals_a_manual_computation(tiny):
    nll, count = 0.0, 0
    with torch.no_grad():
        for text in MIXED:
            ids = torch.tensor(tiny.tokenizer(text).input_ids)
            logp = torch.log_softmax(tiny(ids[None])[0].double(), -1)
            nll -= float(logp[torch.arange(len(ids) - 1), ids[1:]].sum())  # first token: no context, no BOS
            count += len(ids) - 1
    assert 1 in {len(tiny.tokenizer(t).input_ids) for t in MIXED}  # a one-token text scores nothing
    for batch_size in (1, 3, 8):
        result = perplexity(tiny, MIXED, batch_size=batch_size)
        assert result.n_tokens == count and result.n_texts == len(MIXED)
        assert result.value == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_batches_are_length_sorted_left_padded_and_bounded(tiny):
    from abft_lens.studies.generation import _batches

    lengths = [len(tiny.tokenizer(t).input_ids) for t in MIXED]
    seen = []
    for indices, tokens, mask in _batches(tiny, MIXED, 3, False, "x", min_tokens=1, max_tokens=40):
        assert len(indices) <= 3 and (len(indices) == 1 or tokens.numel() <= 40)
        assert mask.sum(1).tolist() == [lengths[i] for i in indices] and bool(mask[:, -1].all())
        for row, i in enumerate(indices):
            assert tokens[row, -lengths[i]:].tolist() == tiny.tokenizer(MIXED[i]).input_ids
        seen += indices
    assert sorted(seen) == list(range(len(MIXED))) and [lengths[i] for i in seen] == sorted(lengths)


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
    assert set(same.features) == {"base", "tuned", "human"} and "features" not in same.to_dict()
    assert same.info["num_buckets"] == auto_buckets(len(PREFIXES)) == 2
    assert [auto_buckets(n) for n in (48, 96, 256)] == [5, 10, 26]  # mauve-text's "auto": round(n / 10)
    assert same.mauve["human_vs_tuned"] == pytest.approx(
        mauve_score(same.features["human"], same.features["tuned"], backend="builtin"))
    other = generation_report(tiny, load_model("tiny:seed=1"), PREFIXES, max_new_tokens=4, backend="builtin")
    assert set(other.mauve) == {"base_vs_tuned"} and other.info["perplexity_text"] == "the prefixes"
    assert other.perplexity["before"] != other.perplexity["after"]
    data = json.loads(json.dumps(other.to_dict()))
    assert len(data["samples"]) == len(PREFIXES) and data["feature_model"] == "tiny"


def test_mauve_test_leaves_the_trained_weights(tmp_path):
    from abft_lens.training.runs import run_training
    from abft_lens.data.tasks import load_task
    from abft_lens.training.train import TrainConfig

    prefix_file = tmp_path / "prefixes.txt"
    prefix_file.write_text("\n".join(PREFIXES) + "\n")
    model = load_model("tiny")
    test = MauveTest(prefix_file, max_new_tokens=3, progress=False)
    test.before(model)
    config = TrainConfig(train_samples=8, pseudo_batch_size=4, epochs=1, lr=1e-2, threshold=0.0)
    run = run_training(model, load_task("sst2"), config, n_test=4, fore_test=False, post_test=False, progress=False)
    run.apply_to(model)  # run_training gives the model back as it came
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = test.after(model, tmp_path)
    assert all(torch.equal(trained[n], p) for n, p in model.named_parameters())
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
    for extra, words in [(["--MAUVE_test"], "needs --MAUVE-prefix"),
                         (["--MAUVE_prefix", str(prefix_file)], "only with --MAUVE-test"),
                         (["--MAUVE_test", "--MAUVE_prefix", str(tmp_path / "none.txt")], "cannot read")]:
        other = tmp_path / "refused"
        argv = [a if a != str(run_dir) else str(other) for a in quick] + extra
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err
        assert not other.exists()


@pytest.mark.embedded
def test_embedded_greedy_continuations_equal_hugging_face_and_tl_generate(embedded, embedded_hf):
    """SmolLM2: one left-padded batch of 4 prefixes of different lengths gives, for each prefix, Hugging Face's
    greedy ``generate`` on it alone; for two of them also TransformerLens ``generate`` alone (the old path)."""
    assert not model_info(embedded).adds_bos  # SmolLM2: no BOS, and none is prepended
    assert len({len(embedded.tokenizer(p).input_ids) for p in PREFIXES}) > 1
    expected = []
    for text in PREFIXES:
        ids = embedded.tokenizer(text, return_tensors="pt").input_ids
        hf = embedded_hf.generate(ids, max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(ids))
        expected.append(embedded.tokenizer.decode(hf[0, ids.shape[1]:], skip_special_tokens=True))
    assert continuations(embedded, PREFIXES, max_new_tokens=8) == expected
    assert [_tl_generate(embedded, p, 8) for p in PREFIXES[:2]] == expected[:2]
