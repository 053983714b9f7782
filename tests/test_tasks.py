"""Tasks: StaICC datasets by index / name with StaICC's splits, custom CSV and JSONL files, and their errors."""

from __future__ import annotations

import json

import pytest

from abft_lens.errors import AbftLensError
from abft_lens.data.tasks import PAPER_DATASETS, Example, Template, load_custom_task, load_task, staicc_index

# abft-method.md §4: index, input prefix, label prefix (no trailing space), label words, split sizes
TABLE = {
    0: ("sst2", "sentence: ", "sentiment:", ["negative", "positive"], (1024, 4096, 512)),
    1: ("mr", "review: ", "sentiment:", ["negative", "positive"], (1024, 4096, 512)),
    2: ("fp", "sentence: ", "sentiment:", ["negative", "neutral", "positive"], (1024, 512, 512)),
    3: ("sst5", "sentence: ", "sentiment:", ["poor", "bad", "neutral", "good", "great"], (1024, 4096, 512)),
    4: ("trec", "question: ", "target:", ["short", "entity", "description", "person", "location", "number"],
        (1024, 4096, 512)),
    5: ("agnews", "news: ", "topic:", ["world", "sports", "business", "science"], (1024, 4096, 512)),
    6: ("subj", "review: ", "subjectiveness:", ["false", "true"], (1024, 4096, 512)),
    7: ("tee", "tweet: ", "emotion:", ["anger", "joy", "positive", "sad"], (1024, 3192, 512)),
    8: ("teh", "tweet: ", "hate speech:", ["normal", "hate"], (1024, 4096, 512)),
    9: ("hs18", "tweet: ", "hate speech:", ["normal", "hate", "skip", "relation"], (1024, 4096, 512)),
}


# --------------------------------------------------------------------------------------------- StaICC


@pytest.mark.parametrize("index", range(10))
def test_staicc_dataset_splits_template_and_label_words(index):
    name, input_prefix, label_prefix, words, sizes = TABLE[index]
    task = load_task(index)
    assert task.name == name and task.index == index and task.seed == 42
    assert (len(task.calibration), len(task.demonstration), len(task.test)) == sizes
    assert task.label_words == tuple(" " + word for word in words)
    assert task.n_labels == len(words)
    assert task.template.input_prefix == input_prefix
    assert task.template.label_prefix == label_prefix and not label_prefix.endswith(" ")
    assert task.template.label_affix == "\n"
    for split in (task.calibration, task.demonstration, task.test):
        assert all(isinstance(e, Example) and 0 <= e.label < task.n_labels for e in split)
        assert all(isinstance(e.text, str) for e in split)
    # every label occurs in the test split
    assert {e.label for e in task.test} == set(range(task.n_labels))
    described = task.describe()
    assert described["splits"] == dict(zip(("calibration", "demonstration", "test"), sizes))
    json.dumps(described)


@pytest.mark.parametrize(
    "spec, index",
    [
        (0, 0), ("0", 0), (" 3 ", 3), ("9", 9), ("sst2", 0), ("SST-2", 0), ("glue-sst2", 0), ("mr", 1),
        ("rotten_tomatoes", 1), ("rt", 1), ("fp", 2), ("financial_phrasebank", 2), ("sst5", 3), ("sst-5", 3),
        ("trec", 4), ("TREC", 4), ("agnews", 5), ("ag_news", 5), ("subj", 6), ("subjective", 6), ("tee", 7),
        ("tweet_eval_emotion", 7), ("teh", 8), ("tweet_eval_hate", 8), ("hs18", 9), ("hate_speech_18", 9),
    ],
)
def test_names_aliases_and_indices_resolve(spec, index):
    assert staicc_index(spec) == index


def test_load_task_by_name_equals_by_index():
    by_name, by_index = load_task("financial_phrasebank"), load_task(2)
    assert by_name.name == by_index.name == "fp"
    assert by_name.test == by_index.test and by_name.demonstration == by_index.demonstration


@pytest.mark.parametrize("spec, pattern", [(10, "out of range"), ("42", "out of range"), ("-1", "unknown dataset"),
                                           ("imdb", "unknown dataset"), ("", "unknown dataset")])
