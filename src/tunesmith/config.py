"""Configs: dataclasses filled from YAML plus ``--key value`` overrides (flags win), with one-line errors.

Every command uses :func:`parse_cli` (command line) or :func:`build_config` (Python API / dict), so the rules for
types, unknown keys, old key names and help text live in one place.

A recipe's config is a :class:`Config`: a few *parts* (:class:`ModelArgs`, :class:`DataArgs`, :class:`LoraArgs`,
:class:`NEFTuneArgs`, the recipe's own part, and ``transformers.TrainingArguments``), composed rather than inherited.
The YAML file and the command line stay flat: every key belongs to exactly one part, and code reads a key through its
part (``cfg.lora.lora_r``, ``cfg.training.learning_rate``). A recipe gives a part other defaults by subclassing that
part (classify's LoRA: r 4 on the query projection). Every documented key is declared with :func:`field`.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import logging
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from tunesmith.errors import UserError, first_line

T = TypeVar("T")
log = logging.getLogger("tunesmith")

# Old key -> its name now. Old names keep working for one release, with a one-line warning; an alias applies only
# where the command has the new key and not the old one (judge's ``model``, the judge model's name, is its own key).
ALIASES = {
    "train_file": "dataset",
    "validation_file": "eval_dataset",
    "test_file": "test_dataset",
    "use_lora": "use_peft",
    "model": "model_name_or_path",
    "split": "dataset_split",
    "file": "dataset",
    "neftune_alpha": "neftune_noise_alpha",
    "noise_alpha": "neftune_noise_alpha",
}


FLAG = "command line"  # the origin of a key set by a --flag (see build_config's ``origins``)


def canonical_keys(values: dict, known, source: str, origins: dict | None = None) -> dict:
    """``values`` with old key names replaced by the new ones (a one-line deprecation warning for each).
    ``origins`` (key -> where it was set), when given, is updated to the new names."""
    out = {}
    for key, value in values.items():
        new = ALIASES.get(key)
        if new is not None and key not in known and new in known:
            where = _origin(origins, key, source)
            shown = f"--{key}" if where == FLAG else f"'{key}'"
            log.warning(f"tunesmith: {where}: key {shown} is deprecated, use '{new}' (the old name goes after the "
                        "next release)")
            if new in values:
                raise UserError(f"{where}: both '{key}' and '{new}' are given; keep '{new}'")
            if origins is not None and key in origins:
                origins[new] = origins.pop(key)
            key = new
        out[key] = value
    return out


def _origin(origins: dict | None, key, source: str) -> str:
    return (origins or {}).get(key, source)


def printable(text) -> str:
    """``text`` for a one-line message: newlines and other control characters escaped (``\\n``, ``\\x1b``)."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in str(text))


def unknown_key_error(key, known, source: str, origins: dict | None = None) -> UserError:
    """The one-line error for a key the command does not have, naming where it was set (the flag, or the config
    file and line) and suggesting the closest key."""
    where = _origin(origins, key, source)
    close = closest_key(key, known)
    if where == FLAG:
        return UserError(f"unknown flag --{printable(key)}" + (f" (did you mean --{close}?)" if close else ""))
    return UserError(f"{where}: unknown key '{printable(key)}'" + (f" (did you mean {close}?)" if close else ""))


def closest_key(key, known) -> str | None:
    """The known key ``key`` most likely misspells: the same letters without underscores, else the closest by
    difflib's ratio (at least 0.75), else None."""
    key = str(key).lower().replace("-", "_")
    known = [k for k in known if isinstance(k, str)]
    squashed = key.replace("_", "")
    for k in known:
        if k.replace("_", "") == squashed:
            return k
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
    return close[0] if close else None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    first = seen.setdefault(key, key_node.start_mark.line)
                except TypeError:  # an unhashable key: the base class reports it
                    continue
                if first != key_node.start_mark.line:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key '{key}' (first given on line {first + 1})", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


