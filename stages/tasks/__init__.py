"""Built-in tasks. Each module offers write_data(out, cfg, seed), build_tokenizer(train_path, cfg) and,
when its answers can be checked, is_correct(response_text, row)."""
from . import arithmetic, dialogue

TASKS = {"math": arithmetic, "dialogue": dialogue}
