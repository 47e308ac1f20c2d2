"""Chat templates: the model's own, or a built-in one for base models that ship none. Torch-free.

A job's `chat_template` picks one (docs/job-spec.md): `auto` (the model's own where it has one, else
`plain`), `model`, `plain` or `chatml`. The template used is saved with the adapter, so a serving stack
formats prompts exactly as training did.
"""

import json
from pathlib import Path

BUILT_IN = ("plain", "chatml")
CHOICES = ("auto", "model", *BUILT_IN)

# Plain-text role markers with the tokenizer's own BOS and EOS: works with any vocabulary.
_PLAIN = (  # no `{%-`: it would strip the blank lines that separate the turns
    "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n{% endif %}"
    "{% for message in messages if message['role'] != 'system' %}"
    "{% if message['role'] == 'user' %}### User:\n{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'assistant' %}### Assistant:\n{{ message['content'] }}{{ eos_token }}\n\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)
# ChatML, for vocabularies that carry `<|im_start|>` and `<|im_end|>` as special tokens (base Qwen, SmolLM2).
_CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")


def built_in_template(name: str, *, bos_token: str | None) -> str:
    """The built-in template `name`, starting with the BOS token where the tokenizer adds one to plain text."""
    body = {"plain": _PLAIN, "chatml": _CHATML}[name]
    return ("{{ bos_token }}" + body) if bos_token else body


def has_chat_template(model_dir: Path) -> bool:
    """Whether a Hugging Face model folder ships a chat template (read from its files, no tokenizer loaded)."""
    if (model_dir / "chat_template.jinja").is_file() or (model_dir / "chat_template.json").is_file():
        return True
    try:
        return bool(json.loads((model_dir / "tokenizer_config.json").read_text()).get("chat_template"))
    except (OSError, ValueError):
        return False


def resolve_choice(choice: str, model_has_template: bool) -> str:
    """`auto` made concrete: the model's own template where it has one, else the plain built-in."""
    if choice == "auto":
        return "model" if model_has_template else "plain"
    return choice
