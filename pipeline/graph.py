"""The stage graph, in run order. Each stage is a module in stages/ with run() and published()."""
from .stage import Stage

STAGES = [
    Stage("data", "stages.data", "data", (), "built-in task data (JSONL train / held-out)"),
    Stage("teacher", "stages.teacher", "teacher", ("data",), "the teacher model: a local HF dir or the built-in one"),
    Stage("generate", "stages.generate", "generate", ("data", "teacher"), "prompts -> token sequences"),
    Stage("score", "stages.score", "score", ("teacher", "generate"), "teacher top-k logits -> Arrow cache"),
    Stage("distill", "stages.distill", "distill", ("data", "teacher", "generate", "score"),
          "a student trained from the cache"),
]
