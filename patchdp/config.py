"""One training configuration: a frozen dataclass, from a TOML file and command-line overrides.

A configuration names everything a run depends on — model, data, the crop distribution
and the protected patch, sampling, clipping, noise, optimiser, seed — and is validated
once, at construction: a bad value raises ValueError saying which key is wrong and what
would be right. :meth:`Config.from_toml` reads a file (``tomllib``), whose top-level
keys are the fields below (``model_options`` and ``dataset_options`` are tables);
overrides, e.g. from ``patchdp train --batch-size 32``, replace keys before validation.
``patchdp/configs/`` holds the shipped configurations; :func:`config_path` finds them
by name.

Noise: give ``noise_multiplier`` (z, the noise std in units of the clip norm), or
``target_epsilon``, from which z is calibrated for the planned number of steps by the
accounting named in ``accounting`` (``"patch"``: w = q·p*; ``"image"``: standard
DP-SGD, w = q; ``"gaussian_augmentation"``: the paper's comparator, w = q·TV with
TV = 2Φ(Δ / 2σ_aug) − 1 and Δ = sqrt(patch area · channels)·255, which needs
``augmentation_noise`` = σ_aug and takes no credit for the crops). ``target_epsilon``
is also the budget: training stops before a step would exceed it. Giving both fixes z and keeps the budget.

Seed: ``seed = None`` (the default) draws every secret — batch sampling, crop offsets,
noise — from OS entropy: the secure mode the guarantee assumes. An explicit ``seed``
makes the run reproducible and is reported as NOT secure, since anyone who knows the
seed knows the noise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import numbers
import tomllib
import types
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from patchdp import _validation
from patchdp.inclusion import CropSpec, Patch
from patchdp.mechanism import CLIPPING

__all__ = ["Config", "config_path", "parse_patch", "parse_value", "CONFIG_DIR"]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
OPTIMIZERS = ("sgd", "momentum", "adam")
SAMPLINGS = ("fixed", "poisson")
ACCOUNTINGS = ("patch", "image", "gaussian_augmentation")
NORMALIZATIONS = ("unit", "imagenet")


@dataclasses.dataclass(frozen=True)
class Config:
    """A training run. Units: pixels for sizes, steps for intervals (0 = only at the end).

    What is trained:
      model, model_options: a name of ``patchdp.models.MODELS`` and its options
        (e.g. ``{width = 8}``).
      pretrained: optional path of a parameter file merged into the initial parameters
        (``patchdp.models.load_params``; nothing is downloaded).
      input_normalization: ``"unit"`` feeds image / 255; ``"imagenet"`` standardises
        with the ImageNet mean and std, as converted torchvision weights expect.
      dataset, dataset_options: a name of ``patchdp.data.DATASET_NAMES`` and the keyword
        arguments of its loader (``image_size``, ``data_dir``, ``root``, ...). For
        ``folder``, ``class_list`` names an A2D2-style ``class_list.json``
        ("#rrggbb" → class name) that sets the class names and the label palette.
      train_split, eval_split: the splits trained on and evaluated on.
    Crops and the protected patch (one ``CropSpec`` feeds the crops and the accountant):
      crop: a crop size: ``N``, ``"HxW"`` or ``[H, W]``; or a list of sizes for random
        crop sizes (``["64x64", "128x128"]``) with ``crop_probabilities`` and
        ``output_size`` (random-resized crops).
      padding: zero padding P per side; crops_per_example: K crops whose losses are
        averaged before clipping; flip: random horizontal flips after cropping.
      patch: the protected region: ``rect:HxW``, ``disc:D``, ``blob:D``,
        ``cluster:D[:GAP]`` or a ``.npy`` boolean mask.
    DP-SGD:
      batch_size: B (fixed-size sampling, q = B/N) or the expected batch (Poisson, q = B/N).
      sampling: ``"fixed"`` or ``"poisson"``; clip_norm: C.
      noise_multiplier, target_epsilon, accounting: see the module docstring.
      delta: δ, at most 1/N (the trainer refuses more); default 0.1/N.
      epochs, steps: the planned length; ``steps`` overrides ``epochs`` (steps = ⌈epochs / q⌉).
      microbatch_size: examples per physical microbatch (must divide the padded batch).
      clipping: how per-example norms and the clipped sum are computed, all exact:
        ``"auto"`` (book-keeping, the fastest), ``"direct"``, ``"unfold"``, ``"ghost"``
        or ``"per_example"`` (``patchdp.training.private_grad``).
      resolution: privacy-loss grid spacing of the accountant (nats).
    Optimiser: optimizer (``sgd``, ``momentum``, ``adam``), learning_rate, momentum.
    Run: seed (None = secure), name, run_dir (default ``runs/<name>-<time>``),
      eval_every, eval_examples (None = the whole split), eval_batch_size,
      checkpoint_every, log_every, epsilon_every (ε costs ~0.1–0.5 s to refresh),
      tensorboard (also write the logged metrics as TensorBoard event files in
      ``<run_dir>/tensorboard``: ``tensorboard --logdir runs``).
    Gaussian augmentation (the paper's comparator):
      augmentation_noise: σ_aug in pixel units (0–255), or None. When set, every sampled
        image gets fresh N(0, σ_aug²) noise on every pixel each step, before cropping
        (``patchdp.training.gaussian_pixel_noise``); ``accounting =
        "gaussian_augmentation"`` requires it and accounts for it alone.
    """

    model: str = "unet"
    model_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    pretrained: str | None = None
    input_normalization: str = "unit"
    dataset: str = "synthetic"
    dataset_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    train_split: str = "train"
    eval_split: str = "validation"

    crop: Any = 32
    crop_probabilities: tuple[float, ...] | None = None
    output_size: Any = None
    padding: int = 0
    crops_per_example: int = 1
    flip: bool = False
    patch: str = "rect:7x7"

    batch_size: int = 64
    sampling: str = "fixed"
    clip_norm: float = 1.0
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    accounting: str = "patch"
    delta: float | None = None
    epochs: float = 10.0
    steps: int | None = None
    microbatch_size: int | None = None
    clipping: str = "auto"
    resolution: float = 1e-4

    optimizer: str = "adam"
    learning_rate: float = 1e-3
    momentum: float = 0.9

    seed: int | None = None
    name: str = "run"
    run_dir: str | None = None
    eval_every: int = 0
    eval_examples: int | None = None
    eval_batch_size: int = 16
    checkpoint_every: int = 500
    log_every: int = 10
    epsilon_every: int = 100
    tensorboard: bool = True
    augmentation_noise: float | None = None

    def __post_init__(self):
        from patchdp.data import DATASET_NAMES, dataset_options  # imported here: flax and tfds are slow
        from patchdp.models import MODELS, model_options

        set_ = lambda name, value: object.__setattr__(self, name, value)
        _choice("model", self.model, sorted(MODELS))
        set_("model_options", _options("model_options", self.model_options, model_options(self.model)))
        _optional(_text, "pretrained", self.pretrained)
        _choice("input_normalization", self.input_normalization, NORMALIZATIONS)
        _choice("dataset", self.dataset, DATASET_NAMES)
        accepted = dataset_options(self.dataset)
        if self.dataset == "folder":
            accepted["class_list"] = None  # read by patchdp.trainer.load_dataset
        set_("dataset_options", _options("dataset_options", self.dataset_options, accepted))
        _text("train_split", self.train_split)
        _text("eval_split", self.eval_split)

        set_("crop", _crop_sizes(self.crop))
        if self.crop_probabilities is not None:
            set_("crop_probabilities", tuple(_number(f"crop_probabilities[{i}]", p, 0, 1, low_open=True)
                                             for i, p in enumerate(_list("crop_probabilities",
                                                                         self.crop_probabilities))))
        if self.output_size is not None:
            set_("output_size", _validation.size("config: output_size", self.output_size))
        _integer("padding", self.padding, 0)
        _integer("crops_per_example", self.crops_per_example, 1)
        _boolean("flip", self.flip)
        with _about("crop"):  # built once now, so that a bad crop or patch fails here
            _ = self.crop_spec
        with _about("patch"):
            _ = self.patch_shape

        _integer("batch_size", self.batch_size, 1)
        _choice("sampling", self.sampling, SAMPLINGS)
        set_("clip_norm", _number("clip_norm", self.clip_norm, 0, math.inf, low_open=True))
        if self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError("config: give noise_multiplier (z, noise std / clip norm) or target_epsilon "
                             "(z is then calibrated for the planned steps), or both.")
        set_("noise_multiplier", _optional(_number, "noise_multiplier", self.noise_multiplier, 0, math.inf,
                                           low_open=True))
        set_("target_epsilon", _optional(_number, "target_epsilon", self.target_epsilon, 0, math.inf,
                                         low_open=True))
        _choice("accounting", self.accounting, ACCOUNTINGS)
        set_("delta", _optional(_number, "delta", self.delta, 0, 1, low_open=True, high_open=True))
        set_("epochs", _number("epochs", self.epochs, 0, math.inf, low_open=True))
        _optional(_integer, "steps", self.steps, 1)
        _optional(_integer, "microbatch_size", self.microbatch_size, 1)
        _choice("clipping", self.clipping, CLIPPING)
        set_("resolution", _number("resolution", self.resolution, 0, 1, low_open=True))

        _choice("optimizer", self.optimizer, OPTIMIZERS)
        set_("learning_rate", _number("learning_rate", self.learning_rate, 0, math.inf, low_open=True))
        set_("momentum", _number("momentum", self.momentum, 0, 1, high_open=True))

        if _optional(_integer, "seed", self.seed, 0) is not None and self.seed >= 2**63:
            raise ValueError(f"config: seed must be below 2**63, got {self.seed}.")
        _text("name", self.name)
        _optional(_text, "run_dir", self.run_dir)
        for key in ("eval_every", "checkpoint_every"):
            _integer(key, getattr(self, key), 0)
        _optional(_integer, "eval_examples", self.eval_examples, 1)
        for key in ("eval_batch_size", "log_every", "epsilon_every"):
            _integer(key, getattr(self, key), 1)
        _boolean("tensorboard", self.tensorboard)
        set_("augmentation_noise", _optional(_number, "augmentation_noise", self.augmentation_noise, 0, math.inf,
                                             low_open=True))
        if self.accounting == "gaussian_augmentation" and self.augmentation_noise is None:
            raise ValueError("config: accounting 'gaussian_augmentation' needs augmentation_noise (σ_aug, the "
                             "pixel noise std in units 0–255, e.g. augmentation_noise = 50).")

    # ------------------------------------------------------------------ derived objects

    @property
    def crop_spec(self) -> CropSpec:
        """The crop distribution, for the on-device crops and the accountant alike."""
        sizes = list(self.crop) if len(self.crop) > 1 else self.crop[0]
        return CropSpec(sizes, probabilities=self.crop_probabilities, padding=self.padding,
                        crops_per_example=self.crops_per_example, output_size=self.output_size)

    @property
    def patch_shape(self) -> Patch:
        """The protected region R."""
        return parse_patch(self.patch)

    @property
    def secure(self) -> bool:
        """True when the secrets come from OS entropy (no explicit seed)."""
        return self.seed is None

    # ------------------------------------------------------------------ (de)serialisation

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "Config":
        """A config from ``values`` (e.g. a parsed TOML file); unknown keys are errors."""
        fields = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in fields:
                close = difflib.get_close_matches(key, fields, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(sorted(fields))}."
                raise ValueError(f"config: unknown key {key!r}{hint}")
        return cls(**values)

    @classmethod
    def from_toml(cls, path, overrides: Mapping[str, Any] | None = None) -> "Config":
        """The config in TOML file ``path`` with ``overrides`` applied; ``name``
        defaults to the file's stem."""
        path = Path(path)
        try:
            values = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"config file {path} does not exist.") from None
        except OSError as error:
            raise ValueError(f"cannot read config file {path}: {error.strerror or error}.") from None
        except UnicodeDecodeError:
            raise ValueError(f"config file {path} is not a text (UTF-8 TOML) file.") from None
        except tomllib.TOMLDecodeError as error:
            raise ValueError(f"config file {path} is not valid TOML: {error}.") from None
        return cls.from_dict({"name": path.stem, **values, **(overrides or {})})

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable values that :meth:`from_dict` turns back into this config."""
        plain = lambda v: {k: plain(x) for k, x in v.items()} if isinstance(v, Mapping) else \
            [plain(x) for x in v] if isinstance(v, (tuple, list)) else v
        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def replace(self, **changes) -> "Config":
        """A copy with ``changes``, validated again."""
        return dataclasses.replace(self, **changes)


def config_path(name_or_path) -> Path:
    """A config file: an existing path, or the name of a shipped config
    (``"demo"`` → ``patchdp/configs/demo.toml``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = CONFIG_DIR / f"{name_or_path}.toml"
    if shipped.is_file():
        return shipped
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))
    raise ValueError(f"no config file {name_or_path!r}; give a path or one of the shipped configs: {', '.join(names)}.")


