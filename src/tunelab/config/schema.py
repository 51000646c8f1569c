"""The recipe's schema: every section and key with its type and default. Defaults live here and only here."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

# The choices a run is made of, named once (a checker sees a misspelt task; the parser refuses one)
Task = Literal["generation", "classification", "chat"]
Mode = Literal["full", "lora", "head", "freeze"]
Precision = Literal["auto", "pure", "mixed"]
Device = Literal["auto", "cpu", "cuda"]


_COUNT_OR_FRACTION = {"count_or_fraction": True}  # an integer is a count, a float below 1 a fraction


@dataclass
class ModelConfig:
    """The base model: what to load, in which dtype, on which device. ``model: NAME`` is short for ``model.name``."""

    name: str = field(default="smollm2-135m-instruct", metadata={
        "help": "a built-in alias (smollm2-135m-instruct), a local Hugging Face model directory, or a hub id "
                "(owner/name, or gpt2)"})
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = field(default="float32", metadata={
        "help": "the weights' dtype; auto: bfloat16 on a GPU that has it, else float32 (float16 only with "
                "train.mode=lora: no loss scaling)"})
    device: Device = field(default="auto", metadata={"help": "auto: cuda when a GPU is available, else cpu"})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "run the model repository's own Python code (transformers' trust_remote_code): only for code you "
                "trust"})
    revision: str | None = field(default=None, metadata={
        "help": "a hub model's branch, tag or commit (default: the main branch)"})
    allow_pickle: bool = field(default=False, metadata={
        "help": "load pickle weights (.bin/.pt), which can run code: only for files you trust (default: "
                "safetensors only)"})
    init: Literal["pretrained", "random"] = field(default="pretrained", metadata={
        "help": "random: the same architecture and tokenizer with fresh weights (seeded by model.init_seed), to "
                "measure what pre-training is worth"})
    init_seed: int = field(default=0, metadata={"help": "the seed of a random initialisation (model.init=random)"})
    attention: Literal["auto", "eager", "sdpa", "flex_attention", "flash_attention_2"] = field(
        default="auto", metadata={"help": "the attention kernel (transformers' attn_implementation); auto: "
                                          "transformers' choice"})
    bos_token: str | None = field(default=None, metadata={
        "help": "a special token put before every text the tokenizer encodes with special tokens (prompts, not "
                "chat renderings), as Llama's tokenizer puts BOS; for tokenizers that add none (SmolLM2's: "
                "\"<|endoftext|>\", its pre-training document separator), so that a prompt's first word is not "
                "at position 0. Refused with task: chat and for a tokenizer that already adds special tokens"})


@dataclass
class SourceConfig:
    """Where records come from: a file (by extension or ``format``) or an HF dataset by name."""

    path: str | None = field(default=None, metadata={
        "help": "a data file, relative to the recipe (on the command line: to the current directory)"})
    format: Literal["auto", "jsonl", "json", "csv", "parquet", "text"] = field(default="auto", metadata={
        "help": "auto: from the file's extension; text: one record a line"})
    dataset: str | None = field(default=None, metadata={
        "help": "a `datasets` name, loaded with load_dataset(dataset, subset, split) (needs the hub or a local "
                "cache); give either path or dataset"})
    subset: str | None = field(default=None, metadata={"help": "the data set's configuration (subset) name"})
    split: str = field(default="train", metadata={"help": "the data set's split to load"})
    text_field: str = field(default="text", metadata={"help": "the field name given to each line of a plain-text file"})


@dataclass
class ColumnsConfig:
    """Field names of the instruction formats, for data sets that name them differently."""

    instruction: str = field(default="instruction", metadata={"help": "alpaca / self-instruct: the instruction"})
    input: str = field(default="input", metadata={"help": "alpaca: the optional input (may be empty)"})
    output: str = field(default="output", metadata={"help": "alpaca: the answer"})
    system: str = field(default="system_prompt", metadata={"help": "openorca: the system prompt"})
    question: str = field(default="question", metadata={"help": "openorca: the question"})
    response: str = field(default="response", metadata={"help": "openorca: the answer"})


@dataclass
class SyntheticConfig:
    """Extra training records: strings sampled from a character n-gram model of one field's training values
    (none equal to a real or held-out value), formatted by the recipe's templates like the real ones."""

    # `dataclasses.field` below: this class has a field named `field`, which hides the function after it
    field: str | None = dataclasses.field(default=None, metadata={
        "help": "the record field to model and fill (e.g. name); the templates may use only this field"})
    count: int = dataclasses.field(default=0, metadata={
        "help": "distinct strings to add as training records (0: none); fewer where a length runs out of novel "
                "strings"})
    order: int = dataclasses.field(default=4, metadata={
        "help": "n of the character n-gram: each character given the previous order - 1"})
    lengths: Literal["observed", "uniform"] = dataclasses.field(default="observed", metadata={
        "help": "the strings' lengths: observed (the field's own distribution) or uniform (an equal share for "
                "every length from the shortest value's to the longest's: as many long strings as short ones)"})


