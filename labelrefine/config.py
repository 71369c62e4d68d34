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
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import UserError
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
    test_subset: int = 0  # evaluate on a stratified subset of this many test samples (0 = all)
    cache_dir: str = ""  # where decoded images and SSL encoders are cached ("" = $LABELREFINE_CACHE or ~/.cache)


@dataclass
class ModelConfig:
    backbone: str = "resnet18_cifar"  # registry name: preact_resnet18 (papers), resnet18_cifar, resnet34_cifar, tiny
    width: int = 64  # base channel width of the resnet*_cifar backbones (16 = the 0.7 M-parameter CPU profile)


@dataclass
class OptimConfig:
    optimizer: Literal["sgd", "adam"] = "sgd"  # supervised phases
    lr: float = 0.02  # peak learning rate (DivideMix: 0.02 with batch 64..128)
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4  # L2 on all weights (DivideMix, CIFAR literature)
    batch_size: int = 128  # samples per step
    schedule: Literal["cosine", "constant"] = "cosine"  # lr schedule over all supervised epochs of a run
    warmup_lr_epochs: float = 0.0  # linear lr ramp at the start, in epochs
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


@dataclass
class RefineConfig:
    warmup_epochs: int = 5  # CE warmup on the noisy labels (papers: 5)
    iterations: int = 4  # refinement iterations (papers: 4)
    first_stages: list[int] = field(default_factory=lambda: [2, 3, 4])  # stage epochs of iteration 1 (papers)
    later_stages: list[int] = field(default_factory=lambda: [2, 5, 7])  # stage epochs of later iterations (papers)
    iteration_epochs: int = 0  # epochs per iteration; 0 = the iteration's last stage epoch (open question)
    # Per-sample stage CE below this selects the sample (papers: 1.0, against the label). Against the
    # prediction, 0.3 (max p > 0.74) keeps a weak model from relabelling (docs/refine-options.md).
    threshold: float = 0.3
    threshold_mode: Literal["fixed", "class_quantile"] = "fixed"  # class_quantile: per-class loss quantile
    quantile: float = 0.5  # class_quantile: fraction of each (current) class selected at a stage
    # Stage CE against the model's argmax (corrects labels) or the current label (only selects);
    # the default is measured in docs/refine-options.md.
    loss_target: Literal["prediction", "label"] = "prediction"
    require_agreement: bool = True  # also require the same predicted class at every stage
    label_source: Literal["last", "mean"] = "mean"  # pseudo-label: argmax at the last stage or of the stage mean
    keep_previous: bool = True  # unselected samples keep their previous pseudo-label (False: revert to given)
    stage_loss: Literal["eval", "train"] = "eval"  # eval: a clean no-augmentation pass; train: losses of the epoch
    reinit: Literal["none", "ssl", "random"] = "none"  # re-initialise the model at each iteration's start
    augment_copies: bool = True  # add pseudo-labelled samples again as strongly augmented copies (papers)
    loss: Literal["ce", "weighted_ce"] = "ce"  # training loss inside the iterations


@dataclass
class FinetuneConfig:
    epochs: int = 5  # final fine-tune epochs on the refined labels (paper 2; length not given)
    loss: Literal["weighted_ce", "ce"] = "weighted_ce"  # paper 2: softmax-weighted CE
    weight: Literal["max_prob", "target_prob"] = "max_prob"  # the detached per-sample weight of weighted CE
    lr_scale: float = 0.1  # fine-tune lr as a fraction of optim.lr


@dataclass
class CoteachingConfig:
    forget_rate: float = -1.0  # final fraction dropped per batch; -1 = the noise rate (Han et al.: tau)
    num_gradual: int = 10  # epochs over which the forget rate rises linearly to its final value


@dataclass
class JocorConfig:
    lam: float = 0.9  # co-regularisation weight lambda (Wei et al.: 0.9 CIFAR-10, 0.85 CIFAR-100)
    # JoCoR's own optimizer: the reference's Adam at lr 1e-3. With SGD at the shared optim.lr the
    # KL term (lambda 0.9) drives both nets to the same uniform output (digits: 16% test acc).
    optimizer: Literal["adam", "optim"] = "adam"  # adam = the reference; optim = the shared optim section
    lr: float = 0.001
    forget_rate: float = -1.0  # -1 = the noise rate (tau; tau/2 for pair-flip noise)
    num_gradual: int = 10


@dataclass
class MentornetConfig:
    percentile: float = 75.0  # MentorNet-PD: keep samples whose loss <= this moving percentile
    burn_in: float = 0.18  # fraction of epochs trained with plain CE first
    momentum: float = 0.9  # moving-average factor of the percentile