def parse_value(text: str) -> Any:
    """A command-line value read as a TOML value: ``8`` → 8, ``1e-5`` → 1e-05, ``true``,
    ``[256, 512]``, ``{width = 8}`` (a table); ``none`` → None (unset an optional key);
    anything else is the text itself (``rect:10x10``, ``256x512``)."""
    if text.strip().lower() == "none":
        return None
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def parse_patch(text: str) -> Patch:
    """``rect:HxW`` | ``disc:D`` | ``blob:D`` | ``cluster:D[:GAP]`` | ``path/to/mask.npy``."""
    if not isinstance(text, str):
        raise ValueError(f"patch must be a string such as 'rect:10x10', got {text!r}.")
    if text.endswith(".npy"):
        path = Path(text)
        if not path.exists():
            raise ValueError(f"patch mask file {text} does not exist.")
        try:
            return Patch.from_mask(np.load(path), name=path.stem)
        except (OSError, EOFError, ValueError) as error:  # unreadable, truncated, pickled or not a mask
            raise ValueError(f"patch mask file {text}: {str(error).rstrip('.')}; save a 2-D boolean array "
                             f"with numpy.save.") from None
    kind, _, arg = text.partition(":")
    if kind == "rect":
        return Patch.rectangle(*_validation.size("rect patch size", arg))
    if kind in ("disc", "blob", "cluster"):
        numbers_ = arg.split(":")
        if not all(n.isdigit() for n in numbers_) or not 1 <= len(numbers_) <= (2 if kind == "cluster" else 1):
            raise ValueError(f"{kind} patch needs a diameter, e.g. {kind}:10, got {text!r}.")
        return getattr(Patch, kind)(*map(int, numbers_))
    raise ValueError(f"unknown patch {text!r}: use rect:HxW, disc:D, blob:D, cluster:D[:GAP] or a .npy mask.")


