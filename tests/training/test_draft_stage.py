"""The DistillSpec draft stage's parts: layer dropping, the batches of teacher outputs, the agreement measure."""

import torch

from models import ModelConfig
from models.decoder import CausalLM
from training.draft_stage import GeneratedBatches, agreement, layer_dropped
from training.losses import IGNORE


def small_model(layers: int) -> CausalLM:
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4
    )
    return CausalLM(config).eval()


def test_layer_dropped_keeps_the_first_layers_embeddings_and_head():
    student = small_model(3)
    draft = layer_dropped(student, 1)
    assert draft.config.num_hidden_layers == 1
    kept = draft.state_dict()
    for name, tensor in student.state_dict().items():
        if ".layers.1." in name or ".layers.2." in name:
            assert name not in kept
        else:
            torch.testing.assert_close(kept[name], tensor, rtol=0, atol=0)


def test_generated_batches_label_only_the_teachers_tokens_and_repeat_by_step():
    sequences = torch.arange(40).reshape(4, 10)  # row r: tokens 10r .. 10r+9
    prompt_lens = torch.tensor([4, 2, 6, 4])
    batches = GeneratedBatches(sequences, prompt_lens, batch_size=3, seed=1)
    inputs, labels = batches(5)
    assert inputs.shape == labels.shape == (3, 9)
    for row_inputs, row_labels in zip(inputs, labels):
        prompt_len = int(prompt_lens[int(row_inputs[0]) // 10])
        assert (row_labels[: prompt_len - 1] == IGNORE).all()  # positions predicting prompt tokens
        torch.testing.assert_close(row_labels[prompt_len - 1 :], row_inputs[prompt_len - 1 :] + 1)  # the teacher's
    again_inputs, _ = batches(5)
    assert torch.equal(inputs, again_inputs)


def test_agreement_is_one_on_the_models_own_greedy_outputs_and_lower_on_noise():
    model = small_model(1)
    prompt = torch.randint(0, 64, (2, 4))
    rows = prompt
    with torch.no_grad():
        for _ in range(6):
            rows = torch.cat([rows, model(rows).logits[:, -1:].argmax(-1)], dim=1)  # (2, T+1)
    prompt_lens = torch.tensor([4, 4])
    assert agreement(model, rows, prompt_lens) == 1.0
    noise = torch.cat([prompt, (rows[:, 4:] + 1) % 64], dim=1)
    assert agreement(model, noise, prompt_lens) < 1.0