def test_bad_dataset_names(spec, pattern):
    with pytest.raises(AbftLensError, match=pattern) as info:
        load_task(spec)
    assert "0 sst2" in info.value.fix and "9 hs18" in info.value.fix


def test_custom_options_rejected_for_staicc():
    with pytest.raises(AbftLensError, match="only apply to custom"):
        load_task("sst2", label_words=["bad", "good"])


def test_paper_datasets_exclude_agnews_and_hs18():
    assert PAPER_DATASETS == (0, 1, 2, 3, 4, 6, 7, 8)


@pytest.mark.parametrize("index", [0, 2])
def test_splits_equal_staicc_triplet(index, staicc_experimentor):
    """The splits are StaICC's own (seed-42 LCG), in StaICC's order; so are the test demonstrations."""
    task = load_task(index)
    exp = staicc_experimentor(index)
    for ours, theirs in ((task.calibration, exp.calibration_set()), (task.demonstration, exp.demonstration_set()),
                         (task.test, exp.test_set())):
        assert [(e.text, e.label) for e in ours] == [(texts[0], label) for texts, label in theirs.get_dataset()]
    assert exp.get_label_space() == list(task.label_words)
    demos = task.test_demonstrations(4)
    assert len(demos) == 1024 and all(len(d) == 4 and len(set(d)) == 4 for d in demos)
    assert demos == [list(exp.demonstration_sampler[j]) for j in range(1024)]


def test_test_demonstrations_k_too_large():
    task = load_task("fp")
    with pytest.raises(AbftLensError, match="k=513 is larger than the demonstration split"):
        task.test_demonstrations(513)


# --------------------------------------------------------------------------------------------- custom


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def _csv(tmp_path, rows, header="text,label", name="data.csv"):
    return _write(tmp_path / name, header + "\n" + "\n".join(rows) + "\n")


def _jsonl(tmp_path, records, name="data.jsonl"):
    return _write(tmp_path / name, "".join(json.dumps(r) + "\n" for r in records))


def _all(task):
    return task.calibration + task.demonstration + task.test


def test_custom_csv_label_words_sorted_with_leading_space(tmp_path):
    rows = [f"text number {i},{'good' if i % 3 else 'bad'}" for i in range(20)]
    task = load_task(_csv(tmp_path, rows))
    assert task.name == "data" and task.index is None
    assert task.label_words == (" bad", " good")
    examples = _all(task)
    assert len(examples) == 20
    by_text = {e.text: e.label for e in examples}
    assert by_text == {f"text number {i}": (1 if i % 3 else 0) for i in range(20)}
    assert (len(task.calibration), len(task.demonstration), len(task.test)) == (5, 10, 5)
    assert task.template == Template()


def test_custom_labels_as_indices_with_label_words(tmp_path):
    rows = [f"row {i},{i % 3}" for i in range(12)]
    task = load_custom_task(_csv(tmp_path, rows), label_words=["neg", " neu", "pos"], name="three")
    assert task.name == "three" and task.label_words == (" neg", " neu", " pos")
    assert {e.text: e.label for e in _all(task)} == {f"row {i}": i % 3 for i in range(12)}
    # words and indices can be mixed; JSONL integers work too
    records = [{"text": "a", "label": 2}, {"text": "b", "label": "neg"}, {"text": "c", "label": "1"},
               {"text": "d", "label": 0}]
    task = load_custom_task(_jsonl(tmp_path, records), label_words=["neg", "neu", "pos"])
    assert {e.text: e.label for e in _all(task)} == {"a": 2, "b": 0, "c": 1, "d": 0}


def test_custom_jsonl_with_split_field_and_blank_lines(tmp_path):
    lines = [
        json.dumps({"text": "cal one", "label": "yes", "split": "calibration"}),
        "",
        json.dumps({"text": "demo one", "label": "no", "split": "Demonstration"}),
        json.dumps({"text": "demo two", "label": "yes", "split": "demonstration"}),
        "   ",
        json.dumps({"text": "test one", "label": "no", "split": "test"}),
    ]
    task = load_task(_write(tmp_path / "s.jsonl", "\n".join(lines) + "\n"))
    assert task.label_words == (" no", " yes")
    assert task.calibration == [Example("cal one", 1)]
    assert task.demonstration == [Example("demo one", 0), Example("demo two", 1)]
    assert task.test == [Example("test one", 0)]


