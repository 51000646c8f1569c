"""Typed, validated configuration: YAML recipes plus dotted ``key=value`` overrides.

Defaults live here and only here. A recipe is read into plain dicts, overrides are applied, and the
result is checked against the dataclasses below: unknown keys get a "did you mean" suggestion, wrong
types name the key and, for recipe files, the line.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import reprlib
import stat
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from .data.templates import check_template, fields_of
from .errors import TunelabError, one_line


def _choices(*values: str) -> dict:
    return {"choices": values}


_COUNT_OR_FRACTION = {"count_or_fraction": True}  # an integer is a count, a float below 1 a fraction


@dataclass
class ModelConfig:
    name: str = "smollm2-135m-instruct"  # built-in alias, local directory, or hub id
    dtype: str = field(default="float32", metadata=_choices("float32", "bfloat16", "float16", "auto"))
    device: str = field(default="auto", metadata=_choices("auto", "cpu", "cuda"))
    trust_remote_code: bool = False
    revision: str | None = None
    allow_pickle: bool = False  # load pickle weights (.bin/.pt), which can run code: only for files you trust
    init: str = field(default="pretrained", metadata=_choices("pretrained", "random"))  # random: same config,
    init_seed: int = 0  # fresh weights (seeded): pre-training's value, measured
    attention: str = field(default="auto", metadata=_choices("auto", "eager", "sdpa", "flex_attention",
                                                             "flash_attention_2"))  # attn_implementation
    # a special token put before every text the tokenizer encodes with special tokens (prompts, not chat
    # renderings), as Llama's tokenizer puts BOS; for tokenizers that add none (SmolLM2's: <|endoftext|>, its
    # pre-training document separator), so that a prompt's first word is not at position 0
    bos_token: str | None = None


@dataclass
class SourceConfig:
    """Where records come from: a file (by extension or ``format``) or an HF dataset by name."""

    path: str | None = None
    format: str = field(default="auto", metadata=_choices("auto", "jsonl", "json", "csv", "parquet", "text"))
    dataset: str | None = None  # a `datasets` name, loaded with load_dataset(dataset, subset, split)
    subset: str | None = None
    split: str = "train"
    text_field: str = "text"  # the field name given to each line of a plain-text file


@dataclass
class ColumnsConfig:
    """Field names of the instruction formats, for data sets that name them differently."""

    instruction: str = "instruction"  # alpaca / self-instruct
    input: str = "input"
    output: str = "output"
    system: str = "system_prompt"  # openorca
    question: str = "question"
    response: str = "response"


@dataclass
class SyntheticConfig:
    """Extra training records: strings sampled from a character n-gram model of one field's training values
    (none equal to a real or held-out value), formatted by the recipe's templates like the real ones."""

    field: str | None = None  # the record field to model and fill (e.g. name)
    count: int = 0  # records to add (0: none)
    order: int = 4  # n of the character n-gram: each character given the previous order - 1


@dataclass
class DataConfig:
    train: SourceConfig | None = None
    validation: SourceConfig | None = None
    test: SourceConfig | None = None
    # held out of `train` when no validation source: a count (an integer: 500) or a fraction below 1 (0.1)
    validation_size: float = field(default=0, metadata=_COUNT_OR_FRACTION)
    test_size: float = field(default=0, metadata=_COUNT_OR_FRACTION)
    unique_by: str | None = None  # drop records whose value of this field was seen before
    train_size: int | None = None  # keep at most this many training records (after the split)
    prompt: str = "{prompt}"  # template over record fields: {field} or {field|filter|...}
    completion: str = "{completion}"
    formatter: str | None = None  # "module:function" record -> {"prompt": ..., "completion": ...}
    format: str = field(default="template", metadata=_choices("template", "alpaca", "openorca"))
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    max_length: int = 512
    truncation: str = field(default="drop", metadata=_choices("drop", "truncate", "error"))
    empty_target: str = field(default="error", metadata=_choices("error", "drop"))
    add_eos: bool = True
    # how completions become tokens: bpe (the tokenizer's usual merges) or chars (one token per character,
    # the same text: spelling tasks such as reversal no longer need a token's letters from memory)
    completion_tokens: str = field(default="bpe", metadata=_choices("bpe", "chars"))
    group_by_length: bool = True
    weight_field: str | None = None  # a numeric record field that weights each example's loss (e.g. a score)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class TrainConfig:
    mode: str = field(default="lora", metadata=_choices("full", "lora", "head", "freeze"))
    trainable: list[str] = field(default_factory=list)  # parameter-name patterns for mode=freeze
    epochs: int = 1
    max_steps: int | None = None  # overrides epochs when set
    batch_size: int = 8  # micro-batch
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    schedule: str = field(default="linear", metadata=_choices("constant", "linear", "cosine"))
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    # auto: mixed for full fine-tuning where model.dtype is bfloat16, else pure | pure: weights, gradients and
    # AdamW in model.dtype | mixed: float32 weights and optimizer, the forward pass autocast to bfloat16
    # (updates too small for bfloat16 are not lost)
    precision: str = field(default="auto", metadata=_choices("auto", "pure", "mixed"))
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    dropout: float | None = None  # overrides the model's dropout probabilities
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # validation loss every N steps (0: only at the end)
    checkpoint_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    resume: str | bool = "never"  # never | auto | path to a checkpoint directory (true: auto, false: never)
    loss_chunk: int = 2048  # supervised positions per lm_head chunk
    nonfinite: str = field(default="stop", metadata=_choices("stop", "skip"))  # a NaN/inf loss or grad norm
    early_stopping_patience: int | None = None  # stop after this many evaluations without improvement
    best_metric: str = field(default="val_loss", metadata=_choices("val_loss", "exact_match", "accuracy"))
    min_delta: float = 0.0  # an improvement must beat the best by more than this
    packing: bool = False  # SFT: a micro-batch's examples end to end in rows of <= pack_length tokens
    pack_length: int = 8192  # (each example attends only to itself: position_ids restart, a block mask)
    compile: bool = False  # torch.compile each decoder layer (opt-in: measured slower on CPU; for GPUs)
    compile_backend: str = "inductor"  # torch.compile backend (aot_eager: compiles without code generation)
    parallel: str = field(default="ddp", metadata=_choices("ddp", "fsdp"))  # several processes: replicate or shard