class ConfigFile(dict):
    """A config file's top-level mapping (a dict), which also knows the line of each key: ``where(key)`` is
    ``path:line``."""

    def __init__(self, data: dict, path: str | Path, lines: dict):
        super().__init__(data)
        self.path, self.lines = str(path), lines

    def where(self, key) -> str:
        line = self.lines.get(key)
        return f"{self.path}:{line}" if line else self.path


def read_yaml(path: str | Path) -> ConfigFile:
    """The mapping in a YAML config file, with one-line errors (file:line) for unreadable or invalid YAML."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read config ({e.__class__.__name__}: {e})") from None
    loader = _UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    finally:
        loader.dispose()
    if data is None:
        return ConfigFile({}, path, {})
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config must be a mapping of key: value, got {type(data).__name__}")
    lines = {k.value: k.start_mark.line + 1 for k, _ in node.value if isinstance(k, yaml.ScalarNode)}
    return ConfigFile(data, path, lines)


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert ``value`` to the annotated type ``tp``; strings from the command line are YAML-parsed first."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except UserError as e:
                errors.append(str(e))
        # every alternative refused it: name them all ("expected an integer or auto, got 'many'")
        wants = [e[len(where) + 2:].rsplit(", got ", 1)[0].removeprefix("expected ").replace("must be one of ", "")
                 for e in errors if e.startswith(f"{where}: ")]
        if len(wants) > 1 and len(wants) == len(errors):
            raise UserError(f"{where}: expected {' or '.join(wants)}, got {value!r}")
        raise UserError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise UserError(f"{where}: must be one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",")] if "," in value else [value]
        elif not isinstance(value, (list, tuple)):
            value = [value]
        inner = args[0] if args else Any
        return [_coerce(v, inner, where) for v in value]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise UserError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise UserError(f"{where}: expected an integer, got {value!r}")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise UserError(f"{where}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise UserError(f"{where}: expected a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise UserError(f"{where}: expected a number, got {value!r}") from None
        if number != number or number in (float("inf"), float("-inf")):
            raise UserError(f"{where}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, (dict, list)):
            raise UserError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if isinstance(tp, type) and issubclass(tp, str) and hasattr(tp, "__members__"):  # str Enums (TrainingArguments)
        if isinstance(value, bool):  # YAML 1.1 reads a bare `no` / `yes` as a boolean
            value = "yes" if value else "no"
        try:
            return tp(value)
        except ValueError:
            raise UserError(f"{where}: must be one of {', '.join(m.value for m in tp)}, got {value!r}") from None
    return value


def build_config(cls: type[T], values: dict, source: str = "config", origins: dict | None = None) -> T:
    """Instantiate ``cls`` (a dataclass or a :class:`Config`) from a dict, naming the source and the key on any error.

    ``origins``: where each key was set (``run.yaml:3``, or :data:`FLAG` for a --flag); an error about one key names
    that place instead of ``source``."""
    if isinstance(cls, type) and issubclass(cls, Config):
        return cls.from_dict(values, source, origins)
    fields = _field_types(cls)
    origins = dict(origins or {})
    values = canonical_keys(values, fields, source, origins)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise unknown_key_error(key, fields, source, origins)
        kwargs[key] = _coerce(value, fields[key], f"{_origin(origins, key, source)}: field '{key}'")
    try:
        return cls(**kwargs)
    except UserError as e:
        raise UserError(f"{source}: {e}") from None
    except (ValueError, TypeError) as e:
        raise UserError(f"{source}: {first_line(e)}") from None


def field(default: Any = dataclasses.MISSING, help: str = "", *, hidden: bool = False) -> Any:
    """A documented config key: its default (a list or dict default is copied for each config) and the one-line
    ``help`` that ``--help`` and docs/configuration.md show. ``hidden`` keys work but are left out of the help."""
    metadata = {"help": help, "hidden": True} if hidden else {"help": help}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


class Config:
    """A recipe's options as named parts. Subclasses set ``PARTS``: (attribute, dataclass) pairs; a key belongs to the
    first part that declares it and is read there: ``cfg.lora.lora_r``, ``cfg.training.learning_rate`` (there is no
    flat ``cfg.lora_r``). ``cfg.training`` is the ``TrainingArguments`` part handed to the Trainer. ``validate``
    checks rules that span parts."""

    PARTS: tuple[tuple[str, type], ...] = ()

    def __init__(self, **values):
        built = type(self).from_dict(values, "config")
        self.__dict__.update(built.__dict__)

    @classmethod
    def owners(cls) -> dict[str, str]:
        out: dict[str, str] = {}
        for name, part in cls.PARTS:
            for f in dataclasses.fields(part):
                if f.init:
                    out.setdefault(f.name, name)
        return out

    @classmethod
    def key_types(cls) -> dict[str, Any]:
        """Every key with its annotated type (the owning part's)."""
        out: dict[str, Any] = {}
        for _, part in cls.PARTS:
            for key, tp in _field_types(part).items():
                out.setdefault(key, tp)
        return out

    @classmethod
    def from_dict(cls, values: dict, source: str = "config", origins: dict | None = None):
        owners = cls.owners()
        origins = dict(origins or {})
        values = canonical_keys(dict(values), owners, source, origins)
        by_part: dict[str, dict] = {name: {} for name, _ in cls.PARTS}
        for key, value in values.items():
            if key not in owners:
                raise unknown_key_error(key, owners, source, origins)
            by_part[owners[key]][key] = value
        launched_on_cpu(by_part)
        device_mixed_precision(by_part)
        cls.prepare(by_part)
        self = object.__new__(cls)
        for name, part in cls.PARTS:
            self.__dict__[name] = build_config(part, by_part[name], source, origins)
        try:
            self.validate()
        except UserError as e:
            raise UserError(f"{source}: {e}") from None
        return self

    @classmethod
    def prepare(cls, by_part: dict[str, dict]) -> None:
        """Adjust raw values across parts before the parts are built (the training part validates on construction)."""

    def validate(self) -> None:
        """Rules that span parts."""

    def __getattr__(self, name):  # only reached for a name that is not a part: say where a key lives
        if name.startswith("__"):
            raise AttributeError(name)
        owner = type(self).owners().get(name)
        hint = f"; read cfg.{owner}.{name}" if owner else ""
        raise AttributeError(f"{type(self).__name__} has no attribute '{name}'{hint}")

    def __setattr__(self, name, value):
        if name not in dict(type(self).PARTS):
            owner = type(self).owners().get(name)
            hint = f"; set cfg.{owner}.{name}" if owner else ""
            raise AttributeError(f"{type(self).__name__} has only its parts as attributes, not '{name}'{hint}")
        object.__setattr__(self, name, value)

    def to_dict(self) -> dict:
        """Every key with its value, flat (the shape of the YAML file)."""
        return {key: getattr(getattr(self, part), key) for key, part in type(self).owners().items()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.to_dict().items())})"


