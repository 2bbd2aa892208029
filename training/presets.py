"""Sizes and budgets of the zoo for each preset: tiny (tests, < 60 s), demo (2 CPU cores, < 10 min), large.

Demo sizes were chosen from measured throughput on 2 idle CPU cores (float32, seq 128, batch 16):
4 x 256 dense ~5k tokens/s, 4 x 192 ~8k, 2 x 128 dense ~17k, 2 x 128 MoE 8x256 top-2 ~14k
(forward + backward + AdamW). Steps are fixed so that runs are reproducible; ``max_seconds`` is only
a safety cap for loaded machines (a capped run says so in its card).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Shape:
    hidden_size: int
    intermediate_size: int  # per expert for MoE
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None


@dataclass
class Stage:
    steps: int
    batch_size: int
    lr: float
    warmup: int
    eval_interval: int
    # Early stopping after this many validations without improvement (0: never).
    patience: int = 3
    weight_decay: float = 0.1
    dropout: float = 0.0
    sam_rho: float = 0.0
    layer_lr_decay: float = 1.0
    max_seconds: float | None = None


@dataclass
class DistillSpec:
    # Soft-target temperature T; the KL term is multiplied by T^2 (Hinton et al.).
    temperature: float = 2.0
    # Weight of the KL term; (1 - alpha) weights the cross-entropy on the data.
    alpha: float = 0.5


@dataclass
class AdapterJob:
    name: str
    base: str  # artifact name of the base model
    kind: str  # "task" (exact-match accuracy) or "domain" (held-out bits per byte)
    target: str  # task name (training.tasks) or domain name (training.data.DOMAINS)
    r: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class DraftSpec:
    """The speculative draft's data and training (training/draft_stage.py: DistillSpec on the teacher's outputs)."""

    num_layers: int = 1  # layers kept from the student
    prompt_len: int = 32  # longest corpus prompt before each teacher continuation
    min_prompt_len: int = 4  # shortest (each row's length is drawn between the two)
    gen_len: int = 64  # teacher tokens generated per prompt
    num_sequences: int = 1024  # training sequences (a held-out eighth measures agreement)
    generate_batch: int = 128
    temperature: float = 1.0  # KD temperature: agreement on the argmax wants the sharp distribution
    alpha: float = 0.5  # KD weight (the rest: CE on the teacher's greedy tokens)
    stage: Stage = field(
        default_factory=lambda: Stage(
            steps=400, batch_size=32, lr=2e-3, warmup=30, eval_interval=0, weight_decay=0.0, max_seconds=150
        )
    )


@dataclass
class Preset:
    name: str
    vocab_size: int
    seq_len: int
    # max_position_embeddings written to config.json (rotary works past seq_len, quality degrades).
    max_positions: int
    # Cap on training characters per domain (None: everything); the tiny preset keeps tokenizing fast.
    train_max_chars: int | None
    eval_tokens: int  # validation tokens per domain
    teacher: Shape
    teacher_stage: Stage
    student: Shape
    student_stage: Stage
    moe: Shape
    moe_stage: Stage
    task_stage: Stage
    domain_stage: Stage
    adapters: list[AdapterJob]
    task_train_examples: int = 4000
    task_test_examples: int = 200
    # μP base width for the teacher (None: standard parametrisation).
    teacher_mup_base_width: int | None = 128
    num_experts: int = 8
    top_k: int = 2
    router_aux_coef: float = 0.01
    router_z_coef: float = 1e-3
    distill: DistillSpec = field(default_factory=DistillSpec)
    draft: DraftSpec = field(default_factory=DraftSpec)
    domain_weights: dict[str, float] = field(default_factory=lambda: {"code": 0.7, "english": 0.3})
    val_fraction: float = 0.1
    seed: int = 0


ALL_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Task adapters also adapt the head: see training/tasks.py for why (rare letter tokens).
TASK_MODULES = (*ALL_MODULES, "lm_head")


def _adapters() -> list[AdapterJob]:
    return [
        AdapterJob("student-upper", "student", "task", "upper", r=16, alpha=32.0, target_modules=TASK_MODULES),
        AdapterJob("student-lower", "student", "task", "lower", r=16, alpha=32.0, target_modules=TASK_MODULES),
        AdapterJob("student-code", "student", "domain", "code", r=8, alpha=16.0, target_modules=ALL_MODULES),
        AdapterJob("moe-english", "moe", "domain", "english", r=8, alpha=16.0),
    ]


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        name="tiny",
        vocab_size=512,
        seq_len=64,
        max_positions=256,
        train_max_chars=300_000,
        eval_tokens=2048,
        teacher=Shape(64, 128, 2, 2),
        teacher_stage=Stage(steps=30, batch_size=8, lr=3e-3, warmup=5, eval_interval=15),
        student=Shape(32, 64, 1, 2),
        student_stage=Stage(steps=20, batch_size=8, lr=3e-3, warmup=5, eval_interval=10),
        moe=Shape(32, 32, 1, 2),
        moe_stage=Stage(steps=20, batch_size=8, lr=3e-3, warmup=5, eval_interval=10),
        task_stage=Stage(steps=20, batch_size=16, lr=3e-3, warmup=2, eval_interval=0, weight_decay=0.0),
        domain_stage=Stage(steps=10, batch_size=8, lr=2e-3, warmup=2, eval_interval=0, weight_decay=0.0),
        adapters=_adapters(),
        task_train_examples=200,
        task_test_examples=20,
        teacher_mup_base_width=32,
        draft=DraftSpec(
            prompt_len=16,
            min_prompt_len=2,
            gen_len=16,
            num_sequences=64,
            generate_batch=32,
            stage=Stage(steps=10, batch_size=8, lr=3e-3, warmup=2, eval_interval=0, weight_decay=0.0),
        ),
    ),
    "demo": Preset(
        name="demo",
        vocab_size=4096,
        seq_len=128,
        max_positions=1024,
        train_max_chars=None,
        eval_tokens=16384,
        teacher=Shape(192, 512, 4, 4),
        teacher_stage=Stage(steps=500, batch_size=16, lr=3e-3, warmup=30, eval_interval=100, max_seconds=120),
        student=Shape(128, 344, 2, 4),
        student_stage=Stage(steps=300, batch_size=16, lr=4e-3, warmup=30, eval_interval=100, max_seconds=70),
        moe=Shape(128, 256, 2, 4),
        moe_stage=Stage(steps=300, batch_size=16, lr=4e-3, warmup=30, eval_interval=100, max_seconds=50),
        task_stage=Stage(
            steps=2500, batch_size=32, lr=4e-3, warmup=100, eval_interval=0, weight_decay=0.0, max_seconds=90
        ),
        domain_stage=Stage(
            steps=100,
            batch_size=16,
            lr=2e-3,
            warmup=10,
            eval_interval=0,
            weight_decay=0.0,
            layer_lr_decay=0.8,
            max_seconds=20,
        ),
        adapters=_adapters(),
        # Standard parametrisation: at this budget it beat μP at the same LR (see training/README.md).
        teacher_mup_base_width=None,
    ),
    "large": Preset(
        name="large",
        vocab_size=8192,
        seq_len=256,
        max_positions=2048,
        train_max_chars=None,
        eval_tokens=65536,
        teacher=Shape(512, 1376, 8, 8),
        teacher_stage=Stage(steps=6000, batch_size=32, lr=2e-3, warmup=200, eval_interval=500, dropout=0.05),
        student=Shape(192, 512, 3, 6),
        student_stage=Stage(steps=4000, batch_size=32, lr=3e-3, warmup=200, eval_interval=500),
        moe=Shape(192, 384, 3, 6),
        moe_stage=Stage(steps=4000, batch_size=32, lr=3e-3, warmup=200, eval_interval=500),
        task_stage=Stage(steps=4000, batch_size=64, lr=3e-3, warmup=100, eval_interval=0, weight_decay=0.0),
        domain_stage=Stage(
            steps=600, batch_size=32, lr=1e-3, warmup=50, eval_interval=0, weight_decay=0.0, layer_lr_decay=0.8
        ),
        adapters=_adapters(),
        task_train_examples=20000,
        task_test_examples=500,
    ),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]
