"""ICL tasks: the ten StaICC datasets (the paper's benchmark) and custom CSV/JSONL datasets.

A task holds three splits of (text, label index) examples, a template, and label words with their leading
space (StaICC's ``replace_space_to_label()`` convention: ``"sentiment:"`` + ``" positive"``), so prompts end
without a trailing space and the label is the next token. For StaICC datasets the splits and the fixed test
demonstrations come from StaICC's own seed-42 generator, so results are comparable with the paper.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from abft_lens.data.stable_random import LcgSampler
from abft_lens.errors import AbftLensError


@dataclass(frozen=True)
class Example:
    """One labelled example: the input text and the index of its label in the task's label words."""

    text: str
    label: int


@dataclass(frozen=True)
class Template:
    """How a prompt is written: ``instruction`` then, per demonstration,
    ``input_prefix + text + input_affix + label_prefix + label_word + label_affix``; the query ends at
    ``label_prefix`` (no trailing space: label words carry the leading space)."""

    input_prefix: str = "Input: "
    label_prefix: str = "Label:"
    input_affix: str = " "
    label_affix: str = "\n"
    instruction: str = ""
    query_prefix: str = ""

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class ICLTask:
    """A classification task for in-context learning, with calibration / demonstration / test splits."""

    name: str
    label_words: tuple[str, ...]
    template: Template
    calibration: list[Example]
    demonstration: list[Example]
    test: list[Example]
    index: int | None = None
    seed: int = 42
    source: dict | None = None  # a custom file's path, sha256 and loader options (None: StaICC)
    _test_demos: dict = field(default_factory=dict, repr=False)

    @property
    def n_labels(self) -> int:
        return len(self.label_words)

    @property
    def n_test_prompts(self) -> int:
        """How many fixed test prompts there are (StaICC "Normal": every test query twice)."""
        return 2 * len(self.test)

    def check_test_prompts(self, k: int, n: int | None = None) -> None:
        """Raise :class:`AbftLensError` unless the first ``n`` fixed test prompts with ``k`` demonstrations exist
        (``n=None``: all of them); needs no model, so commands check it before loading one."""
        if not self.test:
            raise AbftLensError(f"the test split of {self.name} is empty.",
                                "add examples (a file without a split column puts 25% of its rows in the test split) "
                                "or mark some rows with split=test.")
        if k > len(self.demonstration):
            raise AbftLensError(
                f"k={k} is larger than the demonstration split of {self.name} ({len(self.demonstration)} examples).",
                f"use k <= {len(self.demonstration)}.",
            )
        if n is not None and not 0 < n <= self.n_test_prompts:
            raise AbftLensError(f"n_test={n} is out of range for {self.name}.", f"use 1-{self.n_test_prompts}.")

    def test_demonstrations(self, k: int, repeats: int = 2) -> list[list[int]]:
        """StaICC's fixed demonstration indices: prompt ``j`` uses query ``j % len(test)`` and
        ``demonstration[i]`` for i in the returned ``[j]`` list; ``repeats * len(test)`` prompts in all."""
        self.check_test_prompts(k)
        if (k, repeats) not in self._test_demos:  # StaICC's demonstration_sampler, in O(k^2) per query
            sampler, size = LcgSampler(self.seed), len(self.demonstration)
            self._test_demos[(k, repeats)] = [sampler.sample(k, size, allow_repetition=k > size)
                                              for _ in range(repeats * len(self.test))]
        return self._test_demos[(k, repeats)]

    def describe(self) -> dict:
        return {
            "name": self.name,
            "index": self.index,
            "label_words": list(self.label_words),
            "template": self.template.to_dict(),
            "splits": {"calibration": len(self.calibration), "demonstration": len(self.demonstration),
                       "test": len(self.test)},
            **({"source": dict(self.source)} if self.source else {}),
        }


# --------------------------------------------------------------------------------------------- StaICC

STAICC_DATASETS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("sst2", ("sst-2", "glue-sst2")),
    ("mr", ("rotten_tomatoes", "rt")),
    ("fp", ("financial_phrasebank",)),
    ("sst5", ("sst-5",)),
    ("trec", ()),
    ("agnews", ("ag_news",)),
    ("subj", ("subjective",)),
    ("tee", ("tweet_eval_emotion",)),
    ("teh", ("tweet_eval_hate",)),
    ("hs18", ("hate_speech_18",)),
)
PAPER_DATASETS = (0, 1, 2, 3, 4, 6, 7, 8)  # the paper averages over these (AGNews 5 and HS18 9 excluded)


def staicc_index(name_or_index: str | int) -> int:
    """Resolve ``0``-``9``, ``"3"`` or a dataset name / alias to the paper's dataset index."""
    text = str(name_or_index).strip().lower()
    if text.isdigit():
        index = int(text)
        if not 0 <= index < len(STAICC_DATASETS):
            raise AbftLensError(f"dataset index {index} is out of range.",
                                f"use 0-{len(STAICC_DATASETS) - 1} ({_dataset_menu()}).")
        return index
    for index, (name, aliases) in enumerate(STAICC_DATASETS):
        if text == name or text in aliases:
            return index
    raise AbftLensError(f"unknown dataset {name_or_index!r}.",
                        f"use an index or name ({_dataset_menu()}) or a path to a .csv/.jsonl file.")