# ------------------------------------------------------------------------------------------------ shared parts


@dataclasses.dataclass
class ModelArgs:
    """Model"""

    model_name_or_path: str | None = field(None, "Base model: a local directory, a hub id or pkg:PACKAGE/path "
                                                 "(required).")
    model_revision: str | None = field(None, "Hub revision of the model (branch, tag or commit); default the main "
                                             "branch.")
    dtype: str = field("auto", "auto (float32 on CPU; on a GPU the checkpoint's 16-bit dtype as bfloat16 where "
                               "supported, with bf16 mixed precision), float32, bfloat16 or float16.")
    attn_implementation: str = field("sdpa", "sdpa, eager, flash_attention_2, flash_attention_3 or flex_attention (the "
                                             "flash kernels when installed; a packed batch then reaches them as one "
                                             "row, which sends them to their variable-length kernels, and padding_free "
                                             "batches are one row already).")
    trust_remote_code: bool = field(False, "Allow custom model code from the model repository (off: never runs foreign "
                                           "code).")
    load_in_4bit: bool = field(False, "QLoRA: load the base in 4-bit NF4 (bitsandbytes) and train a LoRA adapter.")

    def __post_init__(self):
        from tunesmith.io import resolve_path

        if not self.model_name_or_path:
            raise UserError("field 'model_name_or_path' is required")
        self.model_name_or_path = resolve_path(self.model_name_or_path)
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise UserError(f"field 'dtype' must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        check_attn_implementation(self.attn_implementation)


@dataclasses.dataclass
class DataArgs:
    """Data"""

    dataset: str | list | None = field(None, "Training data: a .json/.jsonl/.csv/.parquet file, a pipe, "
                                             "pkg:PACKAGE/path or a hub dataset name; or a list of sources "
                                             "(a.jsonl,b.jsonl, or YAML mappings {path, split, format, template, "
                                             "weight, num_samples}) mixed by 'mixture' (required).")
    eval_dataset: str | list | None = field(None, "Held-out data (same forms), scored noise-free at evaluations, each "
                                                  "source on its own.")
    mixture: str = field("concat", "How several training sources mix: concat (all of each) or interleave (drawn by "
                                   "weight until a source runs out); seeded by seed.")
    dataset_format: str = field("auto", "auto, alpaca, prompt_completion, messages, sharegpt or text.")
    dataset_split: str = field("train", "Split to read from a hub dataset.")
    template: str | None = field("auto", "auto (the tokenizer's chat template for chat data when it has one, else "
                                         "alpaca), alpaca, instruction_response, qa, chat, or a format string with "
                                         "{prompt} once, then {response} once, last.")
    chat_template: str | None = field(None, "A Jinja chat-template file that replaces the tokenizer's (used by "
                                            "template chat, saved with the model).")
    max_length: int = field(512, "Maximum tokens per example (truncated from the end: the prompt's start is kept).")
    train_on_prompt: bool = field(False, "Also train on prompt tokens (default: responses only).")
    packing: bool = field(False, "Pack several examples per row (no attention or position leakage between them: a "
                                 "block-diagonal mask under sdpa/eager/flex, the variable-length kernels under flash).")
    padding_free: bool = field(False, "Put each batch's examples in one row instead of padding them (same examples, "
                                      "same loss; no padding computed).")
    dataset_num_proc: int | None = field(None, "Processes that tokenize the data (default 1). Tokenized data is cached "
                                               "in $HF_DATASETS_CACHE/tunesmith and reused by later runs.")

    def __post_init__(self):
        from tunesmith.data.source import check_sources

        if not self.dataset:
            raise UserError("field 'dataset' is required")
        check_sources(self.dataset, "dataset", self.mixture)
        check_sources(self.eval_dataset, "eval_dataset", weights=False)
        if self.dataset_num_proc is not None and self.dataset_num_proc < 1:
            raise UserError(f"dataset_num_proc must be at least 1, got {self.dataset_num_proc}")
        if self.chat_template is not None:
            read_chat_template(self.chat_template)
        if self.padding_free and self.packing:
            raise UserError("padding_free and packing exclude each other (packed rows have no padding to remove)")
        if self.max_length < 2:
            raise UserError("max_length must be at least 2")


@dataclasses.dataclass
class LoraArgs:
    """LoRA"""

    use_peft: bool = field(False, "Train a LoRA adapter instead of all weights.")
    lora_r: int = field(16, "LoRA rank.")
    lora_alpha: int = field(32, "LoRA scaling alpha (scale = alpha / r).")
    lora_dropout: float = field(0.05, "LoRA dropout.")
    lora_target_modules: list[str] | None = field(None, "Modules to adapt: names, or all-linear (default all-linear).")
    modules_to_save: list[str] | None = field(None, "Extra modules trained fully under LoRA.")

    def __post_init__(self):
        if self.lora_target_modules is None:
            self.lora_target_modules = ["all-linear"]
        check_lora_values(self)


def check_lora_values(part) -> None:
    from tunesmith import checks

    checks.at_least("lora_r", part.lora_r, 1)
    checks.positive("lora_alpha", part.lora_alpha)
    checks.fraction("lora_dropout", part.lora_dropout)
    for key in ("lora_target_modules", "modules_to_save"):
        names = getattr(part, key)
        if names is not None and any(not str(n).strip() for n in names):
            raise UserError(f"field '{key}': empty module name in {names}")


@dataclasses.dataclass
class NEFTuneArgs:
    """NEFTune"""

    neftune_noise_alpha: float | None = field(None, "NEFTune alpha (paper: 5, 10 or 15); unset or 0 = off.")
    neftune_noise_distribution: str = field("uniform", "uniform (the method) or gaussian (the paper's Table 6 "
                                                       "ablation).")

    def __post_init__(self):
        from tunesmith import checks

        checks.number("neftune_noise_alpha", self.neftune_noise_alpha, low=0, high=100, optional=True,
                      why="0 or unset: off; the paper uses 5, 10 or 15, and far larger noise drowns the embeddings")
        if self.neftune_noise_distribution not in ("uniform", "gaussian"):
            raise UserError(f"field 'neftune_noise_distribution' must be uniform or gaussian, "
                            f"got {self.neftune_noise_distribution!r}")


ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


def check_attn_implementation(name: str) -> None:
    """One-line error for an unknown attention kernel or one that is not installed here."""
    if name not in ATTN_IMPLEMENTATIONS:
        raise UserError(f"field 'attn_implementation' must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, got {name!r}")
    from transformers.utils import import_utils

    available = {"flash_attention_2": "is_flash_attn_2_available", "flash_attention_3": "is_flash_attn_3_available",
                 "flex_attention": "is_torch_flex_attn_available"}
    check = available.get(name)
    if check and not getattr(import_utils, check, lambda: False)():
        raise UserError(f"field 'attn_implementation': {name} is not available here (its kernel is not installed or "
                        "needs a GPU); use sdpa")


def read_chat_template(path: str) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"field 'chat_template': cannot read {path} ({e.__class__.__name__})") from None
    if "{%" not in text and "{{" not in text:
        raise UserError(f"field 'chat_template': {path} is not a Jinja template (no {{% %}} or {{{{ }}}})")
    return text


