"""Chat templates render exactly as `transformers` renders them: a Llama-3-style and a ChatML template
with a system message, several turns, `{% break %}`, `strftime_now`, `raise_exception` and `tojson`."""

from __future__ import annotations

import pytest

from service.api.chat import render
from service.api.errors import APIError
from service.api.schemas import ChatMessage
from tests.service.engine_fixtures import tiny_tokenizer

LLAMA3 = (
    "{{- bos_token }}{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Today Date: ' + strftime_now('%d %b %Y') + '\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}{%- for message in messages %}"
    "{%- if message['role'] == 'tool' %}{{- raise_exception('tool messages are not supported') }}{%- endif %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{- message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
CHATML = (
    "{% for message in messages %}{% if loop.index > 3 %}{% break %}{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TOJSON = "{{ messages | tojson }}{{ {'k': '<b>&é'} | tojson(indent=2) }}"
CONVERSATION = [
    {"role": "system", "content": "You are terse. <b>Really</b> & é"},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Bye"},
]


def hf_render(template: str, conversation: list[dict], add_generation_prompt: bool = True) -> str:
    from transformers import PreTrainedTokenizerFast

    ours = tiny_tokenizer()
    hf = PreTrainedTokenizerFast(tokenizer_object=ours.tokenizer, bos_token="<s>", eos_token="</s>")
    return hf.apply_chat_template(
        conversation, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
    )


@pytest.mark.parametrize("template", [LLAMA3, CHATML, TOJSON], ids=["llama3", "chatml-break", "tojson"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_templates_render_as_transformers_does(template, add_generation_prompt):
    messages = [ChatMessage(**m) for m in CONVERSATION]
    ours = render(messages, template, "<s>", "</s>", add_generation_prompt)
    assert ours == hf_render(template, CONVERSATION, add_generation_prompt)


def test_break_stops_the_loop_and_tojson_does_not_escape_html():
    messages = [ChatMessage(**m) for m in CONVERSATION]
    assert render(messages, CHATML, "<s>", "</s>").count("<|im_start|>") == 4  # 3 turns + the generation prompt
    assert '"You are terse. <b>Really</b> & é"' in render(messages, TOJSON, "<s>", "</s>")


def test_raise_exception_is_a_400():
    with pytest.raises(APIError) as refused:
        render([ChatMessage(role="tool", content="x")], LLAMA3, "<s>", "</s>")
    assert refused.value.status == 400 and "tool messages are not supported" in refused.value.message