# ---------------------------------------------------------------------------- validators


def _where(name: str) -> str:
    return f"config: {name}"


@contextlib.contextmanager
def _about(name: str):
    """Prefixes a ValueError raised inside with the config key it concerns."""
    try:
        yield
    except ValueError as error:
        raise ValueError(f"{_where(name)}: {error}") from None


def _choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{_where(name)} must be one of {', '.join(map(str, choices))}; got {value!r}.")


def _text(name, value):
    if not isinstance(value, str) or not value:
        raise ValueError(f"{_where(name)} must be a non-empty string, got {value!r}.")


def _boolean(name, value):
    if not isinstance(value, bool):
        raise ValueError(f"{_where(name)} must be true or false, got {value!r}.")


def _integer(name, value, minimum):
    return _validation.integer(_where(name), value, minimum)


def _number(name, value, low, high, *, low_open=False, high_open=False) -> float:
    return _validation.number(_where(name), value, low, high, low_open=low_open, high_open=high_open)


def _optional(check, name, value, *args, **kwargs):
    return None if value is None else check(name, value, *args, **kwargs)


def _mapping(name, value) -> types.MappingProxyType:
    if not isinstance(value, Mapping):
        raise ValueError(f"{_where(name)} must be a table of options, e.g. {{width = 8}}, got {value!r}.")
    return types.MappingProxyType(dict(value))


