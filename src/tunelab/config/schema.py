"""The recipe's schema: every section and key with its type and default. Defaults live here and only here."""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union

# The choices a run is made of, named once (a checker sees a misspelt task; the parser refuses one)
Task = Literal["generation", "classification", "chat"]
Mode = Literal["full", "lora", "head", "freeze"]
Precision = Literal["auto", "pure", "mixed"]


_COUNT_OR_FRACTION = {"count_or_fraction": True}  # an integer is a count, a float below 1 a fraction


@dataclass
class ModelConfig:
    name: str = "smollm2-135m-instruct"  # built-in alias, local directory, or hub id
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    trust_remote_code: bool = False
    revision: str | None = None
    allow_pickle: bool = False  # load pickle weights (.bin/.pt), which can run code: only for files you trust
    init: Literal["pretrained", "random"] = "pretrained"  # random: same config,
    init_seed: int = 0  # fresh weights (seeded): pre-training's value, measured
    attention: Literal["auto", "eager", "sdpa", "flex_attention",
                       "flash_attention_2"] = "auto"  # attn_implementation
    # a special token put before every text the tokenizer encodes with special tokens (prompts, not chat
    # renderings), as Llama's tokenizer puts BOS; for tokenizers that add none (SmolLM2's: <|endoftext|>, its
    # pre-training document separator), so that a prompt's first word is not at position 0
    bos_token: str | None = None


@dataclass
class SourceConfig:
    """Where records come from: a file (by extension or ``format``) or an HF dataset by name."""

    path: str | None = None
    format: Literal["auto", "jsonl", "json", "csv", "parquet", "text"] = "auto"
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
    format: Literal["template", "alpaca", "openorca"] = "template"
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    max_length: int = 512
    truncation: Literal["drop", "truncate", "error"] = "drop"
    empty_target: Literal["error", "drop"] = "error"
    add_eos: bool = True
    # how completions become tokens: bpe (the tokenizer's usual merges) or chars (one token per character,
    # the same text: spelling tasks such as reversal no longer need a token's letters from memory)
    completion_tokens: Literal["bpe", "chars"] = "bpe"
    group_by_length: bool = True
    weight_field: str | None = None  # a numeric record field that weights each example's loss (e.g. a score)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class TrainConfig:
    mode: Mode = "lora"
    trainable: list[str] = field(default_factory=list)  # parameter-name patterns for mode=freeze
    epochs: int = 1
    max_steps: int | None = None  # overrides epochs when set
    batch_size: int = 8  # micro-batch
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    schedule: Literal["constant", "linear", "cosine"] = "linear"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    # auto: mixed for full fine-tuning where model.dtype is bfloat16, else pure | pure: weights, gradients and
    # AdamW in model.dtype | mixed: float32 weights and optimizer, the forward pass autocast to bfloat16
    # (updates too small for bfloat16 are not lost)
    precision: Precision = "auto"
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
    nonfinite: Literal["stop", "skip"] = "stop"  # a NaN/inf loss or grad norm
    early_stopping_patience: int | None = None  # stop after this many evaluations without improvement
    best_metric: Literal["val_loss", "exact_match", "accuracy"] = "val_loss"
    min_delta: float = 0.0  # an improvement must beat the best by more than this
    packing: bool = False  # SFT: a micro-batch's examples end to end in rows of <= pack_length tokens
    pack_length: int = 8192  # (each example attends only to itself: position_ids restart, a block mask)
    compile: bool = False  # torch.compile each decoder layer (opt-in: measured slower on CPU; for GPUs)
    compile_backend: str = "inductor"  # torch.compile backend (aot_eager: compiles without code generation)
    parallel: Literal["ddp", "fsdp"] = "ddp"  # several processes: replicate or shard


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
    pooling: Literal["last", "first", "mean"] = "last"  # last non-padding token
    bias: bool = False  # b; transformers' *ForSequenceClassification heads have none (export needs false)


@dataclass
class ChatConfig:
    """task: chat - conversations rendered with a chat template, loss on assistant turns."""

    format: Literal["auto", "messages", "sharegpt", "lmsys", "openorca"] = "auto"
    column: str | None = None  # the record field holding the conversation (default: by format)
    template: str = "auto"  # auto (the tokenizer's, else chatml) | model | chatml | llama3 | path to .jinja
    stop: str | None = None  # the end-of-turn token (default: the shipped template's, else EOS)
    system: str | None = None  # the default system prompt
    system_mode: Literal["record", "default", "none"] = "record"
    train_on: Literal["all_assistant", "last_assistant", "all"] = "all_assistant"