def _dataset_menu() -> str:
    return ", ".join(f"{i} {name}" for i, (name, _) in enumerate(STAICC_DATASETS))


def check_task(task) -> None:
    """``task`` is an :class:`ICLTask` (a name is not: load it first)."""
    if not isinstance(task, ICLTask):
        shown = repr(task) if isinstance(task, (str, int, float)) else type(task).__name__
        raise AbftLensError(f"{shown} is not an ICLTask.", "load it first, e.g. task = abft_lens.load_task('sst2').")


def task_from_description(described: dict, dataset: str | None = None) -> ICLTask:
    """The task a run folder's ``config.json["task"]`` (:meth:`ICLTask.describe`) names: the StaICC dataset, or
    the custom file it was trained on, checked against its recorded sha256. ``dataset`` (a path) points at the
    file when it moved; it must hold the same data.

    A custom file is never replaced by a StaICC dataset of the same name (a file ``sst2.csv`` is not SST-2).
    """
    source = described.get("source")
    if source is None and described.get("index") is None and dataset is None:
        raise AbftLensError(f"the run was trained on a custom dataset {described.get('name')!r} whose file it does "
                            "not record (a run folder written before abft-lens recorded data files).",
                            "pass the file it was trained on with --dataset FILE (task= in Python).")
    if source is None:
        return load_task(dataset if dataset is not None else described["index"])
    path = Path(dataset).expanduser() if dataset is not None else Path(source["path"])
    if not path.is_file():
        raise AbftLensError(f"the run's data file {source['path']} is not there any more.",
                            "pass the file it was trained on with --dataset FILE (task= in Python).")
    if file_sha256(path) != source["sha256"]:
        raise AbftLensError(f"{path} is not the data the run was trained on (its sha256 differs from the "
                            f"recorded {source['sha256'][:12]}...).", "pass the original file with --dataset FILE.")
    template = Template(**source["template"]) if source.get("template") else None
    return load_custom_task(path, label_words=source.get("label_words"), template=template, name=described["name"],
                            seed=source.get("seed", 42))


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_task(name_or_path: str | int, **custom) -> ICLTask:
    """Load a StaICC dataset by index or name, or a custom CSV/JSONL file (see :func:`load_custom_task`)."""
    path = Path(str(name_or_path)).expanduser()
    if path.suffix.lower() in (".csv", ".jsonl"):
        return load_custom_task(path, **custom)
    if custom:
        raise AbftLensError(f"options {sorted(custom)} only apply to custom CSV/JSONL datasets.",
                            "drop them for StaICC datasets.")
    return _load_staicc(staicc_index(name_or_path))


@lru_cache(maxsize=16)
def _load_staicc_cached(index: int) -> ICLTask:
    from StaICC.normal import ORIGINAL_DATA_LOADER_NORMAL
    from StaICC.util import configs
    from StaICC.util.dataset_interface import triplet_dataset

    original = ORIGINAL_DATA_LOADER_NORMAL[index]()
    settings = configs.STANDARD_SETTINGS
    split = {"financial_phrasebank": settings["split_for_FP"], "tweet_eval_emotion": settings["split_for_TEE"]}.get(
        original.get_dataset_name(), settings
    )
    triplet = triplet_dataset(original, split["calibration_number"], split["demonstration_number"], split["test_number"])
    words = original.get_label_space()
    mapping = original._label_mapping  # StaICC's dataset label index -> label-space index (identity today)

    def examples(part) -> list[Example]:
        rows = part.get_dataset()
        if any(len(texts) != 1 for texts, _ in rows):
            raise AbftLensError(f"{original.get_dataset_name()} has multi-input examples.",
                                "only single-input datasets are supported.")
        return [Example(texts[0], mapping[label]) for texts, label in rows]

    label_prefix = original.get_label_prefix()
    template = Template(
        instruction=original._instruction,
        input_prefix=original.get_input_text_prefixes()[0],
        input_affix=original._input_text_affixes[0],
        label_prefix=label_prefix[:-1] if label_prefix.endswith(" ") else label_prefix,
        label_affix=original._label_affix,
        query_prefix=original.get_query_prefix(),
    )
    return ICLTask(
        name=STAICC_DATASETS[index][0],
        label_words=tuple(" " + word for word in words),
        template=template,
        calibration=examples(triplet.calibration),
        demonstration=examples(triplet.demonstration),
        test=examples(triplet.test),
        index=index,
    )


def _load_staicc(index: int) -> ICLTask:
    cached = _load_staicc_cached(index)
    return replace(cached, _test_demos=cached._test_demos)


# --------------------------------------------------------------------------------------------- custom


