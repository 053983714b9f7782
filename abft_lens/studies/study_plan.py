"""The plan of a study: models × datasets × methods × seeds, and what every trained cell is trained with.

- Methods: ``vanilla`` (the untrained model), ``cc`` (the untrained model with contextual calibration),
  ``prior`` (the label-prior control: cc's probabilities re-weighted by the label shares of a seed's training
  queries, no gradient; one per seed), ``ABFT``, ``E2E``, and named variants ``NAME=ABFT:--lr 1e-3 --no-restricted-gradient`` (a trained kind plus training
  options on top of the study's own; the command line turns them into a :class:`TrainRecipe`).
- Datasets: ``paper`` (StaICC 0, 1, 2, 3, 4, 6, 7, 8), StaICC names or indices, CSV/JSONL files.
- Cells (:meth:`StudyPlan.cells`), in the order they run: per model, per seed, per dataset, per method; the
  baselines (vanilla, cc) once per (model, dataset), at the first seed, before that dataset's trained cells;
  ``prior`` at every seed.
  The first seed of every dataset therefore finishes before the second seed starts.
- A spec file (``--spec FILE``, TOML or JSON) may hold ``models``, ``datasets``, ``methods``, ``seeds``,
  ``variants`` (``{NAME: "ABFT:--lr 1e-3"}``) and ``options`` (``{"train-samples": 128, "keep-best": true}``).
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Iterable, Sequence

from abft_lens.backends import hf_cache
from abft_lens.backends.hf_cache import is_hf_folder
from abft_lens.backends.loading import load_model
from abft_lens.data.tasks import PAPER_DATASETS, STAICC_DATASETS, load_task, staicc_index
from abft_lens.errors import AbftLensError
from abft_lens.reporting.study_folder import (SEEDED_BASELINE_KINDS, TRAINED_KINDS, baseline_path, dataset_name,
                                              run_path, slug)
from abft_lens.training.checks import MAX_SEED, check_run_fits_task
from abft_lens.training.presets import DEFAULT_N_TEST
from abft_lens.training.train import TrainConfig

__all__ = ["MethodSpec", "TrainRecipe", "Cell", "StudyPlan", "parse_methods", "parse_datasets", "parse_seeds",
           "parse_models", "check_model", "check_plan_fits", "dataset_name", "read_spec", "PAPER"]

PAPER = "paper"
KINDS = {"vanilla": "vanilla", "cc": "cc", "prior": "prior", "abft": "ABFT", "e2e": "E2E"}
VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
SPEC_KEYS = ("models", "datasets", "methods", "seeds", "variants", "options")


@dataclass(frozen=True)
class MethodSpec:
    """A row of the table: ``kind`` is vanilla, cc, prior, ABFT or E2E; ``args`` the training options of a
    variant."""

    name: str
    kind: str
    args: tuple[str, ...] = ()

    @property
    def trained(self) -> bool:
        return self.kind in TRAINED_KINDS

    @property
    def per_seed(self) -> bool:
        """One cell per seed (trained methods and the label-prior control), not one per dataset."""
        return self.kind in TRAINED_KINDS or self.kind in SEEDED_BASELINE_KINDS

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "args": list(self.args)}

    @classmethod
    def from_dict(cls, data: dict) -> "MethodSpec":
        return cls(data["name"], data["kind"], tuple(data.get("args", ())))


def parse_method(text: str) -> MethodSpec:
    """``vanilla`` / ``cc`` / ``prior`` / ``ABFT`` / ``E2E`` (any case), or a variant ``NAME=ABFT:OPTIONS``
    (``NAME=E2E:...``)."""
    text = text.strip()
    if "=" not in text:
        kind = KINDS.get(text.lower())
        if kind is None:
            raise AbftLensError(f"unknown method {text!r} in methods.",
                                "use vanilla, cc, prior, ABFT, E2E or a variant NAME=ABFT:--lr 1e-3 "
                                "(NAME=E2E:... for E2E).", names=("methods",))
        return MethodSpec(kind, kind)
    name, _, rest = text.partition("=")
    kind_text, _, options = rest.partition(":")
    name, kind = name.strip(), KINDS.get(kind_text.strip().lower())
    fix = ("write a variant as NAME=ABFT:OPTIONS or NAME=E2E:OPTIONS, "
           "e.g. 'fast=ABFT:--lr 1e-3 --no-restricted-gradient'.")
    if not VARIANT_NAME.fullmatch(name):
        raise AbftLensError(f"variant name {name!r} in {text!r} is not a plain name.",
                            "use letters, digits and . _ + - (it names the table row and the run folders).")
    if name.lower() in KINDS:
        raise AbftLensError(f"variant {text!r} reuses the method name {name!r}.", "give the variant its own name.")
    if kind not in TRAINED_KINDS:
        raise AbftLensError(f"variant {text!r}: {kind_text.strip()!r} is not a trained method.", fix)
    try:
        args = tuple(shlex.split(options))
    except ValueError as error:
        raise AbftLensError(f"variant {text!r}: its options do not parse ({error}).", fix) from error
    return MethodSpec(name, kind, args)


def parse_methods(items: str | Sequence[str]) -> list[MethodSpec]:
    """A comma list (or a list) of methods; names must be unique."""
    texts = items.split(",") if isinstance(items, str) else list(items)
    if not all(isinstance(text, str) for text in texts):
        raise AbftLensError(f"methods {texts!r} holds something other than method names.",
                            "pass names, e.g. methods vanilla,cc,prior,ABFT,E2E.", names=("methods",))
    methods = [parse_method(text) for text in texts if text.strip()]
    if not methods:
        raise AbftLensError("methods names no method.", "pass e.g. methods vanilla,cc,ABFT,E2E.", names=("methods",))
    names = [m.name for m in methods]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise AbftLensError(f"method {twice[0]!r} appears twice in methods.", "name every method once.",
                            names=("methods",))
    return methods


def parse_datasets(items: str | Sequence[str]) -> list[str]:
    """``paper``, StaICC names/indices and CSV/JSONL files -> StaICC names and absolute file paths, in order;
    each is loaded once here, so an unknown name or a bad file fails before any cell runs."""
    texts = items.split(",") if isinstance(items, str) else [str(item) for item in items]
    if not isinstance(items, (str, list, tuple)):
        raise AbftLensError(f"datasets {items!r} is not a list of datasets.", "pass e.g. datasets sst2,fp.",
                            names=("datasets",))
    resolved: list[str] = []
    for text in (t.strip() for t in texts if str(t).strip()):
        if text.lower() == PAPER:
            names = [STAICC_DATASETS[index][0] for index in PAPER_DATASETS]
        elif Path(text).suffix.lower() in (".csv", ".jsonl"):
            names = [str(Path(text).expanduser().resolve())]
            load_task(names[0])
        else:
            names = [STAICC_DATASETS[staicc_index(text)][0]]
        resolved += [name for name in names if name not in resolved]
    if not resolved:
        raise AbftLensError("datasets names no dataset.", "pass e.g. datasets paper or datasets sst2,fp.",
                            names=("datasets",))
    folders = [dataset_name(spec) for spec in resolved]
    if len(set(folders)) != len(folders):
        raise AbftLensError(f"two datasets share the name {sorted({f for f in folders if folders.count(f) > 1})[0]!r}.",
                            "rename one of the files (a dataset's folder is its file name without suffix).")
    return resolved


def parse_seeds(items: str | int | Sequence[int]) -> list[int]:
    texts = items.split(",") if isinstance(items, str) else list(items) if isinstance(items, (list, tuple)) \
        else [items]
    seeds: list[int] = []
    for text in texts:
        if not isinstance(text, (int, str)) or isinstance(text, bool) or (isinstance(text, str) and not text.strip()):
            raise AbftLensError(f"seed {text!r} is not an integer.", "pass seeds 0,1,2.", names=("seeds",))
        try:
            seed = int(str(text).strip())
        except ValueError:
            raise AbftLensError(f"seed {text!r} is not an integer.", "pass seeds 0,1,2.", names=("seeds",)) from None
        if not 0 <= seed < MAX_SEED:
            raise AbftLensError(f"seed {seed} is out of range.", f"pass seeds in 0..{MAX_SEED - 1}.", names=("seeds",))
        if seed not in seeds:
            seeds.append(seed)
    if not seeds:
        raise AbftLensError("seeds names no seed.", "pass e.g. seeds 0,1.", names=("seeds",))
    return seeds


def parse_models(items: str | Sequence[str]) -> list[str]:
    items = items.split(",") if isinstance(items, str) else items
    if not all(isinstance(m, str) for m in items):
        raise AbftLensError(f"models {list(items)!r} holds something other than names.",
                            "pass model names, e.g. models smollm2-135m,tiny.", names=("models",))
    models = [m.strip() for m in items if m.strip()]
    if not models:
        raise AbftLensError("models names no model.", "pass e.g. models smollm2-135m.", names=("models",))
    folders = [slug(m) for m in models]
    if len(set(folders)) != len(folders):
        raise AbftLensError("two names in models would share a folder name.", "name every model once.",
                            names=("models",))
    return list(dict.fromkeys(models))


def check_model(spec: str) -> None:
    """Raise the loader's own message for a model that cannot load here, without loading a real one: the
    wheels of the embedded models, the file or folder of a path, TransformerLens's list of official names."""
    named = {hf_cache.EMBEDDED_NAME: hf_cache.embedded_gguf_path, hf_cache.GEMMA_NAME: hf_cache.gemma_gguf_path,
             hf_cache.QWEN_NAME: hf_cache.qwen_gguf_path}
    path = Path(spec).expanduser()
    if spec in named:
        named[spec]()
    elif spec.split(":")[0] in ("tiny", "tiny-mha"):
        load_model(spec)  # milliseconds; checks the options
    elif path.suffix == ".gguf" or path.exists() or spec.startswith((".", "/", "~")):
        if not (path.is_file() and path.suffix == ".gguf") and not is_hf_folder(path):
            raise AbftLensError(f"model {spec!r} is neither a .gguf file nor a Hugging Face folder (config.json).",
                                "check the path in models.", names=("models",))
    else:
        from abft_lens.backends.tl import official_names

        names = official_names()
        try:
            names.get_official_model_name(spec)
        except ValueError:
            raise AbftLensError(f"unknown model {spec!r} in models.",
                                f"use {hf_cache.EMBEDDED_NAME}, {hf_cache.GEMMA_NAME}, {hf_cache.QWEN_NAME}, tiny, "
                                f"a .gguf file, a Hugging Face folder or one of TransformerLens's "
                                f"{len(names.OFFICIAL_MODEL_NAMES)} official names (those need the hub).",
                                names=("models",)) from None


