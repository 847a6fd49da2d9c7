"""Built-in tasks. Each module offers write_data(out, cfg, seed) and, when it trains its own teacher,
build_tokenizer(train_path, cfg); when its answers can be checked, is_correct(response_text, row). `chat` is
prompts only, for a given instruct teacher (--config smollm2)."""

from . import arithmetic, chat, dialogue

TASKS = {"math": arithmetic, "dialogue": dialogue, "chat": chat}