def launched_on_cpu(by_part: dict[str, dict]) -> None:
    """Under a launcher (torchrun, accelerate launch: WORLD_SIZE > 1) on a machine without an accelerator, the run is
    distributed over CPU processes: ``use_cpu`` is set unless the config sets it. Without it transformers leaves the
    ranks undistributed (its "parallel_mode != ParallelMode.DISTRIBUTED" warning) and every rank acts as rank 0."""
    training = by_part.get("training")
    if training is None or "use_cpu" in training:
        return
    try:
        distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return
    if not distributed:
        return
    import torch

    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6: CUDA, ROCm, MPS, XPU, ...
    if not (accelerator.is_available() if accelerator is not None else torch.cuda.is_available()):
        training["use_cpu"] = True


def device_mixed_precision(by_part: dict[str, dict]) -> None:
    """``dtype: auto`` (the default): bf16 mixed precision on GPUs that support it (fp16 on other GPUs), none on CPU,
    unless the config sets bf16 / fp16 itself."""
    model, training = by_part.get("model"), by_part.get("training")
    if model is None or training is None or model.get("dtype", "auto") != "auto":
        return
    if "bf16" in training or "fp16" in training or training.get("use_cpu"):
        return
    import torch

    if torch.cuda.is_available():
        training["bf16" if torch.cuda.is_bf16_supported() else "fp16"] = True


