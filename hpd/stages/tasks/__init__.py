"""Built-in tasks. Each module offers write_data(out, cfg, seed) and, when it trains its own teacher,
build_tokenizer(train_path, cfg); when its answers can be checked, is_correct(response_text, row). `chat` is
prompts only, for a given instruct teacher (--config smollm2); `code` is code instructions for a given code teacher,
kept apart from HumanEval (--config qwen-coder)."""

from . import arithmetic, chat, code, dialogue

TASKS = {"math": arithmetic, "dialogue": dialogue, "chat": chat, "code": code}