def check_plan_fits(plan: "StudyPlan", recipes: dict[str, "TrainRecipe"]) -> None:
    """Every dataset holds what every cell asks of it (test prompts for the baselines and tests, training and
    validation examples for each trained method's config, the other datasets' test prompts for
    ``--generalization-test``), checked before the study folder exists."""
    for spec in plan.datasets:
        task = load_task(spec)
        task.check_test_prompts(plan.k, plan.n_test)
        for recipe in recipes.values():
            check_run_fits_task(recipe.config, task, recipe.n_test, tests=recipe.fore_test or recipe.post_test)
            if recipe.generalization:
                for index in PAPER_DATASETS:
                    load_task(index).check_test_prompts(plan.k, recipe.generalization_n_test or recipe.n_test)


def read_spec(path: str | Path) -> dict:
    """A TOML or JSON spec file -> a dict with some of :data:`SPEC_KEYS`."""
    path = Path(path)
    if not path.is_file():
        raise AbftLensError(f"spec file {path} does not exist.", "check --spec.")
    try:
        data = json.loads(path.read_text()) if path.suffix.lower() == ".json" else tomllib.loads(path.read_text())
    except (ValueError, tomllib.TOMLDecodeError) as error:
        raise AbftLensError(f"spec file {path} does not parse: {error}", "write it as TOML (or .json).") from error
    if not isinstance(data, dict):
        raise AbftLensError(f"spec file {path} holds a {type(data).__name__}, not a table of keys.",
                            f"write a table with some of {list(SPEC_KEYS)}.")
    unknown = sorted(set(data) - set(SPEC_KEYS))
    if unknown:
        raise AbftLensError(f"spec file {path} holds unknown keys {unknown}.", f"use only {list(SPEC_KEYS)}.")
    for key, kinds in (("models", str), ("datasets", (str, int)), ("methods", str)):
        value = data.get(key)
        if value is not None and not (isinstance(value, str) or
                                      (isinstance(value, list) and all(isinstance(v, kinds) for v in value)
                                       and not any(isinstance(v, bool) for v in value))):
            raise AbftLensError(f"spec file {path}: {key} = {value!r} is not a name or a list of names.",
                                f'write e.g. {key} = ["a", "b"].')
    variants = data.get("variants") or {}
    if not isinstance(variants, dict) or not all(isinstance(v, str) for v in variants.values()):
        raise AbftLensError(f"spec file {path}: variants must map names to 'ABFT:OPTIONS' strings.",
                            "e.g. [variants] fast = \"ABFT:--lr 1e-3\".")
    if not isinstance(data.get("options") or {}, dict):
        raise AbftLensError(f"spec file {path}: options must be a table of training options.",
                            "e.g. [options] train-samples = 128.")
    return data


