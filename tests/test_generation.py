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


def _stop_case(lm: LoadedModel, prompts: list[str], n_new: int):
    """Full greedy ids, and the ids with ``stop_at_refusal`` for a detector whose marker is a piece of the first
    row's own text (tiny models never write a real refusal), so some row has to stop early."""
    from mech.refusal import SubstringDetector, normalize

    full = generate_ids(lm, prompts, max_new_tokens=n_new, batch_size=len(prompts))
    text = normalize(lm.tokenizer.decode(full[0], skip_special_tokens=True))
    marker = text[len(text) // 3 : len(text) // 3 + 6]
    assert marker.strip(), f"the tiny model wrote too little text to pick a marker from: {text!r}"
    det = SubstringDetector(markers=(marker,))
    stopped = generate_ids(lm, prompts, max_new_tokens=n_new, batch_size=len(prompts), stop_at_refusal=det)
    return full, stopped, det


@pytest.mark.parametrize("model", ["tiny_qwen2", "tiny_llama"])
def test_a_row_stops_once_its_refusal_is_detected(model: str, request: pytest.FixtureRequest) -> None:
    """``stop_at_refusal``: every detector verdict equals the full generation's; a detected row's ids are the
    full row's up to the token that completes the marker (a prefix: the first row stops before its end), and an
    undetected row runs to its end as before."""
    lm = request.getfixturevalue(model)
    prompts = ["Tell me a story about a dragon.", "How do I bake bread?", "hi", "Write a poem about the sea."]
    full, stopped, det = _stop_case(lm, prompts, 24)
    dec = lm.tokenizer.batch_decode
    assert det(prompts, dec(stopped, skip_special_tokens=True)) == det(prompts, dec(full, skip_special_tokens=True))
    assert len(stopped[0]) < len(full[0])
    for f, s, hit in zip(full, stopped, det(prompts, dec(full, skip_special_tokens=True)), strict=True):
        assert f[: len(s)] == s
        if hit:  # it ends at the first token whose text holds the marker
            assert det.is_refusal(lm.tokenizer.decode(s, skip_special_tokens=True))
            assert not det.is_refusal(lm.tokenizer.decode(s[:-1], skip_special_tokens=True))
        else:
            assert s == f


@pytest.mark.realmodel
@pytest.mark.slow
def test_stopping_at_the_refusal_keeps_the_real_models_verdicts(lm: LoadedModel, prompt_set: PromptSet) -> None:
    """On the default model's own refusals (24 harmful and 8 harmless prompts, 32 tokens): the substring verdict
    and the first token of every row equal those of the full generation, and the refusals stop early (fewer
    tokens generated in all): what the refusal-token probe reads."""
    from mech.refusal import SubstringDetector

    prompts = prompt_set.harmful().texts()[:24] + prompt_set.harmless().texts()[:8]
    det = SubstringDetector()
    full = generate_ids(lm, prompts, max_new_tokens=N_NEW, batch_size=len(prompts))
    stopped = generate_ids(lm, prompts, max_new_tokens=N_NEW, batch_size=len(prompts), stop_at_refusal=det)
    dec = lm.tokenizer.batch_decode
    verdicts = det(prompts, dec(full, skip_special_tokens=True))
    assert det(prompts, dec(stopped, skip_special_tokens=True)) == verdicts
    assert [r[:1] for r in stopped] == [r[:1] for r in full]
    assert sum(verdicts) >= 10, "the default model refuses most of these harmful prompts"
    assert sum(map(len, stopped)) < sum(map(len, full))