def parse_overrides(argv: list[str], types: dict | None = None) -> tuple[str | None, dict]:
    """``--config F --a 1 --b x`` -> (F, {'a': 1, 'b': 'x'}); values are YAML-parsed (``5`` -> 5, ``true`` -> True).

    ``types``: the command's keys with their types (:func:`key_types`). As TRL and transformers' parsers read them,
    a list key takes every value up to the next flag (``--lora_target_modules q_proj v_proj``), a bare flag is true,
    and ``--no_KEY`` sets a boolean key to false."""
    types = {k: tp for k, tp in (types or {}).items() if tp is not None}
    list_keys = {k for k, tp in types.items() if _takes_list(tp)}
    bool_keys = {k for k, tp in types.items() if _is_bool(tp)}
    config_path, overrides = None, {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument '{printable(arg)}' (options are --key value)")
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        i += 1
        following = []
        while not eq and i + len(following) < len(argv) and not argv[i + len(following)].startswith("--"):
            following.append(argv[i + len(following)])
            if key not in list_keys:
                break
        i += len(following)
        negated = key.startswith("no_") and key[3:] in bool_keys and key not in bool_keys
        if negated:
            if eq or following:
                raise UserError(f"--{key} takes no value (it sets {key[3:]} to false)")
            key, value = key[3:], "false"
        elif len(following) > 1:
            value = following
        elif following:
            value = following[0]
        elif not eq:
            value = "true"  # a bare flag
        if key == "config":
            config_path = value
            continue
        overrides[key] = value if isinstance(value, list) else _parse_value(value)
    return config_path, overrides


def _parse_value(value: str):
    try:
        parsed = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError:
        return value
    return value if isinstance(parsed, dict) else parsed


def _takes_list(tp) -> bool:
    origin = typing.get_origin(tp)
    if tp in (list, tuple) or origin in (list, tuple):
        return True
    return origin in (typing.Union, types.UnionType) and any(_takes_list(a) for a in typing.get_args(tp))


def _is_bool(tp) -> bool:
    return tp is bool or (typing.get_origin(tp) in (typing.Union, types.UnionType) and bool in typing.get_args(tp))


def key_types(cls) -> dict[str, Any]:
    """Every key of a command's config class (a dataclass or a :class:`Config`) with its annotated type, old names
    (:data:`ALIASES`) included under the type of the key they name."""
    types_ = cls.key_types() if isinstance(cls, type) and issubclass(cls, Config) else _field_types(cls)
    for old, new in ALIASES.items():
        if new in types_ and old not in types_:
            types_[old] = types_[new]
    return types_


def _default_text(f) -> str:
    if f.default is not dataclasses.MISSING:
        return str(f.default)
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return str(f.default_factory())  # type: ignore[misc]
    return "(required)"


def type_name(tp) -> str:
    """A key's type as a reader writes it: ``int``, ``str | None``, ``list[str]``, ``formula | paper``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "None"
    if tp is Any:
        return "any"
    if origin in (typing.Union, types.UnionType):
        return " | ".join(dict.fromkeys(type_name(a) for a in args))
    if origin is typing.Literal:
        return " | ".join(map(str, args))
    if origin in (list, tuple, dict):
        return f"{origin.__name__}[{', '.join(type_name(a) for a in args)}]" if args else origin.__name__
    if isinstance(tp, type) and issubclass(tp, str) and hasattr(tp, "__members__"):  # str Enums: their values
        return "str"
    return getattr(tp, "__name__", str(tp))


def _key_rows(cls, names) -> list[dict]:
    hints = _field_types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    return [{"key": name, "default": _default_text(fields[name]), "type": type_name(hints[name]),
             "help": (fields[name].metadata.get("help") or "").strip().split("\n")[0].strip()} for name in names]


def describe(cls, command: str, description: str) -> dict:
    """What ``--help`` shows for a command, as data: usage, description, the keys grouped by part (key, default,
    type, help) and the old key names. :func:`render_help` prints it; the committed reference
    (:mod:`tunesmith.reference`) stores it for every command, so help needs no heavy import."""
    groups = []
    if isinstance(cls, type) and issubclass(cls, Config):
        owners = cls.owners()
        for name, part in cls.PARTS:
            title = (part.__doc__ or name).strip().splitlines()[0]
            mine = [f.name for f in dataclasses.fields(part) if f.init and owners.get(f.name) == name
                    and not f.metadata.get("hidden")]
            groups.append({"part": name, "title": title, "keys": _key_rows(part, mine)})
    else:
        owners = _field_types(cls)
        mine = [f.name for f in dataclasses.fields(cls) if f.init and not f.metadata.get("hidden")]
        groups.append({"part": None, "title": None, "keys": _key_rows(cls, mine)})
    aliases = {k: v for k, v in ALIASES.items() if v in owners and k not in owners}
    shown = {row["key"] for group in groups for row in group["keys"]}
    return {"usage": f"tunesmith {command} --config FILE.yaml [--key value ...]", "description": description,
            "groups": groups, "aliases": aliases, "hidden": sorted(set(owners) - shown)}


def render_help(desc: dict) -> str:
    """The ``--help`` text of a command described by :func:`describe` (ends with one newline)."""
    lines = [f"usage: {desc['usage']}", "", desc["description"], "",
             "Options (YAML keys; a --key flag overrides the file):"]
    for group in desc["groups"]:
        if group["title"]:
            lines += ["", f"{group['title']}:"]
        for row in group["keys"]:
            lines.append(f"  --{row['key']} (default: {row['default']})")
            if row["help"]:
                lines.append(f"      {row['help']}")
    if desc["aliases"]:
        lines += ["", "Old key names (still accepted for one release): "
                  + ", ".join(f"{k} -> {v}" for k, v in desc["aliases"].items())]
    return "\n".join(lines) + "\n"


def help_text(cls, command: str, description: str) -> str:
    return render_help(describe(cls, command, description))


_help_collectors: list[list[dict]] = []


@contextlib.contextmanager
def collecting_help():
    """For tools that build the help reference (:mod:`tunesmith.reference`): inside this block, a ``--help`` handled
    by :func:`parse_cli` records :func:`describe`'s data in the yielded list instead of printing it."""
    seen: list[dict] = []
    _help_collectors.append(seen)
    try:
        yield seen
    finally:
        _help_collectors.remove(seen)


def parse_cli(cls: type[T], argv: list[str], command: str, description: str, positional: str | None = None) -> T | None:
    """Parse a command line (``--config FILE`` plus ``--key value`` overrides). Returns None after printing help.

    ``positional``: a list key that also takes the leading bare arguments (``tunesmith report RUN_DIR ...``).
    An unknown or misspelt key is named where it was given: the flag, or the config file and its line."""
    if any(a in ("-h", "--help") for a in argv):
        if _help_collectors:
            _help_collectors[-1].append(describe(cls, command, description))
        else:
            print(help_text(cls, command, description), end="")
        return None
    argv, bare = list(argv), []
    if positional:
        while argv and not argv[0].startswith("--"):
            bare.append(argv.pop(0))
    known = key_types(cls)
    config_path, overrides = parse_overrides(argv, known)
    values: dict = {}
    origins: dict = {}
    if config_path:
        file = read_yaml(config_path)
        values.update(file)
        origins.update({key: file.where(key) for key in file})
    values.update(overrides)
    origins.update(dict.fromkeys(overrides, FLAG))
    if bare:
        values[positional] = list(values.get(positional) or []) + bare
    return build_config(cls, values, source=config_path or "command line", origins=origins)


def save_yaml(config, path: str | Path) -> None:
    """Write the resolved config (a dataclass or a :class:`Config`) as flat YAML, atomically."""
    from tunesmith.io import atomic_write_text

    items = config.to_dict() if isinstance(config, Config) else {
        f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    data = {}
    for key, v in items.items():
        if hasattr(v, "value") and isinstance(v.value, str):
            v = v.value
        if isinstance(v, (str, int, float, bool, type(None))) or (isinstance(v, (list, dict)) and _plain(v)):
            data[key] = v
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=True, allow_unicode=True))


def _plain(v) -> bool:
    if isinstance(v, dict):
        return all(isinstance(k, str) and _plain(x) for k, x in v.items())
    if isinstance(v, list):
        return all(_plain(x) for x in v)
    return isinstance(v, (str, int, float, bool, type(None)))