# ----------------------------------------------------------------------------------------------- recipes, cells


@dataclass(frozen=True)
class TrainRecipe:
    """Everything a trained cell of one method gets, its seed aside: the :class:`TrainConfig` and the
    ``run_training`` / extra-evaluation options (the ``train`` command's, resolved for this method)."""

    config: TrainConfig
    n_test: int
    fore_test: bool = True
    post_test: bool = True
    save_model: bool = True
    checkpoint_every: int = 1
    batch_size: int = 8
    test_type: str = "Normal"
    generalization: bool = False
    generalization_n_test: int | None = None
    robustness_queries: int | None = None
    mauve_prefix: str | None = None
    mauve_max_new_tokens: int = 32
    dtype_reason: str | None = None  # why the dtype is what it is (``--dtype auto``), for the run's config.json

    def config_for(self, seed: int) -> TrainConfig:
        return replace(self.config, seed=seed)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["config"] = {key: value for key, value in self.config.to_dict().items() if key != "seed"}
        return data


@dataclass(frozen=True)
class Cell:
    """One unit of work: a baseline evaluation (``seed`` None) or a trained run."""

    model: str
    dataset: str
    method: MethodSpec
    seed: int | None

    @property
    def key(self) -> str:
        base = f"{slug(self.model)}/{dataset_name(self.dataset)}/{slug(self.method.name)}"
        return base if self.seed is None else f"{base}/seed-{self.seed}"

    def path(self, out: str | Path, *, k: int, n_test: int) -> Path:
        """The cell's file (baselines) or run folder (trained cells)."""
        if not self.method.trained:
            return baseline_path(out, self.model, dataset_name(self.dataset), self.method.kind, k=k, n_test=n_test,
                                 seed=self.seed)
        return run_path(out, self.model, dataset_name(self.dataset), self.method.name, self.seed)