@dataclass
class LoraConfig:
    r: int = 16
    alpha: float = 32
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])  # or ["all-linear"]
    layers: list[int] | None = None  # only these decoder layers get adapters


@dataclass
class ClassifyConfig:
    """task: classification - p(y|x) = softmax(W h + b) on the pooled hidden state h."""

    text: str = "{text}"  # template over record fields: the input x
    label: str = "{label}"  # template over record fields giving the class, e.g. {label} or {name|vowels}
    labels: list[str] | None = None  # the label set in order; default: read from the training data
    pooling: str = field(default="last", metadata=_choices("last", "first", "mean"))  # last non-padding token
    bias: bool = False  # b; transformers' *ForSequenceClassification heads have none (export needs false)


@dataclass
class ChatConfig:
    """task: chat - conversations rendered with a chat template, loss on assistant turns."""

    format: str = field(default="auto", metadata=_choices("auto", "messages", "sharegpt", "lmsys", "openorca"))
    column: str | None = None  # the record field holding the conversation (default: by format)
    template: str = "auto"  # auto (the tokenizer's, else chatml) | model | chatml | llama3 | path to .jinja
    stop: str | None = None  # the end-of-turn token (default: the shipped template's, else EOS)
    system: str | None = None  # the default system prompt
    system_mode: str = field(default="record", metadata=_choices("record", "default", "none"))
    train_on: str = field(default="all_assistant", metadata=_choices("all_assistant", "last_assistant", "all"))


@dataclass
class KDConfig:
    """Token-level knowledge distillation: loss = (1 - alpha)·CE + alpha·T²·D(teacher ‖ student)."""

    teacher: str | None = None  # a run directory, model directory, alias or hub id; null: no distillation
    alpha: float = 0.5  # weight of the distillation term (1: soft labels only; 0: plain SFT)
    temperature: float = 1.0
    divergence: str = field(default="forward_kl", metadata=_choices("forward_kl", "reverse_kl", "jsd"))
    beta: float = 0.5  # generalised JSD: m = beta·q + (1 - beta)·p
    teacher_dtype: str = field(default="auto", metadata=_choices("auto", "float32", "bfloat16", "float16"))
    teacher_device: str = field(default="auto", metadata=_choices("auto", "cpu", "cuda"))
    cache: str | None = None  # a file of the teacher's top-k log-probabilities: written once, then reused
    top_k: int = 64  # tokens kept per position in the cache
    chunk: int = 1024  # supervised positions per logits chunk


@dataclass
class TemplateConfig:
    """One template of a task: a prompt pattern and a target pattern over the record's fields."""

    prompt: str = ""
    completion: str = ""
    name: str | None = None  # default: "<task>/<index>"


@dataclass
class TaskConfig:
    """One task of an instruction-tuning mixture (FLAN-style: several templates per task)."""

    name: str = ""
    builtin: str | None = None  # a built-in task over names (its templates; data: names.txt)
    source: SourceConfig | None = None  # its records (default: data.train)
    templates: list[TemplateConfig] = field(default_factory=list)  # added to the built-in ones
    options: list[str] | None = None  # FLAN options rendered into {options}; the answer into {option_key}
    options_field: str | None = None  # or a record field holding the list of options
    answer: str = "{answer}"  # template giving the correct option's text
    options_style: str = field(default="dash", metadata=_choices("dash", "letter", "number"))
    shuffle_options: bool = False  # shuffle the options of each example (seeded)
    weight: float = 1.0  # mixing weight (instruct.mixing=weighted)
    cap: int | None = None  # at most this many of its records (default: instruct.cap); weighted mixing may repeat them
    held_out_templates: list[int | str] = field(default_factory=list)  # indices or names: evaluation only


@dataclass
class InstructConfig:
    """Instruction tuning over a mixture of tasks, each with a set of templates."""

    tasks: list[TaskConfig] = field(default_factory=list)
    choose: str = field(default="random", metadata=_choices("random", "round_robin"))  # template per example
    mixing: str = field(default="proportional", metadata=_choices("proportional", "weighted"))
    cap: int | None = None  # examples-proportional mixing: at most this many examples of a task (FLAN's K)
    total: int | None = None  # weighted mixing: training examples in all (default: the capped sum)
    held_out_tasks: list[str] = field(default_factory=list)  # trained on none of their templates
    eval_templates: str = field(default="all", metadata=_choices("all", "held_out", "train"))


@dataclass
class SNIConfig:
    """Super-NaturalInstructions-style tasks: one JSON file a task (Definition, Positive Examples,
    Negative Examples, Instances), trained on some tasks and evaluated on unseen ones."""

    dir: str | None = None  # a directory of task files (*.json)
    eval_tasks: list[str] = field(default_factory=list)  # held-out tasks (file stems): evaluated, never trained
    train_tasks: list[str] = field(default_factory=list)  # default: every task not held out
    definition: bool = True  # the prompt encoding: the task's definition,
    positive: int = 2  # k positive examples (0, 1, 2, ...),
    negative: int = 0  # negative examples,
    explanations: bool = False  # and the examples' explanations
    train_instances: int | None = 500  # at most this many instances of each training task
    eval_instances: int = 100  # instances of each evaluation task


@dataclass
class EvalConfig:
    before: bool = True  # evaluate the base model too, for the before/after table
    generate: bool = True  # greedy generation + exact match (generation tasks)
    split: str = field(default="auto", metadata=_choices("auto", "validation", "test"))
    max_examples: int | None = None
    max_new_tokens: int = 32
    batch_size: int = 64
    show: int = 10  # rows of the before/after table
    display: str | None = None  # template over record fields for the table's input column (default: prompt)
    during_training: bool = False  # also score generation at every train.eval_every
    variations: str | None = None  # prompt variations scored before/after: a built-in task or a YAML/JSON file
    control: str | None = None  # a control set (JSONL) scored before/after: what else fine-tuning changed


