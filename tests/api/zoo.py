"""A tiny zoo for the HTTP tests: random llama (with a chat template) and mixtral (without), PEFT adapters."""

from __future__ import annotations

from pathlib import Path

from models import save_model
from tests.adapters.test_multi_lora import make_peft_adapter
from tests.service.engine_fixtures import tiny_model, tiny_tokenizer

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}[{{ message['role'] }}] {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
)
ADAPTERS = {"a1": (4, 1), "a2": (8, 2), "a3": (2, 3)}  # name -> (rank, seed)


def build_zoo(root: Path) -> dict[str, Path]:
    """{name: dir} for models "tiny" and "moe" and adapters of "tiny"; adapters live under root/adapters."""
    tokenizer = tiny_tokenizer()
    paths: dict[str, Path] = {}
    for name, moe, template in (("tiny", False, CHAT_TEMPLATE), ("moe", True, None)):
        model = tiny_model(tokenizer.vocab_size, seed=1, moe=moe)
        directory = root / name
        save_model(model, directory)
        config = dict(tokenizer.config)
        if template:
            config["chat_template"] = template
        type(tokenizer)(tokenizer.tokenizer, config).save(directory)
        paths[name] = directory
    for name, (rank, seed) in ADAPTERS.items():
        paths[name] = root / "adapters" / name
        make_peft_adapter(paths["tiny"], paths[name], rank, seed, targets=["q_proj", "v_proj", "o_proj"])
    return paths
