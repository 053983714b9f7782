"""A study's settings as one self-checking config: :class:`StudyConfig` (config layer of the study feature).

``abft-lens study`` parses its flags into a :class:`StudyConfig` and calls :func:`abft_lens.studies.study.run_study`;
Python does the same, with the same checks and the same ``study.json``::

    from abft_lens.studies.study_config import StudyConfig

    config = StudyConfig(out="studies/one", models="tiny", datasets="sst2", methods="vanilla,ABFT",
                         train_samples=8, pseudo_batch_size=4, n_test=8)
    config.settings()["n_test"], [m.name for m in config.plan().methods]    # (8, ['vanilla', 'ABFT'])

The training options are :func:`abft_lens.training.options.train_config_from_options`'s names, which are also
the ``abft-lens train`` flags with ``_`` for ``-`` (``no_fore_test`` is ``--no-fore-test``), each None where
not given; :meth:`StudyConfig.settings` is the mapping ``study.json`` keeps as ``plan.settings`` (the format of
every study written so far, so they all resume). A variant ``NAME=ABFT:--lr 1e-3 --no-restricted-gradient``
adds training options on top, written as those flags (``--no-<switch>`` turns a switch off); options that define
the shared baselines (``k``, ``n_test``, ``dtype``, ``preset``) are set for the whole study only. Every value is
checked when the config is made: the grid parses, every trained method's :class:`TrainRecipe` builds.
"""

from __future__ import annotations

import argparse
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Mapping, Sequence

from abft_lens.arguments import check_device, resolve_device
from abft_lens.backends.cpu import auto_dtype
from abft_lens.errors import AbftLensError
from abft_lens.studies.generation_report import MauveTest
from abft_lens.studies.study_plan import (MethodSpec, StudyPlan, TrainRecipe, parse_datasets, parse_methods,
                                          parse_models, parse_seeds, read_spec)
from abft_lens.training.options import resolve_preset, train_config_from_options

__all__ = ["StudyConfig", "DEFAULT_METHODS", "spec_values", "GRID"]

DEFAULT_METHODS = ("vanilla", "cc", "prior", "ABFT", "E2E")
GRID = ("out", "models", "datasets", "methods", "seeds", "variants", "extend", "device")  # not settings
FIXED = ("k", "n_test", "dtype", "preset")  # a variant may not change them: they define the shared baselines
DTYPE_NAMES = ("float32", "bfloat16", "float64", "auto")
POSITIVE = ("k", "n_test", "batch_size", "checkpoint_every", "train_samples", "epochs", "pseudo_batch_size",
            "micro_batch_size", "validation_prompts", "robustness_queries", "generalization_n_test",
            "MAUVE_max_new_tokens")  # the other integers (lora_r, validation_examples, ...) may be 0
TEST_TYPES = ("Normal", "TempSensitivity", "DemoSensitivity")
OPTION_FIX = "write a study's training options as flags (e.g. --lr 1e-3); turn a switch off with --no-<switch>."