@dataclass
class DivideMixConfig:
    warmup_epochs: int = 10  # CE warmup of both nets (Li et al.: 10 CIFAR-10, 30 CIFAR-100)
    p_threshold: float = 0.5  # GMM clean-probability threshold
    temperature: float = 0.5  # sharpening temperature T
    alpha: float = 4.0  # mixup Beta(alpha, alpha)
    lambda_u: float = -1.0  # unlabelled-loss weight; -1 = by noise rate: 0 under 0.35, 25 under 0.7, else 150
    rampup_epochs: int = 16  # lambda_u linear ramp-up length, in epochs after the warmup (Li et al.: 16)
    gmm_max_iter: int = 10
    gmm_tol: float = 1e-2
    gmm_reg_covar: float = 5e-4
    # Initial weights of both nets. auto = the method's default: random for dividemix, ssl for
    # ours_dividemix. ssl = the SimCLR encoder (each net keeps its own random classifier);
    # refined = the ours model after refinement (ours_dividemix only).
    init: Literal["auto", "random", "ssl", "refined"] = "auto"
    # Training labels. auto = noisy for dividemix, refined for ours_dividemix (refined: ours_dividemix only).
    labels: Literal["auto", "noisy", "refined"] = "auto"


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
    augment: Literal["weak", "none"] = "weak"  # supervised augmentation: random crop + flip
    flip: bool = True  # horizontal flips in augmentation (off for digits, text, some X-rays)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    coteaching: CoteachingConfig = field(default_factory=CoteachingConfig)
    jocor: JocorConfig = field(default_factory=JocorConfig)
    mentornet: MentornetConfig = field(default_factory=MentornetConfig)
    dividemix: DivideMixConfig = field(default_factory=DivideMixConfig)


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
            raise UserError(f"config key {key!r}: {value!r} is not one of {_type_name(tp)}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except UserError:
                continue
        raise UserError(f"config key {key!r}: {value!r} is not {_type_name(tp)}")
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"config key {key!r}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"config key {key!r}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"config key {key!r}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads 1e-3 (no dot) as a string; accept what Python reads as a number.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"config key {key!r}: expected a number, got {value!r}")
        try:
            return float(value)
        except OverflowError:
            raise UserError(f"config key {key!r}: {value} is too large for a number") from None
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"config key {key!r}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")  # a bug, not user input


def _from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise UserError(f"config section {prefix.rstrip('.') or '<root>'!r} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields), key=str)  # YAML keys may be ints, bools or null too
    if unknown:
        raise UserError(f"unknown config key {prefix + str(unknown[0])!r}; known in this section: "
                        f"{', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _from_dict(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, prefix + name)
    return cls(**kwargs)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    cfg = _from_dict(RunConfig, data)
    validate(cfg)
    return cfg


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 booleans: only ``true``/``false`` are booleans.

    YAML 1.1 (PyYAML's default) also reads ``on``/``off``/``yes``/``no`` as booleans, which turns
    ``amp: off`` into ``False``; here they stay strings.
    """


_BOOL = "tag:yaml.org,2002:bool"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def yaml_load(text: str) -> Any:
    """Parse YAML text (safe, YAML 1.2 booleans)."""
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
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise UserError(f"{name} is not valid YAML{f' at line {mark.line + 1}' if mark is not None else ''}") from None
    except ValueError as e:  # a scalar PyYAML cannot construct, e.g. the date 2020-13-01
        raise UserError(f"{name} is not valid YAML ({e})") from None


def _parse_value(text: str) -> Any:
    """Parse the right-hand side of ``key=value`` as YAML (so 0.5, true, [2,3,4] work)."""
    try:
        return yaml_load(text) if text.strip() else ""
    except (yaml.YAMLError, ValueError):  # PyYAML raises ValueError for e.g. 2020-13-01 or !!int x
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings to a nested dict (in place) and return it."""
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected KEY=VALUE")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {item!r}: {part!r} is not a section")
        value = _parse_value(text)
        if parts[-1] == "spec" or isinstance(value, (dict,)):
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
    """Range checks that a type cannot express."""
    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise UserError(f"config key {key!r}: {msg}")

    d, r = cfg.data, cfg.refine
    need(0.0 <= d.noise_rate < 1.0, "data.noise_rate", f"{d.noise_rate} is outside [0, 1)")
    need(0.0 <= d.val_fraction < 0.5, "data.val_fraction", f"{d.val_fraction} is outside [0, 0.5)")
    need(d.train_subset >= 0, "data.train_subset", "must be >= 0")
    need(d.test_subset >= 0, "data.test_subset", "must be >= 0")
    need(cfg.epochs >= 0, "epochs", "must be >= 0")
    need(cfg.optim.lr > 0, "optim.lr", "must be > 0")
    need(cfg.optim.batch_size > 0, "optim.batch_size", "must be > 0")
    need(cfg.ssl.epochs >= 0, "ssl.epochs", "must be >= 0")
    need(cfg.ssl.batch_size >= 2, "ssl.batch_size", "must be >= 2 (NT-Xent needs negatives)")
    need(cfg.ssl.temperature > 0, "ssl.temperature", "must be > 0")
    need(r.warmup_epochs >= 0, "refine.warmup_epochs", "must be >= 0")
    need(r.iterations >= 0, "refine.iterations", "must be >= 0")
    for key, stages in (("refine.first_stages", r.first_stages), ("refine.later_stages", r.later_stages)):
        need(len(stages) > 0 and all(s >= 1 for s in stages), key, f"{stages} must be a non-empty list of epochs >= 1")
        need(stages == sorted(set(stages)), key, f"{stages} must be strictly increasing")
        if r.iteration_epochs:
            need(max(stages) <= r.iteration_epochs, key,
                 f"stage {max(stages)} lies beyond refine.iteration_epochs={r.iteration_epochs}")
    need(r.threshold > 0, "refine.threshold", "must be > 0")
    need(0.0 < r.quantile <= 1.0, "refine.quantile", "must be in (0, 1]")
    need(cfg.finetune.epochs >= 0, "finetune.epochs", "must be >= 0")
    need(cfg.model.width >= 1, "model.width", "must be >= 1")
    need(0.0 <= cfg.mentornet.percentile <= 100.0, "mentornet.percentile", "must be in [0, 100]")
    need(0.0 <= cfg.dividemix.p_threshold <= 1.0, "dividemix.p_threshold", "must be in [0, 1]")
    need(cfg.checkpoint_every >= 0, "checkpoint_every", "must be >= 0")


def config_hash(cfg: RunConfig) -> str:
    """A short stable hash of the resolved config (for caches and result rows)."""
    blob = json.dumps(config_to_dict(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