@dataclass
class DataConfig:
    """Records, splits, templates and how examples are tokenized."""

    train: SourceConfig | None = field(default=None, metadata={
        "help": "the training records: a path (short for {path: ...}) or a source section"})
    validation: SourceConfig | None = field(default=None, metadata={
        "help": "a validation source (default: held out of train by data.validation_size)"})
    test: SourceConfig | None = field(default=None, metadata={
        "help": "a test source (default: held out of train by data.test_size)"})
    validation_size: float = field(default=0, metadata={**_COUNT_OR_FRACTION, "help": (
        "held out of train when there is no validation source: a count (an integer: 500) or a fraction below 1 "
        "(0.1) of what test_size leaves; seeded by data.split_seed")})
    test_size: float = field(default=0, metadata={**_COUNT_OR_FRACTION, "help": (
        "held out of train when there is no test source: a count or a fraction below 1")})
    split_seed: int | None = field(default=None, metadata={
        "help": "the seed of the records held out by validation_size and test_size (default: train.seed): fixed, "
                "the same records are held out whatever train.seed is"})
    unique_by: str | None = field(default=None, metadata={
        "help": "drop records whose value of this field was seen before (before splitting), e.g. name"})
    train_size: int | None = field(default=None, metadata={
        "help": "keep at most this many training records (after the split)"})
    prompt: str = field(default="{prompt}", metadata={
        "help": "template over record fields: {field} or {field|filter|...}, e.g. \"Reverse the name: {name}. "
                "Answer:\""})
    completion: str = field(default="{completion}", metadata={
        "help": "template over record fields giving the target, e.g. \" {name|reverse}\""})
    formatter: str | None = field(default=None, metadata={
        "help": "\"module:function\" taking a record and returning {\"prompt\": ..., \"completion\": ...}, "
                "instead of the templates"})
    format: Literal["template", "alpaca", "openorca"] = field(default="template", metadata={
        "help": "template: data.prompt and data.completion; alpaca: instruction, input, output into the Alpaca "
                "prompt; openorca: system_prompt, question, response (names from data.columns)"})
    columns: ColumnsConfig = field(default_factory=ColumnsConfig, metadata={
        "help": "field names of the alpaca and openorca formats"})
    max_length: int = field(default=512, metadata={"help": "tokens of an example, prompt and completion together"})
    truncation: Literal["drop", "truncate", "error"] = field(default="drop", metadata={
        "help": "an example longer than data.max_length: drop it (counted), truncate its completion, or stop with "
                "an error"})
    empty_target: Literal["error", "drop"] = field(default="error", metadata={
        "help": "an example whose completion is empty: an error, or dropped and counted"})
    add_eos: bool = field(default=True, metadata={
        "help": "append the EOS token to the completion and train on it (the model learns to stop)"})
    completion_tokens: Literal["bpe", "chars"] = field(default="bpe", metadata={
        "help": "how completions become tokens: bpe (the tokenizer's usual merges) or chars (one token per "
                "character, the same text: spelling tasks such as reversal no longer need a token's letters from "
                "memory); chars is for generation tasks"})
    group_by_length: bool = field(default=True, metadata={
        "help": "batch examples of similar length together (seeded order per epoch): less padding"})
    weight_field: str | None = field(default=None, metadata={
        "help": "a numeric record field that weights each example's loss (e.g. a score; the loss is a weighted "
                "mean, weight 0 drops an example); generation and chat tasks"})
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig, metadata={
        "help": "extra training records from a character n-gram model of one field"})