@dataclass
class StudyPlan:
    """The grid and the study-wide options (``settings``: every option of the command, JSON-able; two plans
    are the same study when all five parts are equal). What a trained method is trained with (its
    :class:`TrainRecipe`) follows from ``settings`` and the variant's options."""

    models: list[str]
    datasets: list[str]
    methods: list[MethodSpec]
    seeds: list[int]
    settings: dict = field(default_factory=dict)

    @property
    def k(self) -> int:
        return int(self.settings.get("k", 4))

    @property
    def n_test(self) -> int:
        return self.settings.get("n_test", 256)

    def cells(self) -> list[Cell]:
        cells = []
        for model in self.models:
            for number, seed in enumerate(self.seeds):
                for dataset in self.datasets:
                    for method in self.methods:
                        if method.per_seed:
                            cells.append(Cell(model, dataset, method, seed))
                        elif number == 0:
                            cells.append(Cell(model, dataset, method, None))
        return cells

    def to_dict(self) -> dict:
        return {"models": list(self.models), "datasets": list(self.datasets),
                "methods": [m.to_dict() for m in self.methods], "seeds": list(self.seeds),
                "settings": json.loads(json.dumps(self.settings))}

    @classmethod
    def from_dict(cls, data: dict) -> "StudyPlan":
        return cls(list(data["models"]), list(data["datasets"]), [MethodSpec.from_dict(m) for m in data["methods"]],
                   list(data["seeds"]), dict(data.get("settings", {})))

    def differences(self, other: "StudyPlan") -> list[str]:
        """What differs from ``other``, one phrase per part (empty when the plans are the same study)."""
        found = []
        for part in ("models", "datasets", "seeds"):
            if getattr(self, part) != getattr(other, part):
                found.append(f"{part} {getattr(other, part)} -> {getattr(self, part)}")
        if self.methods != other.methods:
            found.append(f"methods {[m.name for m in other.methods]} -> {[m.name for m in self.methods]}"
                         + (" (same names, other definitions)" if [m.name for m in self.methods]
                            == [m.name for m in other.methods] else ""))
        found += settings_differences(other.settings, self.settings)
        return found

    def extended_by(self, other: "StudyPlan") -> "StudyPlan":
        """This (saved) plan with ``other``'s models, datasets, methods and seeds added (``--extend``): the
        settings must be equal, and a method name may not change its definition."""
        settings = settings_differences(self.settings, other.settings)
        if settings:
            raise AbftLensError(f"extend adds cells to a study, but the options differ: {'; '.join(settings)}.",
                                "run with the study's options (see plan.settings in study.json), or use a new out.",
                                names=("extend", "out", *differing_settings(self.settings, other.settings)))
        mine = {m.name: m for m in self.methods}
        for method in other.methods:
            if method.name in mine and mine[method.name] != method:
                raise AbftLensError(f"extend: method {method.name!r} is defined differently in this study.",
                                    "give the new variant another name.", names=("extend",))
        return StudyPlan(_union(self.models, other.models), _union(self.datasets, other.datasets),
                         _union(self.methods, other.methods), _union(self.seeds, other.seeds),
                         dict(self.settings))