@dataclass(frozen=True)
class StudyConfig:
    """Models × datasets × methods × seeds and the options every cell shares (see the module docstring).

    ``models``, ``datasets``, ``methods``, ``seeds``: comma strings or lists (``methods`` None: vanilla, cc,
    prior, ABFT, E2E and the ``variants``' names); ``variants``: ``{NAME: "ABFT:--lr 1e-3"}``; ``extend``: add
    this grid to the study already in ``out``; ``device``: auto, cpu or cuda (not part of the study's identity).
    """

    out: str | Path
    models: str | Sequence[str] = "smollm2-135m"
    datasets: str | Sequence[str | int] = "paper"
    methods: str | Sequence[str] | None = None
    seeds: str | int | Sequence[int] = (0,)
    variants: Mapping[str, str] = field(default_factory=dict)
    extend: bool = False
    device: str = "auto"
    preset: str | None = None
    k: int = 4
    n_test: int | None = None
    dtype: str = "float32"
    batch_size: int = 8
    train_samples: int | None = None
    epochs: int | None = None
    pseudo_batch_size: int | None = None
    micro_batch_size: int | None = None
    lr: float | None = None
    award: float | None = None
    penalty: float | None = None
    penalty_mode: str | None = None
    p_gain: float | None = None
    pid_kp: float | None = None
    pid_ki: float | None = None
    pid_kd: float | None = None
    threshold: float | None = None
    restricted_gradient: bool | None = None
    lora_r: int | None = None
    train_bias: bool = False
    validation_examples: int | None = None
    validation_prompts: int | None = None
    validate_every: int | None = None
    keep_best: bool | None = None
    select_metric: str | None = None
    select_max_p: float | None = None
    balance_query_labels: bool | None = None
    no_fore_test: bool = False
    no_post_test: bool = False
    test_type: str = "Normal"
    robustness_queries: int | None = None
    dont_save_model: bool = False
    checkpoint_every: int = 1
    generalization_test: bool = False
    generalization_n_test: int | None = None
    MAUVE_test: bool = False
    MAUVE_prefix: str | Path | None = None
    MAUVE_max_new_tokens: int | None = None

    def __post_init__(self) -> None:
        _check_values(self)
        options, name, filled = resolve_preset({n: getattr(self, n) for n in option_names()}, self.preset)
        options["preset"], reason = name, None
        if options["dtype"] == "auto":  # the settings record the dtype it picked
            options["dtype"], reason = auto_dtype(resolve_device(self.device))
        self._set("dtype_reason", reason)
        self._set("options", options)
        self._set("filled", tuple(filled))
        self._set("recipes", {})
        plan = self._set("plan", self._parse_plan())
        for method in plan.methods:  # every variant parses and every trained method's options check, now
            if method.trained:
                self.recipe_for(method)

    def _set(self, name: str, value) -> object:
        object.__setattr__(self, "_" + name, value)
        return value

    def settings(self) -> dict:
        """The options that define the study (``study.json``'s ``plan.settings``): the preset applied, ``dtype``
        auto resolved; JSON-able."""
        return {key: str(value) if isinstance(value, Path) else value for key, value in sorted(self._options.items())}

    def plan(self) -> StudyPlan:
        """The grid (parsed and checked when the config was made) and :meth:`settings`."""
        return StudyPlan.from_dict(self._plan.to_dict())

    def _parse_plan(self) -> StudyPlan:
        variants = dict(self.variants)
        methods = list(DEFAULT_METHODS) + list(variants) if self.methods is None else self.methods
        methods = methods.split(",") if isinstance(methods, str) else list(methods) \
            if isinstance(methods, (list, tuple)) else [methods]
        methods = [f"{m.strip()}={variants[m.strip()]}" if isinstance(m, str) and m.strip() in variants else m
                   for m in methods]
        return StudyPlan(models=parse_models(self.models), datasets=parse_datasets(self.datasets),
                         methods=parse_methods(methods), seeds=parse_seeds(self.seeds), settings=self.settings())

    def recipe_for(self, method: MethodSpec) -> TrainRecipe:
        """The :class:`TrainRecipe` of a trained method: the study's options with the variant's on top (built
        once per method)."""
        if method not in self._recipes:
            self._recipes[method] = self._recipe(method)
        return self._recipes[method]

    def _recipe(self, method: MethodSpec) -> TrainRecipe:
        options = variant_options(self._options, method.name, method.args) if method.args else dict(self._options)
        options.update(method=method.kind, seed=0)
        config = train_config_from_options(options, filled=self._filled)
        if options["MAUVE_test"]:
            MauveTest(options["MAUVE_prefix"], max_new_tokens=options["MAUVE_max_new_tokens"] or 32)  # reads the file
        return TrainRecipe(config=config, n_test=options["n_test"], fore_test=not options["no_fore_test"],
                           post_test=not options["no_post_test"], save_model=not options["dont_save_model"],
                           checkpoint_every=options["checkpoint_every"], batch_size=options["batch_size"],
                           test_type=options["test_type"], generalization=options["generalization_test"],
                           generalization_n_test=options["generalization_n_test"],
                           robustness_queries=options["robustness_queries"],
                           mauve_prefix=str(options["MAUVE_prefix"]) if options["MAUVE_test"] else None,
                           mauve_max_new_tokens=options["MAUVE_max_new_tokens"], dtype_reason=self._dtype_reason)

    @property
    def torch_device(self) -> str:
        return resolve_device(self.device)


def option_names() -> list[str]:
    """The names of a study's settings: every field but the grid's."""
    return [f.name for f in fields(StudyConfig) if f.name not in GRID]


def _kinds(name: str) -> tuple[type, ...]:
    hint = typing.get_type_hints(StudyConfig)[name]
    return typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)


