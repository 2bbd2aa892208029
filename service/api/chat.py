"""Chat templating: messages -> prompt text, with the model's own Jinja template or a documented default.

The template comes from the model's `tokenizer_config.json` (`chat_template`, as Hugging Face
stores it) and is rendered in Jinja's sandbox (templates come with model files: they must not reach
Python internals). Models without one use `DEFAULT_CHAT_TEMPLATE`, which is the demo zoo's format:

    <bos><|system|>\\n{content}\\n<|user|>\\n{content}\\n<|assistant|>\\n

Message content may be a string or a list of OpenAI text parts (`{"type": "text", "text": ...}`).
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from service.api.errors import APIError
from service.api.schemas import ChatMessage

DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token or '' }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(value, indent=None, ensure_ascii=False, separators=None, sort_keys=False) -> str:
    """`tojson` as `transformers` defines it for chat templates: plain JSON, no HTML escaping."""
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@lru_cache(maxsize=16)
def _compile(template: str):
    """The environment `transformers` renders chat templates in: sandboxed, `{% break %}`/`{% continue %}`,
    `tojson` without HTML escaping, `raise_exception`, `strftime_now` (Llama 3's date line)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def message_text(message: ChatMessage, index: int) -> str:
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise APIError(400, f"messages[{index}].content: only text parts are supported", param="messages")
        parts.append(part["text"])
    return "".join(parts)


def render(
    messages: list[ChatMessage],
    template: str | None,
    bos_token: str | None,
    eos_token: str | None,
    add_generation_prompt: bool = True,
) -> str:
    """The prompt text for `messages` (the template decides whether it starts with the BOS token)."""
    plain = [
        {"role": m.role, "content": message_text(m, i), **({"name": m.name} if m.name else {})}
        for i, m in enumerate(messages)
    ]
    try:
        return _compile(template or DEFAULT_CHAT_TEMPLATE).render(
            messages=plain,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token or "",
            eos_token=eos_token or "",
        )
    except TemplateError as exc:
        raise APIError(400, f"the model's chat template refused the messages: {exc}", param="messages") from exc
