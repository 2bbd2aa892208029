"""The speculative draft: a one-layer model distilled on the teacher's own greedy outputs (DistillSpec).

Speculative decoding pays only when the draft is both cheap and agreeing: per round of k drafts it
costs k draft forwards (d each) and one verification (about t, the target's decode step) and yields
(1 - a^(k+1)) / (1 - a) tokens at acceptance a. The student (2 layers) costs about half the teacher
(4 layers) per token at these sizes, and, trained on the corpus, agrees with the teacher's greedy
choice 31-40% of the time: a round never pays for itself. DistillSpec (Zhou et al. 2024) raises
agreement by distilling on what the draft will be asked to predict, the target's own outputs; this
stage does that for a one-layer draft:

1. data: random windows of the train streams as prompts (4 to 32 tokens: a draft must also start
   from short contexts), the teacher's greedy continuations of them (`models.generate`, batched);
2. init: the student's embeddings, first layer, final norm and head (layer dropping: a working
   one-layer model from step 0);
3. training: KD against the teacher's logits plus CE on its tokens, on the generated positions only.

The card records agreement (greedy top-1 match with the teacher) on held-out teacher outputs, for
this draft and for the student, so the gain is measured where it is made.
"""

from __future__ import annotations

import logging
from dataclasses import asdict

import torch
from torch import Tensor

from models import load_model
from models.decoder import CausalLM
from models.generate import SamplingConfig, generate
from training.build_context import Context, kd_loss_fn, train_config
from training.loop import RunRecord, train
from training.losses import IGNORE
from training.presets import DraftSpec

log = logging.getLogger(__name__)
NAME = "draft"


def teacher_sequences(ctx: Context, teacher: CausalLM, spec: DraftSpec) -> tuple[Tensor, Tensor]:
    """Token ids (N, prompt_len + gen_len): a corpus prompt of min_prompt_len..prompt_len tokens (drafts start
    from short contexts too), then the teacher's greedy continuation filling the row; and the prompt lengths (N,)."""
    gen = torch.Generator().manual_seed(ctx.preset.seed + 17)
    streams = list(ctx.streams["train"].values())
    total = spec.prompt_len + spec.gen_len
    prompt_lens = torch.randint(spec.min_prompt_len, spec.prompt_len + 1, (spec.num_sequences,), generator=gen)
    prompts: list[list[int]] = []
    for i, length in enumerate(prompt_lens.tolist()):
        stream = streams[i % len(streams)]
        start = int(torch.randint(0, len(stream) - length, (1,), generator=gen))
        prompts.append(stream[start : start + length].tolist())
    rows: list[list[int]] = []
    config = SamplingConfig(max_new_tokens=total - spec.min_prompt_len)  # greedy, no EOS stop
    with torch.no_grad():
        for first in range(0, len(prompts), spec.generate_batch):
            batch = prompts[first : first + spec.generate_batch]
            rows += [(p + out)[:total] for p, out in zip(batch, generate(teacher, batch, config))]
            log.info("draft data: %d / %d teacher continuations", len(rows), len(prompts))
    return torch.tensor(rows), prompt_lens


def generated_positions(prompt_lens: Tensor, length: int) -> Tensor:
    """(N, length - 1) bool: the next-token positions whose target is a teacher token (not the corpus prompt)."""
    return torch.arange(1, length)[None, :] >= prompt_lens[:, None]


def layer_dropped(student: CausalLM, num_layers: int) -> CausalLM:
    """A copy of the student with its first `num_layers` layers (embeddings, final norm and head kept)."""
    draft = CausalLM(student.config.replace(num_hidden_layers=num_layers))
    draft.load_state_dict(student.state_dict(), strict=False)  # the dropped layers' keys are ignored
    return draft


class GeneratedBatches:
    """Batch `step` of (inputs, labels) from the teacher sequences; labels only on generated positions."""

    def __init__(self, sequences: Tensor, prompt_lens: Tensor, batch_size: int, seed: int) -> None:
        self.sequences, self.prompt_lens, self.batch_size, self.seed = sequences, prompt_lens, batch_size, seed

    def __call__(self, step: int) -> tuple[Tensor, Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        picked = torch.randint(0, len(self.sequences), (self.batch_size,), generator=gen)  # (B,)
        rows = self.sequences[picked]  # (B, L)
        inputs, labels = rows[:, :-1], rows[:, 1:].clone()  # (B, L-1)
        labels[~generated_positions(self.prompt_lens[picked], rows.shape[1])] = IGNORE  # the corpus part
        return inputs, labels


@torch.no_grad()
def agreement(model: CausalLM, sequences: Tensor, prompt_lens: Tensor) -> float:
    """Share of generated positions where the model's argmax is the teacher's greedy token."""
    matches, total = 0, 0
    for rows, lens in zip(sequences.split(64), prompt_lens.split(64)):
        keep = generated_positions(lens, rows.shape[1])  # (B, L-1)
        hits = model(rows[:, :-1]).logits.argmax(-1) == rows[:, 1:]  # (B, L-1)
        matches += int(hits[keep].sum())
        total += int(keep.sum())
    return matches / total


SUMMARY = (
    "Speculative draft for the teacher: the student's first layer, distilled on the teacher's greedy outputs "
    "(DistillSpec). Serve with `--draft teacher=artifacts/draft`."
)


def distil_draft(ctx: Context) -> tuple[CausalLM, RunRecord, dict]:
    """Generate the teacher's outputs and distil the layer-dropped student on them. Returns the draft, its
    run record and the card fields this stage adds (its spec and the measured agreement)."""
    spec = ctx.preset.draft
    teacher = load_model(ctx.out / "teacher").eval()
    student = load_model(ctx.out / "student").eval()
    sequences, prompt_lens = teacher_sequences(ctx, teacher, spec)
    held_out = len(sequences) // 8
    train_rows, test_rows = sequences[held_out:], sequences[:held_out]
    test = (test_rows, prompt_lens[:held_out])
    draft = layer_dropped(student, spec.num_layers)
    before = agreement(draft, *test)
    batches = GeneratedBatches(train_rows, prompt_lens[held_out:], spec.stage.batch_size, ctx.preset.seed)
    record = train(
        draft, kd_loss_fn(teacher, spec.temperature, spec.alpha), batches, train_config(ctx, NAME, spec.stage)
    )
    draft.eval()
    fields = {
        "layers": draft.config.num_hidden_layers,
        "draft_spec": {k: v for k, v in asdict(spec).items() if k != "stage"},
        "greedy_agreement_with_teacher": {
            "draft": round(agreement(draft, *test), 4),
            "draft_before_training": round(before, 4),
            "student": round(agreement(student, *test), 4),
            "held_out_positions": int(generated_positions(test[1], sequences.shape[1]).sum()),
        },
    }
    log.info("draft: agreement with the teacher %s", fields["greedy_agreement_with_teacher"])
    return draft, record, fields