def _check_values(config: StudyConfig) -> None:
    """Each setting has its type and range (combinations are the TrainConfig's and the recipe's checks)."""
    for name in option_names():
        value, kinds = getattr(config, name), _kinds(name)
        if value is None and type(None) in kinds:
            continue
        if bool in kinds:
            ok = isinstance(value, bool)
        elif int in kinds and float not in kinds:
            ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 1 or name not in POSITIVE)
        elif float in kinds:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            ok = isinstance(value, str if Path not in kinds else (str, Path))
        if not ok:
            wanted = "True or False" if bool in kinds else "a number" if float in kinds else "a string" \
                if int not in kinds else "a positive integer" if name in POSITIVE else "an integer"
            raise AbftLensError(f"{name}={value!r} must be {wanted}" + (" or None." if type(None) in kinds else "."),
                                f"pass {name} as {wanted}.", names=(name,))
    for name, value, allowed in (("dtype", config.dtype, DTYPE_NAMES), ("test_type", config.test_type, TEST_TYPES)):
        if value not in allowed:
            raise AbftLensError(f"{name}={value!r} is unknown.", f"use {name} {' or '.join(allowed)}.", names=(name,))
    if config.device != "auto":
        check_device(config.device)
    if not isinstance(config.out, (str, Path)) or not str(config.out).strip():
        raise AbftLensError(f"out={config.out!r} is not a folder.", "pass out='studies/NAME'.", names=("out",))
    if not isinstance(config.variants, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                           for k, v in config.variants.items()):
        raise AbftLensError(f"variants={config.variants!r} must map names to 'ABFT:OPTIONS' strings.",
                            "pass e.g. variants={'fast': 'ABFT:--lr 1e-3'}.", names=("variants",))
    if not isinstance(config.extend, bool):
        raise AbftLensError(f"extend={config.extend!r} must be True or False.", "pass a bool extend.",
                            names=("extend",))


class _OptionParser(argparse.ArgumentParser):
    """The options of a variant or of a spec file, written as flags: errors raise AbftLensError."""

    def error(self, message: str):
        raise AbftLensError(f"{self.prog}: {message}.", OPTION_FIX)


def option_parser(prog: str) -> argparse.ArgumentParser:
    """``--<name>`` (``_`` written ``-``) for every setting, ``--no-<switch>`` for every switch; an option not
    given is absent from the result."""
    parser = _OptionParser(prog=prog, add_help=False, argument_default=argparse.SUPPRESS)
    for name in option_names():
        flag, kinds = "--" + name.replace("_", "-"), _kinds(name)
        if bool in kinds:
            parser.add_argument(flag, dest=name, action="store_const", const=True)
            parser.add_argument("--no-" + flag[2:], dest=name, action="store_const", const=False)
        else:
            kind = int if int in kinds and float not in kinds else float if float in kinds else str
            parser.add_argument(flag, dest=name, type=kind)
    return parser


def variant_options(options: Mapping, name: str, args: Sequence[str]) -> dict:
    """The study's resolved ``options`` with a variant's ``args`` on top; options fixed for the whole study are
    refused; a variant that contradicts the study's preset (an ablation) names no preset."""
    given = vars(option_parser(f"variant {name}").parse_args(list(args)))
    for key in FIXED:
        if key in given and given[key] != options.get(key):
            raise AbftLensError(f"variant {name} sets {key}, which is set for the whole study.",
                                f"set {key} for the study itself (or drop it from the variant).", names=(key,))
    merged = {**options, **given}
    if merged["preset"] is not None:
        _, merged["preset"], _ = resolve_preset(merged, merged["preset"], strict=False)
    return merged


def spec_values(path: str | Path) -> dict:
    """A spec file (TOML or JSON: ``models``, ``datasets``, ``methods``, ``seeds``, ``variants``, ``options``
    written as flags without ``--``) as :class:`StudyConfig` values."""
    spec = read_spec(path)
    values = {key: spec[key] for key in ("models", "datasets", "methods", "seeds", "variants") if key in spec}
    tokens: list[str] = []
    for key, value in (spec.get("options") or {}).items():
        flag = "--" + str(key).replace("_", "-")
        if isinstance(value, bool):
            tokens.append(flag if value else "--no-" + flag[2:])
        else:
            tokens += [flag] + [str(v) for v in (value if isinstance(value, list) else [value])]
    values.update(vars(option_parser("spec options").parse_args(tokens)))
    return values