@dataclass
class TrainConfig:
    """What trains and how: the optimiser, schedule, checkpoints, stopping and the speed paths."""

    mode: Mode = field(default="lora", metadata={
        "help": "full: every parameter; lora: LoRA adapters (and a classifier's head); head: the output or "
                "classification head only; freeze: the parameters matching train.trainable"})
    trainable: list[str] = field(default_factory=list, metadata={
        "help": "fnmatch patterns of parameter names that train with mode=freeze, e.g. [model.layers.29.*, "
                "model.norm.*]"})
    epochs: int = field(default=1, metadata={"help": "passes over the training set"})
    max_steps: int | None = field(default=None, metadata={"help": "optimizer steps; overrides epochs when set"})
    batch_size: int = field(default=8, metadata={
        "help": "examples per micro-batch (under several processes: the global micro-batch, a multiple of the "
                "number of processes)"})
    grad_accum: int = field(default=1, metadata={
        "help": "micro-batches per optimizer step (the loss is normalised by the step's supervised tokens, so "
                "accumulation is exact)"})
    lr: float = field(default=1e-4, metadata={"help": "peak learning rate of AdamW"})
    weight_decay: float = field(default=0.0, metadata={
        "help": "AdamW's decoupled weight decay, on matrices only (never on biases and norm weights)"})
    schedule: Literal["constant", "linear", "cosine"] = field(default="linear", metadata={
        "help": "the learning rate after warmup: constant, or linear or cosine decay to lr·min_lr_ratio at the last "
                "step"})
    warmup_steps: int = field(default=0, metadata={"help": "steps of linear warmup up to train.lr"})
    min_lr_ratio: float = field(default=0.0, metadata={
        "help": "the learning rate at the last step of a linear or cosine schedule, as a fraction of train.lr"})
    max_grad_norm: float | None = field(default=1.0, metadata={
        "help": "clip the gradient's global norm to this (null: no clipping)"})
    precision: Precision = field(default="auto", metadata={
        "help": "auto: mixed for full fine-tuning where model.dtype is bfloat16, else pure; pure: weights, "
                "gradients and AdamW in model.dtype; mixed: float32 weights and optimizer, the forward pass "
                "autocast to bfloat16 (updates too small for bfloat16 are not lost)"})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW's beta1"})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW's beta2"})
    adam_eps: float = field(default=1e-8, metadata={"help": "AdamW's epsilon"})
    dropout: float | None = field(default=None, metadata={
        "help": "overrides the model's dropout probabilities (null: the model's own)"})
    seed: int = field(default=0, metadata={
        "help": "one seed for the data split (unless data.split_seed), order, initialisation and dropout"})
    log_every: int = field(default=10, metadata={
        "help": "a log line every N steps when not on a terminal (a progress bar on one)"})
    eval_every: int = field(default=0, metadata={"help": "validation loss every N steps (0: only at the end)"})
    checkpoint_every: int = field(default=0, metadata={
        "help": "a checkpoint every N steps (0: only at the end; one is always written at the end)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "the latest checkpoints kept; older ones are deleted"})
    resume: str | bool = field(default="never", metadata={
        "help": "never | auto (the latest complete checkpoint) | path to a checkpoint directory (true: auto, "
                "false: never); --resume is auto"})
    loss_chunk: int = field(default=2048, metadata={
        "help": "supervised positions per lm_head chunk (the (B, T, V) logits are never materialised)"})
    nonfinite: Literal["stop", "skip"] = field(default="stop", metadata={
        "help": "a NaN/inf loss or gradient norm: stop with the step's number, or skip the step (no update; "
                "counted; ten in a row still stop)"})
    early_stopping_patience: int | None = field(default=None, metadata={
        "help": "stop after this many evaluations (every train.eval_every steps) without improvement; the best "
                "weights are kept and restored at the end"})
    best_metric: Literal["val_loss", "exact_match", "accuracy"] = field(default="val_loss", metadata={
        "help": "what early stopping and the best weights follow (exact_match and accuracy need "
                "eval.during_training)"})
    min_delta: float = field(default=0.0, metadata={"help": "an improvement must beat the best by more than this"})
    packing: bool = field(default=False, metadata={
        "help": "SFT: a micro-batch's examples end to end in rows of <= pack_length tokens (exact: each example "
                "attends only to itself)"})
    pack_length: int = field(default=8192, metadata={
        "help": "tokens of a packed row (train.packing; each example attends only to itself: position_ids "
                "restart, a block mask)"})
    compile: bool = field(default=False, metadata={
        "help": "torch.compile each decoder layer for training steps (opt-in: pays on a GPU, and on a CPU in mixed "
                "precision over a few hundred steps; slower in float32 on a CPU); evaluation and generation run "
                "eager"})
    compile_backend: str = field(default="inductor", metadata={
        "help": "torch.compile backend (aot_eager: compiles without code generation)"})
    parallel: Literal["ddp", "fsdp"] = field(default="ddp", metadata={
        "help": "several processes (torchrun, accelerate launch): replicate (DDP) or shard (FSDP2)"})


@dataclass
class LoraConfig:
    """LoRA adapters (train.mode=lora): W = W0 + (alpha/r)·B·A on the targeted linear layers."""

    r: int = field(default=16, metadata={"help": "the rank (at most the narrowest targeted layer's width)"})
    alpha: float = field(default=32, metadata={"help": "the scale is alpha/r"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapters' input"})
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"], metadata={
        "help": "module names to adapt, as PEFT matches them (q_proj, v_proj; GPT-2: c_attn, c_proj, c_fc), or "
                "[all-linear] (every linear and Conv1D layer but the output head)"})
    layers: list[int] | None = field(default=None, metadata={
        "help": "only these decoder layers get adapters (null: all)"})


@dataclass
class ClassifyConfig:
    """task: classification - p(y|x) = softmax(W h + b) on the pooled hidden state h."""

    text: str = field(default="{text}", metadata={"help": "template over record fields: the input x"})
    label: str = field(default="{label}", metadata={
        "help": "template over record fields giving the class, e.g. {label} or {name|vowels}"})
    labels: list[str] | None = field(default=None, metadata={
        "help": "the label set in order; default: read from the training data"})
    pooling: Literal["last", "first", "mean"] = field(default="last", metadata={
        "help": "the hidden state the head reads: the last non-padding token (found from the attention mask), "
                "the first, or the mean (first and mean suit encoder-style models)"})
    bias: bool = field(default=False, metadata={
        "help": "b; transformers' *ForSequenceClassification heads have none (export needs false)"})


@dataclass
class ChatConfig:
    """task: chat - conversations rendered with a chat template, loss on assistant turns."""

    format: Literal["auto", "messages", "sharegpt", "lmsys", "openorca"] = field(default="auto", metadata={
        "help": "the records' shape; auto tells them apart by their fields"})
    column: str | None = field(default=None, metadata={
        "help": "the record field holding the conversation (default: by format)"})
    template: str = field(default="auto", metadata={
        "help": "auto (the tokenizer's, else chatml) | model | chatml | llama3 | path to a .jinja file (relative "
                "to the recipe)"})
    stop: str | None = field(default=None, metadata={
        "help": "the end-of-turn token (default: the shipped template's, else EOS)"})
    system: str | None = field(default=None, metadata={"help": "the default system prompt"})
    system_mode: Literal["record", "default", "none"] = field(default="record", metadata={
        "help": "record: the record's own system prompt, else the default; default: always the default; none: no "
                "system prompt of ours (a template may add its own)"})
    system_fallback: Literal["fold", "drop", "drop_record"] = field(default="fold", metadata={
        "help": "where the chat template refuses a system message (Gemma 2): fold it into the first user turn "
                "(what Gemma 3's template does), drop it, or drop the conversation; the log counts each"})
    train_on: Literal["all_assistant", "last_assistant", "all"] = field(default="all_assistant", metadata={
        "help": "the tokens that carry the loss: every assistant turn (with its end-of-turn token), the last one, "
                "or every token"})


@dataclass
class KDConfig:
    """Token-level knowledge distillation: loss = (1 - alpha)·CE + alpha·T²·D(teacher ‖ student)."""

    teacher: str | None = field(default=None, metadata={
        "help": "a run directory (a LoRA teacher is merged), model directory, alias or hub id; null: no "
                "distillation. It must share the student's tokenizer"})
    alpha: float = field(default=0.5, metadata={
        "help": "weight of the distillation term (1: soft labels only; 0: plain SFT)"})
    temperature: float = field(default=1.0, metadata={
        "help": "T: both distributions are softened by it, and the term is scaled by T²"})
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = field(default="forward_kl", metadata={
        "help": "D: forward KL (the soft-label cross-entropy's gradient), reverse KL, or generalised "
                "Jensen-Shannon (kd.beta)"})
    beta: float = field(default=0.5, metadata={"help": "generalised JSD: m = beta·q + (1 - beta)·p"})
    teacher_dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(default="auto", metadata={
        "help": "the teacher's dtype (auto: model.dtype)"})
    teacher_device: Device = field(default="auto", metadata={
        "help": "the teacher's device (auto: cuda when the student is on cuda, else cpu)"})
    cache: str | None = field(default=None, metadata={
        "help": "a file of the teacher's top-k log-probabilities: written once, then reused (no teacher in "
                "memory); both distributions are then restricted to those k tokens"})
    top_k: int = field(default=64, metadata={"help": "tokens kept per position in the cache"})
    chunk: int = field(default=1024, metadata={"help": "supervised positions per logits chunk"})


@dataclass
class TemplateConfig:
    """One template of a task: a prompt pattern and a target pattern over the record's fields."""

    prompt: str = field(default="", metadata={"help": "template over the record's fields (and {options})"})
    completion: str = field(default="", metadata={"help": "template giving the target (and {answer}, {option_key})"})
    name: str | None = field(default=None, metadata={"help": "default: \"<task>/<index>\""})


@dataclass
class TaskConfig:
    """One task of an instruction-tuning mixture (FLAN-style: several templates per task)."""

    name: str = field(default="", metadata={"help": "the task's name (default: the built-in task's name)"})
    builtin: str | None = field(default=None, metadata={
        "help": "a built-in task over names (its templates; data: names.txt): reverse, count_vowels, "
                "first_letter, last_letter, uppercase, length, spell, starts_with_vowel"})
    source: SourceConfig | None = field(default=None, metadata={
        "help": "its records (default: data.train); split by data.validation_size and data.test_size"})
    templates: list[TemplateConfig] = field(default_factory=list, metadata={
        "help": "the task's templates, added to the built-in ones"})
    options: list[str] | None = field(default=None, metadata={
        "help": "FLAN options rendered into {options}; the answer into {option_key}"})
    options_field: str | None = field(default=None, metadata={"help": "or a record field holding the list of options"})
    answer: str = field(default="{answer}", metadata={"help": "template giving the correct option's text"})
    options_style: Literal["dash", "letter", "number"] = field(default="dash", metadata={
        "help": "dash (FLAN's \"OPTIONS:\\n- yes\"), letter (\"(A) yes\") or number (\"1. yes\")"})
    shuffle_options: bool = field(default=False, metadata={
        "help": "shuffle the options of each example (seeded); {option_key} follows the answer"})
    weight: float = field(default=1.0, metadata={"help": "mixing weight (instruct.mixing=weighted)"})
    cap: int | None = field(default=None, metadata={
        "help": "at most this many of its records (default: instruct.cap); weighted mixing may repeat them"})
    held_out_templates: list[int | str] = field(default_factory=list, metadata={
        "help": "indices or names of templates used for evaluation only"})


@dataclass
class InstructConfig:
    """Instruction tuning over a mixture of tasks, each with a set of templates."""

    tasks: list[TaskConfig] = field(default_factory=list, metadata={
        "help": "the tasks of the mixture, e.g. [{builtin: reverse, held_out_templates: [1, 3], weight: 2}, "
                "{name: ..., templates: [...]}]"})
    choose: Literal["random", "round_robin"] = field(default="random", metadata={
        "help": "each training example's template: random (seeded) or in turn"})
    mixing: Literal["proportional", "weighted"] = field(default="proportional", metadata={
        "help": "proportional: min(examples, cap) of each task (FLAN); weighted: instruct.total split by the "
                "tasks' weights"})
    cap: int | None = field(default=None, metadata={
        "help": "examples-proportional mixing: at most this many examples of a task (FLAN's K)"})
    total: int | None = field(default=None, metadata={
        "help": "weighted mixing: training examples in all (default: the capped sum)"})
    held_out_tasks: list[str] = field(default_factory=list, metadata={
        "help": "tasks trained on none of their templates: evaluated only (unseen-task generalisation)"})
    eval_templates: Literal["all", "held_out", "train"] = field(default="all", metadata={
        "help": "the templates scored: all, the held-out ones, or the trained ones"})


@dataclass
class SNIConfig:
    """Super-NaturalInstructions-style tasks: one JSON file a task (Definition, Positive Examples,
    Negative Examples, Instances), trained on some tasks and evaluated on unseen ones."""

    dir: str | None = field(default=None, metadata={"help": "a directory of task files (*.json)"})
    eval_tasks: list[str] = field(default_factory=list, metadata={
        "help": "held-out tasks (file stems): evaluated, never trained"})
    train_tasks: list[str] = field(default_factory=list, metadata={"help": "default: every task not held out"})
    definition: bool = field(default=True, metadata={
        "help": "the prompt encoding: the task's definition (\"Definition: ...\")"})
    positive: int = field(default=2, metadata={"help": "the prompt encoding: k positive examples (0, 1, 2, ...)"})
    negative: int = field(default=0, metadata={"help": "the prompt encoding: negative examples"})
    explanations: bool = field(default=False, metadata={"help": "the prompt encoding: the examples' explanations"})
    train_instances: int | None = field(default=500, metadata={
        "help": "at most this many instances of each training task"})
    eval_instances: int = field(default=100, metadata={
        "help": "instances of each evaluation task (eval.max_examples, if lower, caps it)"})


@dataclass
class EvalConfig:
    """What is evaluated before and after training, and how."""

    before: bool = field(default=True, metadata={"help": "evaluate the base model too, for the before/after table"})
    generate: bool = field(default=True, metadata={
        "help": "greedy generation + exact match (generation and chat tasks; classification is scored by accuracy)"})
    split: Literal["auto", "validation", "test"] = field(default="auto", metadata={
        "help": "the split scored; auto: test if there is one, else validation"})
    max_examples: int | None = field(default=None, metadata={
        "help": "score at most this many examples (per task and template for instruction tuning; null: all)"})
    max_new_tokens: int = field(default=32, metadata={
        "help": "tokens generated per answer (must cover the longest answer; a warning says when it does not)"})
    batch_size: int = field(default=64, metadata={
        "help": "examples per batch of evaluation (validation loss, generation, classification)"})
    show: int = field(default=10, metadata={"help": "rows of the before/after table"})
    display: str | None = field(default=None, metadata={
        "help": "template over record fields for the table's input column (default: prompt)"})
    during_training: bool = field(default=False, metadata={"help": "also score generation at every train.eval_every"})
    variations: str | None = field(default=None, metadata={
        "help": "prompt variations scored before/after: a built-in task (reverse, ...) or a YAML/JSON file of "
                "{prompt, completion} templates"})
    control: str | None = field(default=None, metadata={
        "help": "a control set (JSONL) scored before/after: what else fine-tuning changed"})


@dataclass
class OutputConfig:
    """The run directory and what goes into it."""

    dir: str | None = field(default=None, metadata={"help": "the run directory (default: runs/<name>)"})
    overwrite: bool = field(default=False, metadata={
        "help": "replace an existing run directory (only one tunelab made, or an empty one)"})
    save_model: bool = field(default=True, metadata={"help": "write adapter/ or model/ at the end"})
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"], metadata={
        "help": "trackers: tensorboard, wandb, mlflow; [none]: only metrics.jsonl"})