def test_custom_csv_split_column(tmp_path):
    rows = ["a,x,test", "b,y,calibration", "c,x,demonstration", "d,y,demonstration"]
    task = load_task(_csv(tmp_path, rows, header="text,label,split"))
    assert [e.text for e in task.test] == ["a"]
    assert [e.text for e in task.calibration] == ["b"]
    assert [e.text for e in task.demonstration] == ["c", "d"]


def test_custom_seeded_split_is_deterministic(tmp_path):
    path = _csv(tmp_path, [f"example {i},{i % 2}" for i in range(40)])
    first, again = load_custom_task(path, seed=7), load_custom_task(path, seed=7)
    other = load_custom_task(path, seed=8)
    assert first.test == again.test and first.calibration == again.calibration
    assert first.demonstration == again.demonstration
    assert [e.text for e in first.test] != [e.text for e in other.test]
    assert first.seed == 7
    # a partition: nothing lost, nothing duplicated, 25/50/25
    assert sorted(e.text for e in _all(first)) == sorted(f"example {i}" for i in range(40))
    assert (len(first.calibration), len(first.demonstration), len(first.test)) == (10, 20, 10)
    # shuffled, not file order
    assert [e.text for e in first.calibration] != [f"example {i}" for i in range(10)]


@pytest.mark.parametrize(
    "rows, line, missing",
    [
        (["fine,good", ",bad"], 3, "text"),
        (["fine,good", "ok,good", "meh,"], 4, "label"),
    ],
)
def test_custom_csv_missing_field_names_file_and_line(tmp_path, rows, line, missing):
    path = _csv(tmp_path, rows)
    with pytest.raises(AbftLensError) as info:
        load_task(path)
    message = str(info.value)
    assert str(path) in message and f"line {line}" in message and missing in message


def test_custom_csv_without_label_column(tmp_path):
    path = _csv(tmp_path, ["fine"], header="text")
    with pytest.raises(AbftLensError, match=r"line 2: missing field\(s\) label"):
        load_task(path)


def test_custom_jsonl_missing_field_and_bad_json(tmp_path):
    path = _write(tmp_path / "m.jsonl", '{"text": "a", "label": "x"}\n\n{"text": "b"}\n')
    with pytest.raises(AbftLensError, match=r"m\.jsonl, line 3: missing field\(s\) label"):
        load_task(path)
    path = _write(tmp_path / "bad.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": \n')
    with pytest.raises(AbftLensError, match=r"bad\.jsonl, line 2: not valid JSON"):
        load_task(path)


def test_custom_jsonl_line_that_is_not_an_object(tmp_path):
    path = _write(tmp_path / "list.jsonl", '{"text": "a", "label": "x"}\n["b", "x"]\n')
    with pytest.raises(AbftLensError, match=r"list\.jsonl, line 2"):
        load_task(path)


def test_custom_unknown_label_and_split(tmp_path):
    path = _csv(tmp_path, ["a,good", "b,great"])
    with pytest.raises(AbftLensError, match=r"line 3: label 'great' is not one of \['bad', 'good'\]"):
        load_custom_task(path, label_words=["bad", "good"])
    path = _csv(tmp_path, [f"a,{i}" for i in (0, 1, 5)], name="idx.csv")
    with pytest.raises(AbftLensError, match="line 4: label '5'"):
        load_custom_task(path, label_words=["bad", "good"])
    path = _csv(tmp_path, ["a,x,train"], header="text,label,split", name="split.csv")
    with pytest.raises(AbftLensError, match="line 2: unknown split 'train'"):
        load_task(path)


def test_custom_missing_and_empty_files(tmp_path):
    with pytest.raises(AbftLensError, match="does not exist"):
        load_task(tmp_path / "nope.csv")
    with pytest.raises(AbftLensError, match="holds no examples"):
        load_task(_write(tmp_path / "empty.jsonl", "\n"))