@dataclass
class KDConfig:
    """Token-level knowledge distillation: loss = (1 - alpha)·CE + alpha·T²·D(teacher ‖ student)."""

    teacher: str | None = None  # a run directory, model directory, alias or hub id; null: no distillation
    alpha: float = 0.5  # weight of the distillation term (1: soft labels only; 0: plain SFT)
    temperature: float = 1.0
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    beta: float = 0.5  # generalised JSD: m = beta·q + (1 - beta)·p
    teacher_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    teacher_device: Literal["auto", "cpu", "cuda"] = "auto"
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
    options_style: Literal["dash", "letter", "number"] = "dash"
    shuffle_options: bool = False  # shuffle the options of each example (seeded)
    weight: float = 1.0  # mixing weight (instruct.mixing=weighted)
    cap: int | None = None  # at most this many of its records (default: instruct.cap); weighted mixing may repeat them
    held_out_templates: list[int | str] = field(default_factory=list)  # indices or names: evaluation only


@dataclass
class InstructConfig:
    """Instruction tuning over a mixture of tasks, each with a set of templates."""

    tasks: list[TaskConfig] = field(default_factory=list)
    choose: Literal["random", "round_robin"] = "random"  # template per example
    mixing: Literal["proportional", "weighted"] = "proportional"
    cap: int | None = None  # examples-proportional mixing: at most this many examples of a task (FLAN's K)
    total: int | None = None  # weighted mixing: training examples in all (default: the capped sum)
    held_out_tasks: list[str] = field(default_factory=list)  # trained on none of their templates
    eval_templates: Literal["all", "held_out", "train"] = "all"


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
    split: Literal["auto", "validation", "test"] = "auto"
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
    task: Task = "generation"
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
SHORTHAND = {"model": "name", "data.train": "path", "data.validation": "path", "data.test": "path",
              "instruct.tasks.source": "path"}
FILE_SUFFIXES = (".yaml", ".yml", ".json", ".jsonl")
SOURCE_KEYS = ("train", "validation", "test")

# Bounds on what is read: a recipe is a small text file; anything past these is a mistake or an attack (a
# "billion laughs" of nested aliases, a FIFO or /dev/zero given as the recipe), refused in one line.
MAX_RECIPE_BYTES = 1 << 20
MAX_YAML_NODES = 100_000  # values in a recipe or an override's value, with aliases expanded
MAX_YAML_DEPTH = 64  # nesting, with aliases expanded (a recipe needs about 6)
INT_LIMIT = 2**63  # an integer setting reaches torch and the tokenizers as a 64-bit integer
SEED_LIMIT = 2**32  # seeds: 32 bits, as numpy and most tools take (the data order uses seed * 100_003 + epoch)
SEED_KEYS = ("train.seed", "model.init_seed")
# Keys naming a file, a directory or a model (unindexed; shorthand sections too): an empty string is never
# meant (`output.dir=$UNSET` would silently write to the default)
PATH_KEYS = frozenset({"output.dir", "model", "model.name", "sni.dir", "kd.teacher", "kd.cache", "chat.template",
                        "eval.variations", "eval.control", "instruct.tasks.source", "instruct.tasks.source.path",
                        *(f"data.{s}" for s in SOURCE_KEYS), *(f"data.{s}.path" for s in SOURCE_KEYS)})


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every valid dotted key, for suggestions."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        keys.append(key)
        sub = dataclass_of(hints[f.name])
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


def dataclass_of(tp: Any) -> type | None:
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def unindexed(key: str) -> str:
    """A key with its list indices dropped: instruct.tasks[1].weight -> instruct.tasks.weight."""
    return re.sub(r"\[\d+\]", "", key)


def suggest(key: str) -> str:
    if len(key) > 200:
        return ""
    keys = all_keys()
    key = unindexed(key)
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if not close:
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in keys if k.rsplit(".", 1)[-1] == leaf][:1]
    return f" (did you mean {close[0]}?)" if close else ""



def field_type(key: str) -> Any:
    """The type hint of a dotted key (None if unknown)."""
    cls: Any = Config
    tp: Any = None
    for part in key.split("."):
        sub = dataclass_of(cls) if cls is not None else None
        if sub is None:
            return None
        hints = typing.get_type_hints(sub)
        if part not in hints:
            return None
        tp = cls = hints[part]
    return tp


def is_text_field(tp: Any) -> bool:
    return tp is str or (typing.get_origin(tp) in (Union, types.UnionType)
                         and str in typing.get_args(tp) and not any(
                             typing.get_origin(a) is list or dataclasses.is_dataclass(a) for a in typing.get_args(tp)))

