"""The `modelserve` command line: build the demo models, serve, benchmark, load-test.

Each subcommand imports its heavy modules lazily so `modelserve --help` stays instant.
"""

from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger("modelserve")


def _build(args: argparse.Namespace) -> int:
    from training.build import build_zoo

    build_zoo(preset=args.preset, out_dir=args.out, force=args.force)
    return 0


def _serve(args: argparse.Namespace) -> int:
    if args.ray:
        from service.ray_app import serve_ray

        return serve_ray(args)
    from service.api.server import serve

    return serve(args)


def _bench(args: argparse.Namespace) -> int:
    from bench.run import run_benchmarks

    return run_benchmarks(
        names=args.only, tiny=args.tiny, out_dir=args.out, report=args.report, claims_only=args.claims_only
    )


def _loadtest(args: argparse.Namespace) -> int:
    from loadtest.__main__ import main as loadtest_main

    return loadtest_main(args.args, prog="modelserve loadtest")


# Settings with their own flags above (pairs, choices) and settings no flag can express (lists, dicts).
EXPLICIT_FLAGS = {"host", "port", "device", "models", "adapters", "drafts", "quantization", "ray_address"}
# vLLM's names for the same settings, so a `vllm serve` command line mostly carries over.
VLLM_ALIASES = {
    "max_adapters": ["--max-loras"],
    "max_batch_size": ["--max-num-seqs"],
    "max_tokens_per_step": ["--max-num-batched-tokens"],
    "kv_block_size": ["--block-size"],
    "num_draft_tokens": ["--num-speculative-tokens"],
}
SETTING_DEST = "setting_"  # argparse dest prefix of the generated flags


def settings_help() -> dict[str, str]:
    """Each setting's help: the comment lines just above its field in service/settings.py and the comment
    at the end of its line (the settings are documented there, once)."""
    import inspect
    import re

    from service.settings import Settings

    helps: dict[str, str] = {}
    above: list[str] = []
    for line in inspect.getsource(Settings).splitlines():
        stripped = line.strip()
        field = re.match(r"^(\w+): .*?(?:#\s*(.*))?$", stripped)
        if stripped.startswith("# ----") or not stripped:
            above = []
        elif stripped.startswith("#"):
            above.append(stripped.lstrip("# "))
        elif field and line.startswith("    ") and not line.startswith("     "):
            helps[field.group(1)] = " ".join([*above, field.group(2) or ""]).strip()
            above = []
    return helps


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per scalar setting of `service.settings.Settings` (--max-model-len, --compile-decode /
    --no-compile-decode, ...), plus vLLM's aliases, `--api-key` (repeatable) and `--enforce-eager`."""
    import types
    import typing
    from pathlib import Path

    from service.settings import Settings

    group = parser.add_argument_group("settings (each also MODELSERVE_<NAME> in the environment)")
    helps = settings_help()
    for name, field in Settings.model_fields.items():
        if name in EXPLICIT_FLAGS:
            continue
        kind = field.annotation
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # X | None
            kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
        flags = [f"--{name.replace('_', '-')}", *VLLM_ALIASES.get(name, [])]
        dest = SETTING_DEST + name
        text = f"{helps.get(name, '')} (default: {field.default})".replace("%", "%%").strip()
        if kind is bool:
            group.add_argument(*flags, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif typing.get_origin(kind) is typing.Literal:
            choices = list(typing.get_args(kind))
            group.add_argument(*flags, dest=dest, choices=choices, default=None, help=text)
        elif kind in (int, float, str, Path):
            metavar = kind.__name__.upper()
            group.add_argument(*flags, dest=dest, type=kind, default=None, metavar=metavar, help=text)
    group.add_argument(
        "--api-key",
        dest=SETTING_DEST + "api_keys",
        action="append",
        default=None,
        help="a key user routes accept (repeatable; vLLM's flag)",
    )
    group.add_argument(
        "--enforce-eager",
        dest=SETTING_DEST + "compile_decode",
        action="store_false",
        default=None,
        help="never compile (vLLM's flag; = --no-compile-decode)",
    )


def settings_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The settings given as generated flags (None: not given)."""
    return {
        key[len(SETTING_DEST) :]: value
        for key, value in vars(args).items()
        if key.startswith(SETTING_DEST) and value is not None
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modelserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    build = sub.add_parser("build", help="train the demo models into artifacts/")
    build.add_argument("--preset", choices=["tiny", "demo", "large"], default="demo")
    build.add_argument("--out", default="artifacts")
    build.add_argument("--force", action="store_true", help="rebuild artifacts that already exist")
    build.set_defaults(func=_build)

    serve = sub.add_parser("serve", help="serve models over the OpenAI-compatible HTTP API")
    serve.add_argument("--config", help="settings file (JSON or .env)")
    serve.add_argument("--model", action="append", default=[], metavar="NAME=DIR")
    serve.add_argument(
        "--adapter",
        "--lora-modules",
        dest="adapter",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="a PEFT LoRA adapter loaded at start (repeatable; --lora-modules is vLLM's name)",
    )
    serve.add_argument(
        "--draft",
        action="append",
        default=[],
        metavar="TARGET=DRAFT",
        help="speculative decoding: DRAFT (a served model, or `ngram` for prompt lookup) drafts for TARGET",
    )
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=int, default=None)
    serve.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    serve.add_argument(
        "--quantization",
        choices=["int8"],
        default=None,
        help="quantize every --model's weights to int8 as it loads (vLLM's spelling); per model: the "
        "`quantization` setting",
    )
    serve.add_argument("--ray", action="store_true", help="run as a Ray Serve application (replicas, autoscaling)")
    serve.add_argument("--ray-address", default=None, help="with --ray: the cluster to join (default: a local one)")
    add_settings_flags(serve)
    serve.set_defaults(func=_serve)

    bench = sub.add_parser("bench", help="run the side-by-side benchmarks into reports/")
    bench.add_argument("--only", action="append", default=None, help="benchmark name (repeatable)")
    bench.add_argument("--tiny", action="store_true", help="smallest sizes: proves the benchmark runs")
    bench.add_argument("--report", action="store_true", help="run, then write CLAIMS.md (the claims report)")
    bench.add_argument(
        "--claims-only", action="store_true", help="run nothing; rewrite CLAIMS.md from the JSON already in --out"
    )
    bench.add_argument("--out", default="reports")
    bench.set_defaults(func=_bench)

    # Every argument goes to `python -m loadtest` as is (main() hands them over before argparse sees them).
    loadtest = sub.add_parser(
        "loadtest", add_help=False, help="run a Locust scenario against a server (--api-key for a secured one)"
    )
    loadtest.add_argument("args", nargs=argparse.REMAINDER)
    loadtest.set_defaults(func=_loadtest)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["loadtest"]:  # its own parser (and --help): argparse would take `--scenario` as ours
        return _loadtest(argparse.Namespace(args=argv[1:]))
    args = build_parser().parse_args(argv)
    return args.func(args)