@dataclass
class OutputConfig:
    dir: str | None = None  # default: runs/<recipe name>
    overwrite: bool = False
    save_model: bool = True
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])  # + wandb | mlflow; none: only jsonl


@dataclass
class Config:
    name: str = "run"
    description: str = ""
    task: str = field(default="generation", metadata=_choices("generation", "classification", "chat"))
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    chat: ChatConfig = field(default_factory=ChatConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    instruct: InstructConfig = field(default_factory=InstructConfig)
    sni: SNIConfig = field(default_factory=SNIConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Keys whose scalar value is shorthand for one field of the section: `model=X` sets model.name.
_SHORTHAND = {"model": "name", "data.train": "path", "data.validation": "path", "data.test": "path",
              "instruct.tasks.source": "path"}
_FILE_SUFFIXES = (".yaml", ".yml", ".json", ".jsonl")
_SOURCE_KEYS = ("train", "validation", "test")

# Bounds on what is read: a recipe is a small text file; anything past these is a mistake or an attack (a
# "billion laughs" of nested aliases, a FIFO or /dev/zero given as the recipe), refused in one line.
MAX_RECIPE_BYTES = 1 << 20
MAX_YAML_NODES = 100_000  # values in a recipe or an override's value, with aliases expanded
MAX_YAML_DEPTH = 64  # nesting, with aliases expanded (a recipe needs about 6)
INT_LIMIT = 2**63  # an integer setting reaches torch and the tokenizers as a 64-bit integer
SEED_LIMIT = 2**32  # seeds: 32 bits, as numpy and most tools take (the data order uses seed * 100_003 + epoch)
_SEED_KEYS = ("train.seed", "model.init_seed")
# Keys naming a file, a directory or a model (unindexed; shorthand sections too): an empty string is never
# meant (`output.dir=$UNSET` would silently write to the default)
_PATH_KEYS = frozenset({"output.dir", "model", "model.name", "sni.dir", "kd.teacher", "kd.cache", "chat.template",
                        "eval.variations", "eval.control", "instruct.tasks.source", "instruct.tasks.source.path",
                        *(f"data.{s}" for s in _SOURCE_KEYS), *(f"data.{s}.path" for s in _SOURCE_KEYS)})


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every valid dotted key, for suggestions."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        keys.append(key)
        sub = _dataclass_of(hints[f.name])
        if sub is not None:
            keys.extend(all_keys(sub, key + "."))
    return keys


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping (a config as a dict) as {dotted.key: value}."""
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}."))
    return out


def _dataclass_of(tp: Any) -> type | None:
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _unindexed(key: str) -> str:
    """A key with its list indices dropped: instruct.tasks[1].weight -> instruct.tasks.weight."""
    return re.sub(r"\[\d+\]", "", key)


def _suggest(key: str) -> str:
    if len(key) > 200:
        return ""
    keys = all_keys()
    key = _unindexed(key)
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if not close:
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in keys if k.rsplit(".", 1)[-1] == leaf][:1]
    return f" (did you mean {close[0]}?)" if close else ""


def _type_name(tp: Any) -> str:
    if tp is float:
        return "a number"
    if tp is int:
        return "an integer"
    if tp is bool:
        return "true or false"
    if tp is str:
        return "a string"
    origin = typing.get_origin(tp)
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    return getattr(tp, "__name__", str(tp))


class _Brief(reprlib.Repr):
    """A value as Python writes it, cut short: messages stay one readable line whatever the value."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel = 3
        self.maxlist = self.maxtuple = self.maxset = self.maxfrozenset = self.maxdict = 8
        self.maxstring = self.maxother = 120

    def repr_int(self, x: int, level: int) -> str:  # repr() of an int over 4300 digits raises
        if x.bit_length() > 256:
            digits = int((abs(x).bit_length() - 1) * math.log10(2))  # at most the count, by one at most
            while abs(x) >= 10**digits:
                digits += 1
            return f"<an integer of {digits} digits>"
        return repr(x)


_BRIEF = _Brief()


def _show(value: Any) -> str:
    return _BRIEF.repr(value)


def _show_key(key: str) -> str:
    """A key for a message: as written, unless it is long or holds characters that would break the line."""
    return key if key.isprintable() and len(key) <= 120 else _show(key)


def _override_where(item: str) -> str:
    """'override KEY=VALUE', the value cut short when long (a message stays one readable line)."""
    if item.isprintable() and len(item) > 120:
        return f"override {item[:100]}..."
    return f"override {_show_key(item)}"


class _Located:
    """Maps dotted keys to a location string (recipe file and line, or the override)."""

    def __init__(self) -> None:
        self.where: dict[str, str] = {}
        self.default = "config"
        self.saved_run = False  # the config.yaml a run saved (counts written as floats before they were ints)

    def of(self, key: str) -> str:
        parts = key.split(".")
        while parts:
            here = ".".join(parts)
            w = self.where.get(here) or self.where.get(_unindexed(here))  # an override sets instruct.tasks
            if w:
                return w
            parts.pop()
        return self.default


class _OutOfRange(TunelabError):
    """A number too large for its setting: said as such, not as "expected an integer or null"."""


def _coerce(value: Any, tp: Any, key: str, loc: _Located) -> Any:
    """Check (and gently coerce) one value against a type hint."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, loc)
            except TunelabError as e:
                if isinstance(value, dict) and dataclasses.is_dataclass(arg) or isinstance(e, _OutOfRange):
                    raise  # a section's own error (unknown key, wrong type inside) says more
                errors.append(e)
        raise TunelabError(f"{key}: expected {_type_name(tp)}, got {_show(value)}", loc.of(key))
    if dataclasses.is_dataclass(tp):
        plain = _unindexed(key)
        if isinstance(value, str) and plain in _SHORTHAND:
            value = {_SHORTHAND[plain]: value}
        if not isinstance(value, dict):
            raise TunelabError(f"{key}: expected a section (mapping), got {_show(value)}", loc.of(key))
        return _build(tp, value, key + ".", loc)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            raise TunelabError(f"{key}: expected {_type_name(tp)}, got {_show(value)}", loc.of(key))
        return [_coerce(v, inner, f"{key}[{i}]", loc) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        too_long = isinstance(value, str) and re.fullmatch(r"\s*[-+]?\d{4300,}\s*", value)  # YAML could not read it
        if too_long or isinstance(value, int) and not isinstance(value, bool) and not -INT_LIMIT <= value < INT_LIMIT:
            raise _OutOfRange(f"{key}: {_show(value)} is out of range: an integer setting is below 2**63 (it "
                              "reaches torch as a 64-bit integer)", loc.of(key))
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = value
        elif isinstance(value, str):  # YAML 1.1 reads 1e-4 as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            try:
                number = float(number)
            except OverflowError:
                raise _OutOfRange(f"{key}: {_show(value)} is too large for a number", loc.of(key)) from None
            if math.isnan(number):
                raise TunelabError(f"{key}: expected a number, got nan (not a number)", loc.of(key))
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return str(value)
            except ValueError:  # an integer of more than 4300 digits
                pass
    else:  # pragma: no cover - only the types above are used
        return value
    raise TunelabError(f"{key}: expected {_type_name(tp)}, got {_show(value)}", loc.of(key))


def _check_count_or_fraction(value: Any, key: str, loc: _Located) -> None:
    """data.validation_size and test_size: an integer is a count of examples, a float below 1 a fraction.
    A float of 1 or more (1.0: one example? all of them?) is refused rather than guessed."""
    if isinstance(value, str):  # YAML 1.1 reads 1e3 as a string
        try:
            value = float(value)
        except ValueError:
            return  # _coerce says what is wrong
    if not isinstance(value, float) or not value >= 1:
        return  # a count, a fraction, or (negative, nan) refused by _check
    if value.is_integer() and loc.saved_run and not loc.of(key).startswith("override "):
        return  # a run's config.yaml from before counts were saved as integers: 500.0 is 500
    n = int(value) if value.is_integer() else None
    fix = (f"write {n} for {'one example' if n == 1 else f'{n} examples'}" if n is not None
           else "write a whole number of examples")
    raise TunelabError(f"{key}: {_show(value)} is neither a count (an integer) nor a fraction below 1: {fix}, "
                       "or a fraction below 1 (0.1 holds out a tenth)", loc.of(key))


def _build(cls: type, raw: dict, prefix: str, loc: _Located) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in raw.items():
        key = prefix + str(k)
        if k not in names:
            raise TunelabError(f"unknown key {_show_key(key)}{_suggest(key)}", loc.of(key))
        if names[k].metadata.get("count_or_fraction"):
            _check_count_or_fraction(v, key, loc)
        val = _coerce(v, hints[k], key, loc)
        choices = names[k].metadata.get("choices")
        if choices and val not in choices:
            raise TunelabError(f"{key}: must be one of {', '.join(choices)}; got {_show(val)}", loc.of(key))
        kwargs[k] = val
    return cls(**kwargs)


def parse_section(cls: type, raw: Any, where: str, prefix: str = "") -> Any:
    """A config section (dataclass) from a plain mapping read elsewhere, with the same checks as a recipe."""
    loc = _Located()
    loc.default = where
    if not isinstance(raw, dict):
        raise TunelabError(f"{prefix.rstrip('.') or 'entry'}: expected a mapping, got {_show(raw)}", where)
    return _build(cls, raw, prefix, loc)


class _TooDeep(Exception):
    def __init__(self, mark: Any):
        super().__init__()
        self.mark = mark


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader that stops composing past MAX_YAML_DEPTH levels (before Python's recursion limit)
    and reports a value Python cannot hold (an integer of 5000 digits, 30 February) as a YAML error with its
    line instead of a bare ValueError."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self.depth += 1
        try:
            if self.depth > MAX_YAML_DEPTH:
                raise _TooDeep(self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, ArithmeticError) as e:
            problem = ("an integer of more than 4300 digits" if "integer string conversion" in str(e)
                       else f"cannot read this value ({one_line(e)})")
            raise yaml.constructor.ConstructorError(None, None, problem, node.start_mark) from None


def _children(node: Any) -> list:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _expansion_problem(root: Any) -> tuple[str, Any] | None:
    """What is wrong with a composed YAML tree read with its aliases expanded (as every walk over the loaded
    value sees it): more than MAX_YAML_NODES values, deeper than MAX_YAML_DEPTH, or holding itself.
    Linear in the distinct nodes: each node's expanded size and depth is computed once, without recursion."""
    done: dict[int, tuple[int, int]] = {}  # id(node) -> (values, depth), aliases expanded
    open_: set[int] = set()  # the nodes on the path from the root: one seen again holds itself
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, leaving = stack.pop()
        kids = _children(node)
        if leaving:
            open_.discard(id(node))
            size = 1 + sum(done[id(k)][0] for k in kids)
            depth = 1 + max((done[id(k)][1] for k in kids), default=0)
            if size > MAX_YAML_NODES:
                return (f"aliases expand this YAML to more than {MAX_YAML_NODES:,} values (a recipe has a few "
                        "dozen): write the values out instead of nesting aliases", node.start_mark)
            if depth > MAX_YAML_DEPTH:
                return f"nested more than {MAX_YAML_DEPTH} levels deep (aliases expanded)", node.start_mark
            done[id(node)] = (size, depth)
        elif id(node) in done:
            continue
        elif id(node) in open_:
            return "an alias refers to a value that holds it (a recursive structure): write the values out", \
                node.start_mark
        else:
            open_.add(id(node))
            stack.append((node, True))
            stack.extend((k, False) for k in kids)
    return None


_MERGE_TAG = "tag:yaml.org,2002:merge"


def _duplicate_key(root: Any, prefix: str = "") -> tuple[str, Any, Any] | None:
    """The first key given twice in one mapping: (dotted key, its first key node, its second). PyYAML keeps
    the second silently; `<<` merges are not repeats (a mapping's own keys override merged ones)."""
    seen: set[int] = set()
    stack: list[tuple[Any, str]] = [(root, prefix)]
    while stack:
        node, pre = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[tuple[str, str], Any] = {}
            later = []
            for knode, vnode in node.value:
                if isinstance(knode, yaml.ScalarNode) and knode.tag != _MERGE_TAG:
                    ident = (knode.tag, knode.value)
                    if ident in first:
                        return pre + knode.value, first[ident], knode
                    first[ident] = knode
                    later.append((vnode, f"{pre}{knode.value}."))
                else:
                    later += [(knode, pre), (vnode, pre)]
            stack.extend(reversed(later))
        elif isinstance(node, yaml.SequenceNode):
            base = pre[:-1] if pre else ""
            stack.extend(reversed([(item, f"{base}[{i}].") for i, item in enumerate(node.value)]))
    return None


def _load_yaml(text: str, where: str, prefix: str = "", filename: str | None = None) -> tuple[Any, dict[str, str]]:
    """YAML text -> (its value, dotted key -> 'file:line' when ``filename`` is given), with the bounds above
    and no repeated keys. Refusals are TunelabErrors at ``where`` (``filename:line`` for a file); a text
    that is not YAML raises yaml.YAMLError, for the caller to word."""

    def at(mark: Any) -> str:
        return f"{filename}:{mark.line + 1}" if filename and mark is not None else where

    loader = _BoundedLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except _TooDeep as e:
            raise TunelabError(f"nested more than {MAX_YAML_DEPTH} levels deep (a recipe needs a few)",
                               at(e.mark)) from None
        if node is None:
            return None, {}
        problem = _expansion_problem(node)
        if problem is not None:
            raise TunelabError(problem[0], at(problem[1]))
        dup = _duplicate_key(node, prefix)
        if dup is not None:
            key, first, second = dup
            also = f" (first on line {first.start_mark.line + 1})" if filename else ""
            raise TunelabError(f"{_show_key(key)} is given twice{also}: YAML would silently keep only the last; "
                               "give it once", at(second.start_mark))
        lines = _key_lines(node, filename) if filename else {}
        return loader.construct_document(node), lines
    except RecursionError:  # not expected past the bounds above; never a traceback
        raise TunelabError("nested too deeply to read", where) from None
    finally:
        loader.dispose()


def read_yaml(text: str, where: str) -> Any:
    """A YAML document with the bounds a recipe has (alias expansion, depth, no repeated keys): for other
    files tunelab reads back, such as a run's config.yaml in a report. Anything wrong is one TunelabError."""
    try:
        return _load_yaml(text, where, filename=where)[0]
    except yaml.YAMLError as e:
        raise TunelabError(f"invalid YAML: {one_line(getattr(e, 'problem', None) or e)[:120]}", where) from None


def _key_lines(root: Any, filename: str) -> dict[str, str]:
    """dotted key -> 'file:line' for every key of a composed YAML mapping tree (bounded by _load_yaml)."""
    out: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for knode, vnode in node.value:
                if not isinstance(knode, yaml.ScalarNode):
                    continue  # a mapping or list as a key: refused when the value is built
                key = prefix + str(knode.value)
                out[key] = f"{filename}:{knode.start_mark.line + 1}"
                walk(vnode, key + ".")
        elif isinstance(node, yaml.SequenceNode) and prefix:  # a list's items: key[i] (instruct.tasks[1].weight)
            for i, item in enumerate(node.value):
                key = f"{prefix[:-1]}[{i}]"
                out[key] = f"{filename}:{item.start_mark.line + 1}"
                walk(item, key + ".")

    walk(root, "")
    return out


def _field_type(key: str) -> Any:
    """The type hint of a dotted key (None if unknown)."""
    cls: Any = Config
    tp: Any = None
    for part in key.split("."):
        sub = _dataclass_of(cls) if cls is not None else None
        if sub is None:
            return None
        hints = typing.get_type_hints(sub)
        if part not in hints:
            return None
        tp = cls = hints[part]
    return tp


def _is_text_field(tp: Any) -> bool:
    return tp is str or (typing.get_origin(tp) in (Union, types.UnionType)
                         and str in typing.get_args(tp) and not any(
                             typing.get_origin(a) is list or dataclasses.is_dataclass(a) for a in typing.get_args(tp)))


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise TunelabError(f"expected key=value, got {_show(item)}", "override")
    key, _, text = item.partition("=")
    key = key.strip()
    try:
        value = _load_yaml(text, _override_where(item), prefix=key + ".")[0] if text.strip() else None
    except yaml.YAMLError:
        value = text
    except TunelabError:  # past the bounds (or a key given twice): refused, unless the text is the value
        if not _is_text_field(_field_type(key)):
            raise
        value = text
    if isinstance(value, (dict, list)) and _is_text_field(_field_type(key)):
        value = text  # a template such as eval.display={name} is text, not a YAML mapping
    elif (value is None or isinstance(value, str)) and _is_text_field(_field_type(key)) and _drops_comment(text):
        value = text  # data.prompt=Item #1: {name}: the '#' is the template's, not a YAML comment
    return key, value


def _drops_comment(text: str) -> bool:
    """Whether YAML would read part of ``text`` as a comment (and so drop it)."""
    m = re.search(r"(^|\s)#", text)
    if m is None:
        return False
    try:
        before = text[: m.start()]
        whole = _load_yaml(text, "override")[0]
        return _load_yaml(before, "override")[0] == whole if before.strip() else whole is None
    except (yaml.YAMLError, TunelabError):
        return False


def _set_dotted(raw: dict, key: str, value: Any, loc: _Located) -> None:
    parts = key.split(".")
    node = raw
    for i, p in enumerate(parts[:-1]):
        sub = node.get(p)
        here = ".".join(parts[: i + 1])
        if sub is None:
            sub = node[p] = {}
        elif isinstance(sub, str) and here in _SHORTHAND:
            sub = node[p] = {_SHORTHAND[here]: sub}
        elif not isinstance(sub, dict):
            raise TunelabError(f"{here} is not a section; cannot set {key}", loc.of(key))
        node = sub
    node[parts[-1]] = value


def _resolve_source_paths(raw: dict, base: Path) -> None:
    """Data paths in a recipe are relative to the recipe file."""
    data = raw.get("data")
    if not isinstance(data, dict):
        return
    for split in _SOURCE_KEYS:
        src = data.get(split)
        if isinstance(src, str):
            src = data[split] = {"path": src}
        if isinstance(src, dict) and isinstance(src.get("path"), str):
            src["path"] = os.path.realpath(base / os.path.expanduser(src["path"]))
    instruct = raw.get("instruct")
    tasks = instruct.get("tasks") if isinstance(instruct, dict) else None
    for task in tasks if isinstance(tasks, list) else []:
        src = task.get("source") if isinstance(task, dict) else None
        if isinstance(src, str):
            src = task["source"] = {"path": src}
        if isinstance(src, dict) and isinstance(src.get("path"), str):
            src["path"] = os.path.realpath(base / os.path.expanduser(src["path"]))
    sni = raw.get("sni")
    if isinstance(sni, dict) and isinstance(sni.get("dir"), str):
        sni["dir"] = os.path.realpath(base / os.path.expanduser(sni["dir"]))
    ev = raw.get("eval")
    for key in ("variations", "control"):
        value = ev.get(key) if isinstance(ev, dict) else None
        if isinstance(value, str) and value.endswith(_FILE_SUFFIXES):  # a file, not a built-in task's name
            ev[key] = os.path.realpath(base / os.path.expanduser(value))
    chat = raw.get("chat")
    if isinstance(chat, dict):
        chat["template"] = _template_file(chat.get("template"), base)


def _template_file(value: Any, base: Path) -> Any:
    """chat.template naming a Jinja file relative to ``base`` (the recipe's folder; the working directory
    for an override) -> its absolute path, so that the run finds it from anywhere. Anything else stays as
    written: a template's name, or a path that is not a file there (a run's saved config.yaml keeps a path
    written before paths were resolved, relative to the working directory as it was then)."""
    from .data.chat import SHIPPED

    if not isinstance(value, str) or value in ("auto", "model", *SHIPPED):
        return value
    path = base / os.path.expanduser(value)
    try:
        is_file = path.is_file()
        if not is_file and path.exists() and not path.is_dir():
            raise TunelabError("not a regular file (a device, FIFO or socket): a chat template is a .jinja file",
                               str(path))
    except OSError:  # a name too long for a file name: not a file, so a template's name (refused later)
        is_file = False
    return os.path.realpath(path) if is_file else value


_RUN_FILES = ("data_stats.json", "metrics.jsonl", "checkpoints", ".tunelab")  # beside a run's config.yaml


def _file_kind(mode: int) -> str:
    kinds = [(stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")]
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def _read_recipe(p: Path, where: str) -> str:
    """A recipe's text: a regular file (a FIFO or a device would block or never end) of at most
    MAX_RECIPE_BYTES, opened without blocking and read no further than that."""
    too_big = f"larger than {MAX_RECIPE_BYTES // 2**20} MiB: a recipe is a small YAML file (is this the right file?)"
    try:
        st = os.stat(p)
        if not stat.S_ISREG(st.st_mode):
            raise TunelabError(f"{_file_kind(st.st_mode)}, not a recipe file: give a YAML file", where)
        if st.st_size > MAX_RECIPE_BYTES:
            raise TunelabError(too_big, where)
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
        with os.fdopen(fd, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if not stat.S_ISREG(mode):  # replaced between the two looks
                raise TunelabError(f"{_file_kind(mode)}, not a recipe file: give a YAML file", where)
            data = f.read(MAX_RECIPE_BYTES + 1)
    except OSError as e:
        raise TunelabError(f"cannot read the recipe: {e.strerror or e}", where) from None
    if len(data) > MAX_RECIPE_BYTES:
        raise TunelabError(too_big, where)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise TunelabError(f"not UTF-8 text ({e.reason} at byte {e.start})", where) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")  # as Path.read_text gave it (universal newlines)


_BLANK_HINT = {"output.dir": "leave it out (or null) to write runs/<name>, or give a directory",
               "model": "give a model alias, directory or hub id",
               "model.name": "give a model alias, directory or hub id"}


def _check_strings(value: Any, key: str, loc: _Located) -> None:
    """Every string in ``value`` (at ``key``; a whole recipe when key is ""), before any path is resolved: no
    NUL character and nothing Python cannot write as UTF-8 (a lone surrogate); a file, directory or model key
    never empty (null or leaving it out gives the default)."""
    if isinstance(value, dict):
        for k, v in value.items():
            _check_strings(v, f"{key}.{k}" if key else str(k), loc)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_strings(v, f"{key}[{i}]", loc)
    elif isinstance(value, str):
        plain = _unindexed(key)
        if "\x00" in value:
            raise TunelabError(f"{_show_key(key)}: contains a NUL character (\\0)", loc.of(key))
        try:
            value.encode("utf-8", "surrogateescape" if plain in _PATH_KEYS and plain != "output.dir" else "strict")
        except UnicodeEncodeError:
            raise TunelabError(f"{_show_key(key)}: {_show(value)} is not valid UTF-8 text (a lone surrogate, or "
                               "bytes that are not UTF-8)", loc.of(key)) from None
        if plain in _PATH_KEYS and not value.strip():
            hint = _BLANK_HINT.get(plain, "give a path, or leave it out (or null) for the default")
            raise TunelabError(f"{_show_key(key)}: empty: {hint}", loc.of(key))


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a recipe (or a run's saved config.yaml), apply overrides, validate."""
    loc = _Located()
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if p.is_dir() and (p / "config.yaml").exists():
            p = p / "config.yaml"
        if not p.exists():
            raise TunelabError("recipe not found", str(path))
        if p.is_dir():
            raise TunelabError("a directory, not a recipe file (nor a run directory with config.yaml)", str(path))
        text = _read_recipe(p, str(path))
        try:
            loaded, lines = _load_yaml(text, str(path), filename=str(path))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            raise TunelabError(f"invalid YAML: {one_line(getattr(e, 'problem', e))}", where) from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise TunelabError("a recipe must be a YAML mapping of sections", str(path))
        raw = loaded
        loc.where.update(lines)
        loc.default = str(path)
        loc.saved_run = p.name == "config.yaml" and any((p.parent / n).exists() for n in _RUN_FILES)
        _check_strings(raw, "", loc)
        _resolve_source_paths(raw, Path(os.path.realpath(p.parent)))
        raw.setdefault("name", p.stem if p.name != "config.yaml" else p.parent.name)
    cwd = Path.cwd()
    for item in overrides:
        key, value = parse_override(item)
        where = _override_where(item)
        loc.where[key] = where
        if key not in all_keys():
            raise TunelabError(f"unknown key {_show_key(key)}{_suggest(key)}", where)
        if key in _PATH_KEYS and not item.partition("=")[2].strip():
            raise TunelabError(f"{key}: empty value (an unset shell variable?): give one, or write {key}=null "
                               "for the default", where)
        if key in _SHORTHAND and isinstance(value, str):  # model=X sets model.name, keeping the section
            key = f"{key}.{_SHORTHAND[key]}"
            loc.where[key] = where
        _check_strings(value, key, loc)
        _set_dotted(raw, key, value, loc)
        parts = key.split(".")
        if len(parts) == 3 and parts[0] == "data" and parts[1] in _SOURCE_KEYS and parts[2] == "path":
            src = raw["data"][parts[1]]
            if isinstance(src.get("path"), str):  # paths given on the command line are relative to the cwd
                src["path"] = os.path.realpath(cwd / os.path.expanduser(src["path"]))
        if key in ("eval.variations", "eval.control") and isinstance(value, str) and value.endswith(_FILE_SUFFIXES):
            raw["eval"][parts[1]] = os.path.realpath(cwd / os.path.expanduser(value))
        if key == "chat.template":
            raw["chat"]["template"] = _template_file(value, cwd)
        if key == "sni.dir" and isinstance(value, str):
            raw["sni"]["dir"] = os.path.realpath(cwd / os.path.expanduser(value))
    cfg = _build(Config, raw, "", loc)
    _check(cfg, loc)
    return cfg


def _check(cfg: Config, loc: _Located) -> None:
    """Cross-field rules that types alone cannot express."""

    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise TunelabError(f"{key}: {msg}", loc.of(key))

    t = cfg.train
    need(t.batch_size >= 1, "train.batch_size", "must be at least 1")
    need(t.grad_accum >= 1, "train.grad_accum", "must be at least 1")
    need(t.epochs >= 1, "train.epochs", "must be at least 1")
    need(t.max_steps is None or t.max_steps >= 1, "train.max_steps", "must be at least 1")
    need(t.lr > 0, "train.lr", "must be positive")
    need(math.isfinite(t.lr), "train.lr", "must be finite")
    need(t.weight_decay >= 0, "train.weight_decay", "must be non-negative")
    need(t.warmup_steps >= 0, "train.warmup_steps", "must be non-negative")
    need(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", "must be in [0, 1]")
    need(t.max_grad_norm is None or t.max_grad_norm > 0, "train.max_grad_norm", "must be positive")
    need(t.dropout is None or 0 <= t.dropout < 1, "train.dropout", "must be in [0, 1)")
    need(t.keep_checkpoints >= 1, "train.keep_checkpoints", "must be at least 1")
    need(t.loss_chunk >= 1, "train.loss_chunk", "must be at least 1")
    need(t.pack_length >= 2, "train.pack_length", "must be at least 2")
    need(0 <= t.adam_beta1 < 1, "train.adam_beta1", "must be in [0, 1)")  # AdamW's own bounds
    need(0 <= t.adam_beta2 < 1, "train.adam_beta2", "must be in [0, 1)")
    need(t.adam_eps >= 0, "train.adam_eps", "must be non-negative")
    for key in _SEED_KEYS:
        section, _, leaf = key.partition(".")
        seed = getattr(getattr(cfg, section), leaf)
        need(0 <= seed < SEED_LIMIT, key,
             f"a seed is a whole number from 0 to 2**32 - 1 ({SEED_LIMIT - 1}), got {seed}")
    need(cfg.output.dir is not None or bool(cfg.name.strip()), "name",
         "empty: the run's directory is runs/<name>: give a name (or output.dir)")
    if t.compile:
        import torch
        import torch._dynamo

        need(hasattr(torch.compiler, "set_stance"), "train.compile",
             f"needs torch >= 2.6 (this is {torch.__version__})")

        backends = torch._dynamo.list_backends(exclude_tags=())
        need(t.compile_backend in backends, "train.compile_backend",
             f"unknown torch.compile backend {t.compile_backend!r} (one of: {', '.join(backends)})")
    need(not t.packing or (cfg.task != "classification" and cfg.kd.teacher is None), "train.packing",
         "packing applies to supervised fine-tuning of a causal LM (not classification or token-level distillation)")
    for k in ("log_every", "eval_every", "checkpoint_every"):
        need(getattr(t, k) >= 0, f"train.{k}", "must be non-negative")
    if t.early_stopping_patience is not None:
        need(t.early_stopping_patience >= 1, "train.early_stopping_patience", "must be at least 1")
        need(t.eval_every > 0, "train.eval_every", "early stopping needs periodic evaluation: set train.eval_every")
        need(t.best_metric == "val_loss" or cfg.eval.during_training, "eval.during_training",
             f"train.best_metric={t.best_metric} is measured during training only with eval.during_training=true")
    need(t.mode != "freeze" or bool(t.trainable), "train.trainable",
         "mode=freeze needs at least one parameter-name pattern to train")
    if t.resume is False or t.resume in ("false", "False", "no"):
        t.resume = "never"
    elif t.resume is True or t.resume in ("true", "True", "yes"):
        t.resume = "auto"
    need(cfg.lora.r >= 1, "lora.r", "must be at least 1")
    need(cfg.lora.alpha > 0, "lora.alpha", "must be positive")
    need(0 <= cfg.lora.dropout < 1, "lora.dropout", "must be in [0, 1)")
    need(bool(cfg.lora.targets), "lora.targets", "must name at least one module (or all-linear)")
    d = cfg.data
    need(d.train is not None or cfg.sni.dir is not None
         or (bool(cfg.instruct.tasks) and all(tc.source is not None for tc in cfg.instruct.tasks)),
         "data.train", "a training source is required")
    need(d.max_length >= 2, "data.max_length", "must be at least 2")
    for k in ("validation_size", "test_size"):
        v = getattr(d, k)
        need(v >= 0 and (v < 1 or float(v).is_integer()), f"data.{k}", "must be a count or a fraction in [0, 1)")
    need(d.train_size is None or d.train_size >= 1, "data.train_size", "must be at least 1")
    for split in _SOURCE_KEYS:
        src = getattr(d, split)
        if src is not None:
            need((src.path is None) != (src.dataset is None), f"data.{split}",
                 "give exactly one of path or dataset")
    if cfg.task == "classification":
        check_template(cfg.classify.text, loc.of("classify.text"))
        check_template(cfg.classify.label, loc.of("classify.label"))
        if cfg.classify.labels is not None:
            need(len(cfg.classify.labels) >= 2, "classify.labels", "needs at least two classes")
            need(len(set(cfg.classify.labels)) == len(cfg.classify.labels), "classify.labels", "has duplicates")
    need(t.precision != "mixed" or cfg.model.dtype in ("bfloat16", "auto"), "train.precision",
         f"mixed autocasts to bfloat16: set model.dtype=bfloat16 (it is {cfg.model.dtype})")
    need(cfg.model.dtype != "float16" or t.mode == "lora", "model.dtype",
         "float16 training without loss scaling is unstable: use float32 or bfloat16 (or mode=lora)")
    need(d.weight_field is None or cfg.task != "classification", "data.weight_field",
         "example weights are for generation and chat tasks")
    need(d.completion_tokens == "bpe" or cfg.task == "generation", "data.completion_tokens",
         f"chars is for generation completions; a {cfg.task} task keeps the tokenizer's tokens")
    sy = d.synthetic
    need(sy.count >= 0, "data.synthetic.count", "must be non-negative")
    need(sy.order >= 1, "data.synthetic.order", "must be at least 1")
    if sy.count:
        need(sy.field is not None, "data.synthetic.field", "name the record field to synthesise (e.g. name)")
        need(cfg.task == "generation" and d.format == "template" and d.formatter is None
             and not cfg.instruct.tasks and cfg.sni.dir is None, "data.synthetic",
             "synthetic records are for template-formatted generation data (task: generation)")
        need(d.weight_field is None, "data.synthetic",
             f"synthetic records have no {d.weight_field!r} field to weight them by (data.weight_field)")
        other = sorted({f for tpl in (d.prompt, d.completion) for f in fields_of(tpl)} - {sy.field})
        need(not other, "data.synthetic.field",
             f"synthetic records have only the field {sy.field!r}, but the templates use {', '.join(other)}")
    k = cfg.kd
    if k.teacher is not None or k.cache is not None:
        need(cfg.task in ("generation", "chat"), "kd.teacher", "distillation is for generation and chat tasks")
        need(k.temperature > 0, "kd.temperature", f"must be positive, got {k.temperature}")
        need(0 <= k.alpha <= 1, "kd.alpha", f"must be in [0, 1], got {k.alpha}")
        need(0 < k.beta < 1, "kd.beta", f"must be in (0, 1), got {k.beta}")
        need(k.top_k >= 1, "kd.top_k", "must be at least 1")
        need(k.chunk >= 1, "kd.chunk", "must be at least 1")
        need(k.teacher is not None, "kd.teacher", "kd.cache needs the teacher it caches (kd.teacher)")
    if cfg.instruct.tasks:
        need(cfg.task == "generation", "instruct.tasks",
             f"instruction-tuning tasks are a generation task, not {cfg.task}")
    if t.early_stopping_patience is not None:
        need(not cfg.instruct.tasks and cfg.sni.dir is None, "train.early_stopping_patience",
             "early stopping would choose the checkpoint on the held-out templates and tasks it then reports; "
             "not with instruct.tasks or sni.dir")
    sn = cfg.sni
    if sn.dir is not None:
        need(cfg.task == "generation", "sni.dir", "Super-NaturalInstructions tasks are a generation task")
        need(not cfg.instruct.tasks, "sni.dir", "give sni.dir or instruct.tasks, not both")
        need(sn.positive >= 0 and sn.negative >= 0, "sni.positive", "example counts must be non-negative")
        need(sn.definition or sn.positive > 0, "sni.definition",
             "an encoding needs the definition or at least one positive example")
        need(sn.train_instances is None or sn.train_instances >= 1, "sni.train_instances", "must be at least 1")
        need(sn.eval_instances >= 1, "sni.eval_instances", "must be at least 1")
    e = cfg.eval
    if e.display:
        check_template(e.display, loc.of("eval.display"))
    need(e.max_new_tokens >= 1, "eval.max_new_tokens", "must be at least 1")
    need(e.max_examples is None or e.max_examples >= 1, "eval.max_examples", "must be at least 1 (or null: all)")
    need(e.batch_size >= 1, "eval.batch_size", "must be at least 1")


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    d = cfg.to_dict()
    for k in ("validation_size", "test_size"):  # a count is written as an integer: 500, not 500.0 (a fraction's form)
        v = d["data"][k]
        if isinstance(v, float) and v >= 1 and v.is_integer():
            d["data"][k] = int(v)
    Path(path).write_text(yaml.safe_dump(d, sort_keys=False))
