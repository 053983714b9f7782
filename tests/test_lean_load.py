"""The lean load of a Hugging Face folder: the converted tensors become the hooked model's parameters (views
of the memory-mapped Hugging Face weights where the layouts allow), so two full models are never alive.

Reference: TransformerLens's own copy route (``load_and_process_state_dict`` into a freshly allocated model,
no weight processing), which is what ``load_model`` did before; its stock layout gives bit-identical outputs
to the relaid-out one (``test_models.test_relayout_is_bit_identical...``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from abft_lens.backends.loading import EMBEDDED_NAME, load_model
from abft_lens.backends.tl import HAS_HOOKED, HookedTransformer, quiet_deprecation
from abft_lens.data.prompts import collate, pad_token_id, prompt_builder
from abft_lens.data.prompts import test_prompts as fixed_test_prompts
from abft_lens.data.tasks import load_task
from abft_lens.evaluation.evaluator import label_logits

pytestmark = pytest.mark.skipif(not HAS_HOOKED, reason="the lean load is 3.9's HookedTransformer route; under 4.x a "
                                                       "bridge keeps the Hugging Face model's own weights")


def copy_route(hf_dir, like):
    """The model TransformerLens's copy route builds from ``hf_dir`` (``like``: a loaded model for cfg/tokenizer)."""
    from transformers import AutoModelForCausalLM
    from transformer_lens.loading_from_pretrained import get_pretrained_state_dict

    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    state_dict = get_pretrained_state_dict(str(hf_dir), like.cfg, hf_model=hf_model, dtype=torch.float32)
    with quiet_deprecation():
        model = HookedTransformer(like.cfg, tokenizer=like.tokenizer, default_padding_side="left",
                                  move_to_device=False)
    model.load_and_process_state_dict(state_dict, fold_ln=False, center_writing_weights=False,
                                      center_unembed=False, fold_value_biases=False,
                                      refactor_factored_attn_matrices=False)
    return model.eval()


def test_lean_load_is_bit_identical_to_the_copy_route(hf_llama_dir):
    model = load_model(str(hf_llama_dir))
    reference = copy_route(hf_llama_dir, model)
    ours = dict(model.named_parameters())
    assert ours.keys() == dict(reference.named_parameters()).keys()
    for name, p in reference.named_parameters():
        assert torch.equal(ours[name], p), name
    for name, b in reference.named_buffers():
        assert torch.equal(dict(model.named_buffers())[name], b), name
    builder = prompt_builder(model, load_task("sst2"))
    batch = collate(fixed_test_prompts(builder, 2, 4), pad_token_id(model.tokenizer))
    ids = torch.tensor(builder.label_token_ids)
    with torch.no_grad():
        assert torch.equal(model(batch.tokens, attention_mask=batch.attention_mask),
                           reference(batch.tokens, attention_mask=batch.attention_mask))
        assert torch.equal(label_logits(model, batch, ids), label_logits(reference, batch, ids))


def test_lean_load_trains_without_touching_the_folder(hf_llama_dir, tmp_path):
    """Parameters may be copy-on-write views of the memory-mapped weights file: training writes to the
    process's own pages, never to the folder, and a second load sees the original weights."""
    before = (hf_llama_dir / "model.safetensors").read_bytes()
    model = load_model(str(hf_llama_dir))
    w_q = model.blocks[0].attn.W_Q
    with torch.no_grad():
        w_q.add_(1.0)
    assert (hf_llama_dir / "model.safetensors").read_bytes() == before
    again = load_model(str(hf_llama_dir))
    assert torch.equal(again.blocks[0].attn.W_Q + 1.0, w_q)


PEAK_SCRIPT = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from abft_lens.backends.loading import load_model
    from abft_lens.data.prompts import prompt_builder
    from abft_lens.data.tasks import load_task
    from abft_lens.training.train import TrainConfig, Trainer

    def rss():
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def peak():  # VmHWM: this process's own peak (ru_maxrss would include the pytest parent's size)
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(l for l in status if l.startswith("VmHWM:")).split()[1]) / 1024

    before = rss()
    model = load_model(sys.argv[1])
    load_peak = peak()
    config = TrainConfig(train_samples=4, pseudo_batch_size=4, epochs=1, lr=1e-4, micro_batch_size=4)
    trainer = Trainer(model, prompt_builder(model, load_task("sst2")), config)
    trainer.step(trainer.prompts)
    print(json.dumps({"before": before, "load_peak": load_peak, "steady": rss()}))
""")


@pytest.mark.embedded
def test_embedded_load_peak_stays_within_the_trained_model_steady_state():
    """SmolLM2: peak RSS of loading is at most 1.1x the RSS of the model after a training step (the copy route
    held the Hugging Face model and the hooked model together: about 1.4x)."""
    load_model(EMBEDDED_NAME)  # converted into the cache before the child measures
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, EMBEDDED_NAME], capture_output=True, text=True,
                         check=True)
    numbers = json.loads(out.stdout.strip().splitlines()[-1])
    assert numbers["load_peak"] <= 1.1 * numbers["steady"], numbers
