"""`modelserve serve` flags generated from the Settings fields, with vLLM's aliases."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelserve.cli import EXPLICIT_FLAGS, build_parser
from service.api.server import settings_from_args
from service.settings import Settings


def parse(*argv: str) -> Settings:
    return settings_from_args(build_parser().parse_args(["serve", *argv]))


def test_generated_and_vllm_flags_reach_the_settings():
    settings = parse(
        "--max-num-seqs",
        "4",
        "--max-num-batched-tokens",
        "64",
        "--block-size",
        "8",
        "--max-model-len",
        "128",
        "--compile-decode",
        "--no-enable-prefix-caching",
        "--dtype",
        "bfloat16",
        "--api-key",
        "k1",
        "--api-key",
        "k2",
        "--compile-cache-dir",
        "/tmp/cc",
        "--retry-after-s",
        "3",
    )
    assert (settings.max_batch_size, settings.max_tokens_per_step, settings.kv_block_size) == (4, 64, 8)
    assert settings.max_model_len == 128 and settings.compile_decode and not settings.enable_prefix_caching
    assert settings.dtype == "bfloat16" and settings.retry_after_s == 3
    assert [key.get_secret_value() for key in settings.api_keys] == ["k1", "k2"]
    assert str(settings.compile_cache_dir) == "/tmp/cc"
    assert not parse("--compile-decode", "--enforce-eager").compile_decode


def test_flags_not_given_leave_environment_and_defaults(monkeypatch):
    monkeypatch.setenv("MODELSERVE_MAX_MODEL_LEN", "512")
    assert parse().max_model_len == 512
    assert parse("--max-model-len", "256").max_model_len == 256  # a flag beats the environment
    assert parse().enable_prefix_caching is True


def test_every_scalar_setting_has_a_flag():
    help_text = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    for name, field in Settings.model_fields.items():
        scalar = "list" not in str(field.annotation) and "dict" not in str(field.annotation)
        if scalar and name not in EXPLICIT_FLAGS:
            assert f"--{name.replace('_', '-')}" in help_text, name


def test_an_invalid_flag_value_is_refused_by_name():
    with pytest.raises(ValueError, match="max_model_len"):
        parse("--max-model-len", "2")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--max-num-seqs", "many"])


def test_vllm_adapter_and_template_flags(tmp_path):
    args = build_parser().parse_args(["serve", "--lora-modules", "a=/x", "--adapter", "b=/y", "--max-loras", "3"])
    settings = settings_from_args(args)
    assert settings.adapters == {"a": Path("/x"), "b": Path("/y")} and settings.max_adapters == 3
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert parse("--chat-template", str(template)).chat_template_text() == template.read_text()
    assert parse("--chat-template", "{{ messages[0].content }}").chat_template_text() == "{{ messages[0].content }}"
    with pytest.raises(ValueError, match="chat_template"):
        parse("--chat-template", str(tmp_path / "missing.jinja"))


def test_help_text_comes_from_the_settings_comments():
    help_text = " ".join(build_parser()._subparsers._group_actions[0].choices["serve"].format_help().split())
    assert "Cap on prompt + output tokens per sequence" in help_text  # max_model_len's comment
    assert "--max-batch-size INT, --max-num-seqs INT" in help_text