# an option at its default is the same as the option not given (the command line leaves defaults to TrainConfig)
OPTION_DEFAULTS = {**{f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING},
                   "n_test": DEFAULT_N_TEST}


def settings_differences(old: dict, new: dict) -> list[str]:
    """One phrase per option whose value differs. An option that one side lacks (added to abft-lens after the
    study was planned) is equal when the other side has it off (None or False): a study planned before a new
    flag existed resumes under today's code. An option at its default value equals the option not given."""
    old_raw, new_raw = json.loads(json.dumps(old)), json.loads(json.dumps(new))
    return [f"{key} {old_raw.get(key)!r} -> {new_raw.get(key)!r}" for key in differing_settings(old_raw, new_raw)]


def differing_settings(old: dict, new: dict) -> list[str]:
    """The names of the options :func:`settings_differences` describes."""
    old, new = _normalized(json.loads(json.dumps(old))), _normalized(json.loads(json.dumps(new)))
    return [key for key in sorted(set(old) | set(new))
            if old.get(key) != new.get(key) and not (_absent_or_off(old, key) and _absent_or_off(new, key))]


def _normalized(settings: dict) -> dict:
    return {key: None if key in OPTION_DEFAULTS and value == OPTION_DEFAULTS[key] else value
            for key, value in settings.items()}


def _absent_or_off(settings: dict, key: str) -> bool:
    return key not in settings or settings[key] is None or settings[key] is False


def _union(first: Iterable, second: Iterable) -> list:
    merged = list(first)
    return merged + [item for item in second if item not in merged]
