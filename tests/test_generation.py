"""The hand-written greedy decoding (mech.refusal.generate_ids: batched by length, left-padded, finished rows
leave the batch, a KV cache) is token-for-token transformers' ``generate(do_sample=False)`` on the real model."""

from __future__ import annotations

import pytest
import torch

from mech.models import LoadedModel
from mech.prompts import PromptSet
from mech.refusal import generate_ids

N_NEW = 32


@pytest.mark.realmodel
@pytest.mark.slow
def test_greedy_generation_matches_transformers_generate(lm: LoadedModel, prompt_set: PromptSet) -> None:
    pairs = prompt_set.pairs()[:4]
    prompts = [h.prompt for h, _ in pairs] + [s.prompt for _, s in pairs]  # 4 refused, 4 answered: both ways of ending
    ours = generate_ids(lm, prompts, max_new_tokens=N_NEW, batch_size=len(prompts))
    config_eos = lm.model.generation_config.eos_token_id
    eos = {*(config_eos if isinstance(config_eos, list) else [config_eos]), lm.tokenizer.eos_token_id} - {None}
    for prompt, got in zip(prompts, ours, strict=True):
        enc = lm.batch([prompt])  # alone: no padding on the reference side
        with torch.inference_mode():
            out = lm.model.generate(
                input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=N_NEW,
                do_sample=False, eos_token_id=sorted(eos), pad_token_id=lm.tokenizer.pad_token_id,
            )
        ref = out[0, enc["input_ids"].shape[1]:].tolist()
        ref = ref[: next((i for i, t in enumerate(ref) if t in eos), len(ref))]  # generate_ids drops the EOS
        assert got == ref, f"{prompt!r}: ours {lm.tokenizer.decode(got)!r} vs generate {lm.tokenizer.decode(ref)!r}"