def load_custom_task(
    path: str | Path,
    *,
    label_words: Sequence[str] | None = None,
    template: Template | None = None,
    name: str | None = None,
    seed: int = 42,
) -> ICLTask:
    """A task from a CSV (header ``text,label``) or JSONL (``{"text": ..., "label": ...}`` per line) file.

    ``label`` is a label word or an index into ``label_words``; without ``label_words`` the distinct label
    strings, sorted, are the label words. An optional ``split`` field (calibration / demonstration / test)
    places rows; otherwise a seeded shuffle puts 25% in calibration, 50% in demonstration, 25% in test.
    Label words get a leading space if they lack one.
    """
    path = Path(path)
    if path.is_dir():
        raise AbftLensError(f"dataset file {path} is a folder.", "pass the CSV or JSONL file inside it.")
    if not path.is_file():
        raise AbftLensError(f"dataset file {path} does not exist.", "check the path.")
    try:
        rows = list(_read_rows(path))
    except UnicodeDecodeError as error:
        raise AbftLensError(f"{path} is not UTF-8 text (byte {error.object[error.start]:#04x} at offset {error.start}).",
                            "save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8, or Excel's 'CSV UTF-8').") from None
    if not rows:
        raise AbftLensError(f"{path} holds no examples.", "add rows with a text and a label.")
    raw_labels = [label for _, label, _, _ in rows]
    words = [w.strip() for w in label_words] if label_words else sorted({str(l).strip() for l in raw_labels})
    examples: dict[str, list[Example]] = {"calibration": [], "demonstration": [], "test": [], "": []}
    for line, (text, label, split, _) in enumerate(rows, start=1):
        index = _label_index(label, words, path, rows[line - 1][3])
        if split not in examples:
            raise AbftLensError(f"{path}, line {rows[line - 1][3]}: unknown split {split!r}.",
                                "use calibration, demonstration or test.")
        examples[split].append(Example(text, index))
    if len(words) < 2:
        raise AbftLensError(f"{path} has a single label ({words[0] if words else ''!r}); in-context classification "
                            "needs at least two.", "add examples of the other labels, or pass every label word.")
    unplaced = examples.pop("")
    if unplaced:
        order = LcgSampler(seed).shuffle(range(len(unplaced)))  # StaICC's shuffle_list, in O(n log n)
        n = len(order)
        examples["calibration"] += [unplaced[i] for i in order[: n // 4]]
        examples["demonstration"] += [unplaced[i] for i in order[n // 4: n * 3 // 4]]
        examples["test"] += [unplaced[i] for i in order[n * 3 // 4:]]
    source = {"path": str(path.resolve()), "sha256": file_sha256(path), "seed": seed,
              "label_words": list(label_words) if label_words else None,
              "template": template.to_dict() if template else None}
    return ICLTask(
        name=name or path.stem,
        label_words=tuple(" " + w for w in words),
        template=template or Template(),
        seed=seed,
        source=source,
        **examples,
    )


def _read_rows(path: Path):
    """Yield (text, label, split, line_number) from a CSV or JSONL file, naming the line of a bad row."""
    if path.suffix.lower() == ".jsonl":
        with path.open(encoding="utf-8-sig") as handle:  # -sig: a leading byte-order mark is not part of the data
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise AbftLensError(f"{path}, line {number}: not valid JSON ({error.msg}).",
                                        "write one JSON object per line.") from error
                if not isinstance(record, dict):
                    raise AbftLensError(f"{path}, line {number}: not a JSON object ({type(record).__name__}).",
                                        'write one JSON object per line: {"text": ..., "label": ...}.')
                yield _fields(record, path, number)
    else:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            number = 1  # the header
            try:
                for number, record in enumerate(reader, start=2):
                    yield _fields(record, path, number)
            except csv.Error as error:  # e.g. a field over csv's limit of 131,072 characters
                raise AbftLensError(f"{path}, after line {number}: not readable as CSV ({error}).",
                                    "fix the row (a field over 131,072 characters is far beyond any model's "
                                    "context: shorten it; an unclosed quote swallows the rest of the file).") from None


def _fields(record: dict, path: Path, number: int) -> tuple[str, object, str, int]:
    missing = [key for key in ("text", "label") if record.get(key) in (None, "")]
    if missing:
        raise AbftLensError(f"{path}, line {number}: missing field(s) {', '.join(missing)}.",
                            "every row needs a non-empty 'text' and 'label'.")
    nested = [key for key in ("text", "label", "split") if isinstance(record.get(key), (dict, list, bool))]
    if nested:
        raise AbftLensError(f"{path}, line {number}: field {nested[0]!r} is a {type(record[nested[0]]).__name__}, "
                            "not text.", f"write '{nested[0]}' as a string (labels may also be an index).")
    return str(record["text"]), record["label"], str(record.get("split") or "").strip().lower(), number


def _label_index(label: object, words: list[str], path: Path, number: int) -> int:
    text = str(label).strip()
    if text in words:
        return words.index(text)
    if text.isdigit() and int(text) < len(words):
        return int(text)
    raise AbftLensError(f"{path}, line {number}: label {label!r} is not one of {words}.",
                        "fix the row or pass the full list of label words.")