@dataclass
class Config:
    """A recipe: every section, with its defaults."""

    name: str = field(default="run", metadata={
        "help": "the run's name (default: the recipe's file stem); the run directory is runs/<name>"})
    description: str = field(default="", metadata={"help": "one line, shown by `tunelab recipes`"})
    task: Task = field(default="generation", metadata={
        "help": "generation: prompt → completion; classification: a head over the pooled hidden state; "
                "chat: conversations through a chat template"})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "the base model"})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "records, splits, templates"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "what trains and how"})
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"help": "LoRA adapters (train.mode=lora)"})
    classify: ClassifyConfig = field(default_factory=ClassifyConfig, metadata={
        "help": "the classification head (task: classification)"})
    chat: ChatConfig = field(default_factory=ChatConfig, metadata={"help": "conversations (task: chat)"})
    kd: KDConfig = field(default_factory=KDConfig, metadata={"help": "token-level knowledge distillation"})
    instruct: InstructConfig = field(default_factory=InstructConfig, metadata={
        "help": "instruction tuning over a mixture of tasks and templates"})
    sni: SNIConfig = field(default_factory=SNIConfig, metadata={"help": "Super-NaturalInstructions-style task files"})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "evaluation before and after"})
    output: OutputConfig = field(default_factory=OutputConfig, metadata={"help": "the run directory"})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
