"""Typed run configuration: dataclasses, YAML, ``key=value`` overrides, strict validation.

A config is a tree of dataclasses. :func:`load_config` reads a YAML file, applies ``--set``
overrides (``refine.threshold=0.8``, ``refine.first_stages=[2,3,4]``) and validates the result.
An unknown key or a value of the wrong type is a :class:`UserError`, never a silent default.
The resolved config is written beside every result (:func:`config_to_dict` / ``config.yaml``).

Each field's comment says what it is, its unit and where the default comes from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import UserError, short_repr
from .io import read_text_file


@dataclass
class DataConfig:
    spec: str = "digits"  # data spec (see `labelrefine.data.sources`): digits, imagefolder:DIR, csv:FILE, ...
    noise: str = "idn"  # none | symmetric | pairflip | idn | column:NAME (a given label column, e.g. CIFAR-10N worse)
    noise_rate: float = 0.2  # requested noise rate in [0, 1); ignored by none and column:NAME
    noise_seed: int = 0  # seed of the noise generator: the same seed gives the same noisy labels, bit for bit
    pixel_scale: float = 255.0  # IDN: value of a white pixel in Xia et al.'s projection (255 = raw, the reference)
    val_fraction: float = 0.1  # fraction of the *noisy* training set held out for model selection (stratified)
    train_subset: int = 0  # use a stratified random subset of this many training samples (0 = all); CPU profiles
    subset_seed: int = 0  # the seed that draws that subset (part of the data set's definition, not of the run)
    test_subset: int = 0  # evaluate on a stratified subset of this many test samples (0 = all)
    cache_dir: str = ""  # where decoded images and SSL encoders are cached ("" = $LABELREFINE_CACHE or ~/.cache)


@dataclass
class ModelConfig:
    backbone: str = "resnet18_cifar"  # preact_resnet18 (papers), resnet18_cifar, resnet34_cifar, airbench, tiny
    width: int = 64  # base width of resnet*_cifar (16 = the 0.7 M-param CPU profile) and airbench (64 = airbench94)
    expand: int = 0  # airbench only: groups 2-3 have expand x width channels (0 = 4, airbench94; 2 = airbench93)


@dataclass
class OptimConfig:
    optimizer: Literal["sgd", "adam"] = "sgd"  # supervised phases
    lr: float = 0.02  # peak learning rate (DivideMix: 0.02 with batch 64..128)
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4  # L2 on all weights (DivideMix, CIFAR literature)
    batch_size: int = 128  # samples per step
    # lr schedule over all supervised epochs of a run; linear: from the warmup's end down to final_lr
    schedule: Literal["cosine", "constant", "linear"] = "cosine"
    warmup_lr_epochs: float = 0.0  # linear lr ramp at the start, in epochs
    warmup_start: float = 0.0  # lr factor at the start of the ramp (airbench: 0.2)
    final_lr: float = 0.0  # schedule=linear: lr factor at the last step (airbench: 0.07)
    norm_bias_lr_scale: float = 1.0  # lr x this (weight decay / this) for normalisation biases (airbench: 64)
    lookahead: bool = False  # airbench's Lookahead: every 5 steps, slow <- lerp(slow, fast, 1 - 0.95^5 t^3)
    label_smoothing: float = 0.0  # plain-CE label smoothing (0 = off)
    eval_batch_size: int = 1024  # samples per forward pass when scoring the whole set


@dataclass
class SSLConfig:
    epochs: int = 30  # SimCLR pretraining epochs (papers: 30)
    temperature: float = 0.5  # NT-Xent temperature (SimCLR CIFAR setting; lightly's benchmark)
    batch_size: int = 256  # images per step; each gives two views
    lr: float = 0.06  # SGD lr at batch 256, scaled linearly with batch size (lightly's CIFAR benchmark)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    proj_hidden: int = 512  # projection head hidden width (lightly: 512 -> 512 -> 128)
    proj_dim: int = 128  # projection output dimension
    crop_scale_min: float = 0.2  # RandomResizedCrop lower scale bound (CIFAR SimCLR uses 0.08-0.2)
    cache: bool = True  # cache the pretrained encoder, keyed by data content, backbone, this section and seed
    # Seed of the pretraining alone (the encoder's initial weights, its batches and augmentations);
    # -1 = the run's seed. A fixed value makes one pretraining (one cache entry) serve every seed.
    seed: int = -1


@dataclass
class RunConfig:
    method: str = "ours"  # registry name: see `labelrefine methods`
    seed: int = 0  # seed of training (init, batches, augmentation); the noise has its own seed
    epochs: int = 30  # total epochs of the single-stage baselines (ce, coteaching, jocor, mentornet, dividemix)
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"  # auto: bf16 on CUDA when supported, off on CPU
    channels_last: bool = True  # NHWC memory format (faster convolutions on CPU and tensor cores)
    compile: bool = False  # torch.compile the model(s)
    threads: int = 0  # torch CPU threads (0 = leave torch's default)
    checkpoint_every: int = 1  # epochs between checkpoints (0 = none)
    # Evaluate (noisy val + test) every this many supervised epochs, and always after the last one.
    # Model selection by noisy val sees only those epochs.
    eval_every: int = 1
    # Test-time augmentation of *test* accuracy only (never of training-sample scores): none,
    # flip (mean of the image and its mirror) or crops (airbench's 6 views: +-1 px translations x flip).
    tta: Literal["none", "flip", "crops"] = "none"
    augment: Literal["weak", "none"] = "weak"  # supervised augmentation: random crop + flip
    flip: bool = True  # horizontal flips in augmentation (off for digits, text, some X-rays)
    crop_pad: int = -1  # weak augmentation's random-crop padding in px (-1 = height / 8: 4 px on CIFAR; airbench: 2)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)
    # The methods' own sections (refine, finetune, dividemix, jocor, ...), declared by each method
    # class (``Method.sections``) and read as attributes: ``cfg.refine.threshold``. Missing ones
    # get their defaults; see :func:`method_sections`.
    sections: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        known = method_sections()
        unknown = sorted(set(self.sections) - set(known))
        if unknown:  # a bug, not user input: _from_dict refuses unknown keys with a UserError
            raise TypeError(f"RunConfig: unknown method section(s) {unknown}")
        self.sections = {k: self.sections.get(k) or cls() for k, cls in known.items()}

    def __getattr__(self, name: str) -> Any:
        sections = self.__dict__.get("sections")  # (absent while unpickling or before __init__)
        if sections is not None and name in sections:
            return sections[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


CORE_SECTIONS = ("data", "model", "optim", "ssl")  # the sections every run has (ssl: the shared SimCLR phase)


def method_sections() -> dict[str, type]:
    """Section name -> dataclass of every method-owned config section, in registry order.

    Each method class declares the sections it owns (``Method.sections``); this imports the
    method registry (and so torch) the first time it is called. A section declared by two
    methods, or named like a core field, is a bug and raises.
    """
    global _METHOD_SECTIONS
    if _METHOD_SECTIONS is None:
        from .methods import list_methods

        out: dict[str, type] = {}
        core = {f.name for f in dataclasses.fields(RunConfig)}
        for method in list_methods():
            for name, cls in method.sections.items():
                if name in out or name in core:
                    raise ValueError(f"config section {name!r} of method {method.name!r} is declared twice")
                out[name] = cls
        _METHOD_SECTIONS = out
    return _METHOD_SECTIONS


_METHOD_SECTIONS: dict[str, type] | None = None


def config_tree() -> dict[str, type]:
    """Every section of a run config (core, then the methods'): name -> dataclass."""
    hints = typing.get_type_hints(RunConfig)
    return {**{n: hints[n] for n in CORE_SECTIONS}, **method_sections()}


def top_level_fields() -> dict[str, Any]:
    """The non-section fields of RunConfig (method, seed, epochs, ...): name -> annotation."""
    hints = typing.get_type_hints(RunConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(RunConfig)
            if f.name not in CORE_SECTIONS and f.name != "sections"}


# ---------------------------------------------------------------------------------------------
# The allowed range of every numeric field


INT_MAX = 2**31 - 1  # the largest count any int field takes (torch sizes and steps are C ints)


@dataclass(frozen=True)
class Range:
    """The interval a numeric config field must lie in; ``inf`` / ``nan`` never do (an open end
    at infinity, shown ``inf)``, excludes infinity itself).

    ``also`` lists special values allowed outside the interval (``-1`` = "from the noise rate").
    For a ``list[int]`` field the range applies to every item.
    """

    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False
    also: tuple[float, ...] = ()
    meaning: str = ""  # what the special values in ``also`` mean, for the message

    def contains(self, v: float) -> bool:
        if v in self.also:
            return True
        if isinstance(v, float) and not math.isfinite(v):  # (math.isfinite overflows on huge ints)
            return False
        return (v > self.lo if self.lo_open else v >= self.lo) and (v < self.hi if self.hi_open else v <= self.hi)

    def describe(self) -> str:
        def end(x: float) -> str:
            if isinstance(x, float):
                return "inf" if x == math.inf else "-inf" if x == -math.inf else f"{x:g}"
            return str(x)

        return (f"{'(' if self.lo_open or self.lo == -math.inf else '['}{end(self.lo)}, {end(self.hi)}"
                f"{')' if self.hi_open or self.hi == math.inf else ']'}")

    def complaint(self, v: Any) -> str:
        """Why ``v`` is refused, naming the allowed range."""
        if self.also:
            special = " or ".join(f"{a:g}" for a in self.also)
            return f"{short_repr(v)} is neither {special} ({self.meaning}) nor in {self.describe()}"
        return f"{short_repr(v)} is outside {self.describe()}"


def at_least(lo: int | float) -> Range:
    """``[lo, INT_MAX]`` for an int field, ``[lo, inf)`` for a float one."""
    return Range(lo, INT_MAX) if isinstance(lo, int) else Range(lo)


def above(lo: float) -> Range:
    return Range(lo, lo_open=True)


def unit(*, lo_open: bool = False, hi_open: bool = False) -> Range:
    return Range(0.0, 1.0, lo_open, hi_open)


# Both seeds: np.random.seed takes [0, 2**32 - 1] and a run also seeds ``seed + 1`` (the fine-tune phase).
SEEDS = Range(0, 2**32 - 2)
# A forget rate: in [0, 1), or -1 = the requested noise rate (Co-teaching, JoCoR).
FORGET_RATE = Range(0.0, 1.0, hi_open=True, also=(-1.0,), meaning="the noise rate")

# Dotted key -> allowed range, for every int and float field of the core of RunConfig (and
# list[int] items); a method's section declares its own (a ``RANGES`` ClassVar on its dataclass,
# keyed by field name). tests/test_config.py fails when a numeric field has no range. The bounds
# follow what the code using the field accepts or means (see each field's comment).
RANGES: dict[str, Range] = {
    "seed": SEEDS,
    "epochs": at_least(0),
    "threads": Range(0, 1024),  # 0 = torch's default; torch crashes on absurd counts
    "checkpoint_every": at_least(0),
    "eval_every": at_least(1),
    "crop_pad": Range(-1, 64),
    "data.noise_rate": unit(hi_open=True),
    "data.noise_seed": SEEDS,  # seeds numpy.random.default_rng (and noise_seed + 1): the same rule as seed
    "data.pixel_scale": above(0.0),
    "data.val_fraction": Range(0.0, 0.5, hi_open=True),
    "data.train_subset": at_least(0),
    "data.subset_seed": SEEDS,
    "data.test_subset": at_least(0),
    "model.width": at_least(1),
    "model.expand": Range(0, 64),
    "optim.lr": above(0.0),
    "optim.momentum": unit(hi_open=True),
    "optim.weight_decay": at_least(0.0),
    "optim.batch_size": at_least(1),
    "optim.warmup_lr_epochs": at_least(0.0),
    "optim.warmup_start": unit(),
    "optim.final_lr": unit(),
    "optim.norm_bias_lr_scale": above(0.0),
    "optim.label_smoothing": unit(hi_open=True),
    "optim.eval_batch_size": at_least(1),
    "ssl.epochs": at_least(0),
    "ssl.temperature": above(0.0),
    "ssl.batch_size": at_least(2),  # NT-Xent needs negatives
    "ssl.lr": above(0.0),
    "ssl.momentum": unit(hi_open=True),
    "ssl.weight_decay": at_least(0.0),
    "ssl.proj_hidden": at_least(1),
    "ssl.proj_dim": at_least(1),
    "ssl.crop_scale_min": unit(lo_open=True),
    "ssl.seed": Range(0, 2**32 - 2, also=(-1,), meaning="the run's seed"),
}


def all_ranges() -> dict[str, Range]:
    """Dotted key -> range of every numeric field: :data:`RANGES` and each method section's ``RANGES``."""
    out = dict(RANGES)
    for name, cls in method_sections().items():
        out.update({f"{name}.{k}": r for k, r in getattr(cls, "RANGES", {}).items()})
    return out


def _is_numeric(tp: Any) -> bool:
    return tp in (int, float) or (typing.get_origin(tp) is list and typing.get_args(tp)[0] in (int, float))


def numeric_fields() -> dict[str, Any]:
    """Dotted key -> annotation of every int, float and list-of-int field of a run config."""
    out = {k: tp for k, tp in top_level_fields().items() if _is_numeric(tp)}
    for name, cls in config_tree().items():
        hints = typing.get_type_hints(cls)
        out.update({f"{name}.{f.name}": hints[f.name] for f in dataclasses.fields(cls) if _is_numeric(hints[f.name])})
    return out


def check_ranges(cfg: RunConfig) -> None:
    """Every numeric field within its range (:func:`all_ranges`); else a one-line UserError
    naming the key and its allowed range."""
    ranges = all_ranges()
    for key in numeric_fields():
        value: Any = cfg
        for part in key.split("."):
            value = getattr(value, part)
        rng = ranges[key]
        for i, v in enumerate(value) if isinstance(value, list) else ((None, value),):
            if not rng.contains(v):
                item = key if i is None else f"{key}[{i}]"
                raise UserError(f"config key {item!r}: {rng.complaint(v)}")


# ---------------------------------------------------------------------------------------------
# Conversion and validation


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list,):
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to floats)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise UserError(f"config key {key!r}: {short_repr(value)} is not one of {_type_name(tp)}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except UserError:
                continue
        raise UserError(f"config key {key!r}: {short_repr(value)} is not {_type_name(tp)}")
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"config key {key!r}: expected a list, got {short_repr(value)}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"config key {key!r}: expected true or false, got {short_repr(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"config key {key!r}: expected an integer, got {short_repr(value)}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads 1e-3 (no dot) as a string; accept what Python reads as a number.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"config key {key!r}: expected a number, got {short_repr(value)}")
        try:
            return float(value)
        except OverflowError:
            raise UserError(f"config key {key!r}: {short_repr(value)} is too large for a number") from None
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"config key {key!r}: expected a string, got {short_repr(value)}")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")  # a bug, not user input


def _from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise UserError(f"config section {prefix.rstrip('.') or '<root>'!r} must be a mapping, got {short_repr(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: hints[f.name] for f in dataclasses.fields(cls)}
    if cls is RunConfig:  # the method sections are keys of the root too
        del fields["sections"]
        fields.update(method_sections())
    unknown = sorted(set(data) - set(fields), key=str)  # YAML keys may be ints, bools or null too
    if unknown:
        raise UserError(f"unknown config key {short_repr(prefix + str(unknown[0]))}; known in this section: "
                        f"{', '.join(sorted(fields))}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        tp = fields[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _from_dict(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, prefix + name)
    if cls is RunConfig:
        kwargs["sections"] = {k: kwargs.pop(k) for k in method_sections() if k in kwargs}
    return cls(**kwargs)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain nested dicts; the method sections are keys of the root."""
    out = dataclasses.asdict(cfg)
    out.update(out.pop("sections"))
    return out


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    cfg = _from_dict(RunConfig, data)
    validate(cfg)
    return cfg


MAX_YAML_DEPTH = 32  # nesting levels a config or suite may use (they need about 5)
_NO_ANCHORS = ": YAML anchors and aliases are not allowed"


class YAMLRefused(yaml.YAMLError):
    """Valid YAML that configs and suites refuse: an anchor or alias (a "billion laughs" bomb
    expands a few hundred bytes to gigabytes), a repeated key (YAML would keep the last one
    silently), a merge key, or nesting deeper than :data:`MAX_YAML_DEPTH`."""

    def __init__(self, what: str, mark: Any, note: str = ""):
        super().__init__(what)
        self.what, self.note = what, note
        self.line = mark.line + 1 if mark is not None else None

    def __str__(self) -> str:
        return (self.what if self.line is None else f"{self.what} at line {self.line}") + self.note


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 booleans and no anchors, aliases or duplicate keys.

    YAML 1.1 (PyYAML's default) also reads ``on``/``off``/``yes``/``no`` as booleans, which turns
    ``amp: off`` into ``False``; here they stay strings. Anchors/aliases, merge keys, repeated
    keys (at any level) and deep nesting raise :class:`YAMLRefused` while the document is
    composed, before any value is built, so a YAML bomb fails at once.
    """

    def __init__(self, stream: Any):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise YAMLRefused(f"alias *{event.anchor[:40]}", event.start_mark, _NO_ANCHORS)
        if getattr(event, "anchor", None) is not None:
            raise YAMLRefused(f"anchor &{event.anchor[:40]}", event.start_mark, _NO_ANCHORS)
        if self._depth >= MAX_YAML_DEPTH:
            raise YAMLRefused(f"nesting deeper than {MAX_YAML_DEPTH} levels", event.start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    raise YAMLRefused("merge key '<<'", key_node.start_mark, ": merge keys are not allowed")
                key = self.construct_object(key_node, deep=True)
                try:
                    seen = key in first
                except TypeError:  # an unhashable key: SafeConstructor reports it below
                    continue
                line = key_node.start_mark.line + 1
                if seen:
                    raise YAMLRefused(f"duplicate key {short_repr(key)}", key_node.start_mark,
                                      f" (first at line {first[key]})")
                first[key] = line
        return super().construct_mapping(node, deep=deep)


_BOOL = "tag:yaml.org,2002:bool"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def yaml_load(text: str) -> Any:
    """Parse YAML text (safe, YAML 1.2 booleans); anchors, aliases, merge keys, repeated keys
    and deep nesting raise :class:`YAMLRefused` (a ``yaml.YAMLError``)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


def read_yaml_file(path: str | Path, what: str) -> Any:
    """Read and parse the YAML file ``path``; any failure is a one-line UserError naming
    ``what`` (e.g. "config file") and the path, with the line of a syntax error."""
    p = Path(path)
    name = f"{what} {str(p)!r}"
    if not p.is_file():
        raise UserError(f"{name} does not exist")
    text = read_text_file(p, name)
    try:
        return yaml_load(text)
    except YAMLRefused as e:
        raise UserError(f"{name}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise UserError(f"{name} is not valid YAML{f' at line {mark.line + 1}' if mark is not None else ''}") from None
    except ValueError as e:  # a scalar PyYAML cannot construct, e.g. the date 2020-13-01
        raise UserError(f"{name} is not valid YAML ({str(e)[:120]})") from None


def _parse_value(text: str, item: str) -> Any:
    """Parse the right-hand side of ``key=value`` as YAML (so 0.5, true, [2,3,4] work); text
    that is not YAML stays a string, refused YAML (an alias, a repeated key) is an error."""
    try:
        return yaml_load(text) if text.strip() else ""
    except YAMLRefused as e:
        raise UserError(f"--set {short_repr(item)}: {e}") from None
    except (yaml.YAMLError, ValueError):  # PyYAML raises ValueError for e.g. 2020-13-01 or !!int x
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings to a nested dict (in place) and return it."""
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {short_repr(item)}: expected KEY=VALUE")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {short_repr(item)}: {short_repr(part)} is not a section")
        value = text if parts[-1] == "spec" else _parse_value(text, item)
        if isinstance(value, dict):
            value = text  # data specs contain ':' and ',' and stay strings
        node[parts[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (or start from the defaults), apply ``key=value`` overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        loaded = read_yaml_file(p, "config file")
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise UserError(f"config file {str(p)!r} must hold a mapping of keys, got {type(loaded).__name__}")
        data = loaded
    apply_overrides(data, list(overrides or []))
    return config_from_dict(data)


def validate(cfg: RunConfig) -> None:
    """Every numeric field in its range (:func:`all_ranges`), then what ranges cannot express:
    each method section's own ``check()`` (raising a UserError that names the key)."""
    check_ranges(cfg)
    if cfg.model.expand and cfg.model.backbone != "airbench":
        raise UserError(f"config key 'model.expand': only the airbench backbone takes it, not {cfg.model.backbone!r}")
    for section in cfg.sections.values():
        check = getattr(section, "check", None)
        if check is not None:
            check()


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + str(k)] = v
    return out


def config_difference(stored: Any, cfg: RunConfig, *, ignore: tuple[str, ...] = ()) -> str | None:
    """The first dotted key where a stored config (``config.yaml`` of an earlier run, as parsed)
    differs from ``cfg``; ``None`` when they are the same run.

    A key that ``stored`` lacks counts as the same when ``cfg`` holds that key's default: an option
    added after the run was made defaults to the behaviour from before it existed (the project's
    rule for new options), so adding one does not make every finished run stale. Keys in
    ``ignore`` are not compared (for example :data:`labelrefine.detect.POST_HOC_KEYS`).
    """
    if not isinstance(stored, dict):
        return "<root>"
    old, new = _flatten(stored), _flatten(config_to_dict(cfg))
    defaults = _flatten(config_to_dict(RunConfig()))
    for key in sorted((set(old) | set(new)) - set(ignore)):
        if key not in old:
            if new[key] != defaults.get(key, object()):
                return key
        elif key not in new or old[key] != new[key]:
            return key
    return None


def config_hash(cfg: RunConfig) -> str:
    """A short stable hash of the resolved config (for caches and result rows)."""
    blob = json.dumps(config_to_dict(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