def _options(name, value, accepted: Mapping[str, Any]) -> types.MappingProxyType:
    """A table of options whose keys are in ``accepted`` (option → default) and whose
    values have the type of a bool, int, float or str default."""
    options = _mapping(name, value)
    for key, option in options.items():
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"its options are {', '.join(sorted(accepted))}."
            raise ValueError(f"{_where(name)} has no option {key!r}; {hint}")
        default = accepted[key]
        if type(default) not in _OPTION_KINDS:  # required, None or a tuple: the loader checks it
            continue
        kind, what = _OPTION_KINDS[type(default)]
        if not isinstance(option, kind) or isinstance(option, bool) != isinstance(default, bool):
            raise ValueError(f"{_where(name)}: {key} must be {what} like its default {default!r}, got {option!r}.")
    return options


_OPTION_KINDS = {bool: (bool, "true or false"), int: (numbers.Integral, "an integer"),
                 float: (numbers.Real, "a number"), str: (str, "a string")}


def _list(name, value) -> list:
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{_where(name)} must be a non-empty list, got {value!r}.")
    return list(value)


def _crop_sizes(value) -> tuple[tuple[int, int], ...]:
    """One crop size (N, 'HxW', [H, W]) or a list of them (a size mixture)."""
    is_pair = isinstance(value, (list, tuple)) and len(value) == 2 and all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value)
    if isinstance(value, (list, tuple)) and not is_pair:
        return tuple(_validation.size(f"config: crop[{i}]", v) for i, v in enumerate(_list("crop", value)))
    return (_validation.size("config: crop", value),)
