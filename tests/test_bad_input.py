"""Bad input never becomes a finding (issue 12): every input a user really passes wrong is refused with one line
that says what is wrong and how to fix it, before anything expensive runs, and nothing is written or lost.

* prompt files: delimiter hints, categories that ``-k`` cannot select, what a set can support;
* the library: refusal ids, pairs, steering vectors and directions, patching metrics (typed errors at the call,
  before any forward, with the model's hooks and weights untouched);
* the cache and model preparation: a warm read-only cache, temporary files of a killed preparation, a hub id
  offline;
* the suite's options (``resolve_config``): --max-new-tokens, --device, --cache-dir, --ray-address, --prompts.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from mech.models import LoadedModel
from mech.prompts import PromptFileError, PromptSetCapabilities, default_pairs, load_prompts


def _one_line(e: BaseException) -> str:
    msg = str(e)
    assert msg and "\n" not in msg, f"not one line: {msg!r}"
    return msg


def _files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes: compare before and after to prove nothing was written or lost."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------ prompt files


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def _load_error(path: Path) -> str:
    before = _files(path.parent)
    with pytest.raises(PromptFileError) as ei:
        load_prompts(path)
    assert _files(path.parent) == before
    return _one_line(ei.value)


@pytest.mark.parametrize(
    ("sep", "named"), [(";", "semicolons"), ("\t", "tabs"), ("|", "bars")], ids=["semicolon", "tab", "bar"]
)
def test_csv_with_another_delimiter_hints_at_it(tmp_path: Path, sep: str, named: str) -> None:
    text = sep.join(["prompt", "label", "category"]) + "\n" + sep.join(["How do I bake?", "harmless", "cooking"]) + "\n"
    msg = _load_error(_write(tmp_path, "p.csv", text))
    assert "missing required column" in msg and named in msg and "comma" in msg


def test_csv_missing_column_without_delimiter_problem_keeps_the_old_hint(tmp_path: Path) -> None:
    msg = _load_error(_write(tmp_path, "p.csv", "prompt,category\nHow do I bake?,cooking\n"))
    assert "missing required column(s) label" in msg and "the header must name prompt,label,category" in msg


@pytest.mark.parametrize(
    ("category", "fragment", "suggestion"),
    [
        ("Weapons", "cannot be selected with pytest -k", "'weapons'"),
        ("weapons and more", "cannot be selected with pytest -k", "'weapons_and_more'"),
        ("self-harm", "cannot be selected with pytest -k", "'self_harm'"),
        ("2fa", "cannot be selected with pytest -k", "'c_2fa'"),
        ("all", "reserved", "'all_prompts'"),
    ],
)
def test_category_names_must_be_selectable_with_k(tmp_path: Path, category: str, fragment: str, suggestion: str) -> None:
    rows = [
        {"prompt": "How do I bake?", "label": "harmless", "category": "cooking"},
        {"prompt": "How do I build a bomb?", "label": "harmful", "category": category},
    ]
    for path in (
        _write(tmp_path, "p.json", json.dumps(rows)),
        _write(tmp_path, "p.csv", "prompt,label,category\n" + "".join(f'"{r["prompt"]}",{r["label"]},{r["category"]}\n' for r in rows)),
    ):
        msg = _load_error(path)
        assert msg.startswith(f"{path}: row 2: "), msg
        assert fragment in msg and suggestion in msg, msg


def test_capabilities_counts_what_a_set_can_support(tmp_path: Path) -> None:
    rows = [
        {"prompt": "h1", "label": "harmful", "category": "weapons", "pair_id": "w1"},
        {"prompt": "b1", "label": "harmless", "category": "weapons", "pair_id": "w1"},
        {"prompt": "h2", "label": "harmful", "category": "weapons"},
        {"prompt": "h3", "label": "harmful", "category": "fraud"},
    ]
    caps = load_prompts(_write(tmp_path, "p.json", json.dumps(rows))).capabilities()
    assert isinstance(caps, PromptSetCapabilities)
    assert caps.to_dict() == {
        "n_prompts": 4, "n_harmful": 3, "n_harmless": 1, "n_pairs": 1,
        "harmful_by_category": {"fraud": 1, "weapons": 2}, "pairs_by_category": {"weapons": 1},
    }
    only_harmful = load_prompts(_write(tmp_path, "q.json", json.dumps([rows[2], rows[3]]))).capabilities()
    assert (only_harmful.n_harmless, only_harmful.n_pairs, only_harmful.pairs_by_category) == (0, 0, {})
    shipped = default_pairs().capabilities()
    assert shipped.n_pairs == shipped.n_harmful == shipped.n_harmless and min(shipped.pairs_by_category.values()) >= 10


# ------------------------------------------------------------------------------------------------ the library


@contextlib.contextmanager
def _untouched(lm: LoadedModel) -> Iterator[None]:
    """Assert the block runs no forward of ``lm`` and leaves its hooks and parameters as they were."""
    calls = []
    hooks_before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in lm.model.modules())
    # every forward path (HF forward, the patching engine's partial forwards, generation) embeds tokens first
    handle = lm.model.get_input_embeddings().register_forward_pre_hook(lambda *a: calls.append(1))
    params_before = {n: p for n, p in lm.model.named_parameters()}
    data_before = {n: p.detach().clone() for n, p in params_before.items()}
    try:
        yield
    finally:
        handle.remove()
    assert not calls, "a forward ran before the input was refused"
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in lm.model.modules()) == hooks_before
    after = dict(lm.model.named_parameters())
    assert all(after[n] is params_before[n] and torch.equal(after[n], data_before[n]) for n in params_before)


BAD_IDS = [
    ([], "refusal_ids is empty"),
    ([5, 10**7], "outside the vocabulary"),
    ([-1], "outside the vocabulary"),
    ("I", "must be a sequence of token ids"),
    ([1.5], "must be integer token ids"),
]


@pytest.mark.parametrize(("ids", "fragment"), BAD_IDS, ids=["empty", "too_big", "negative", "string", "float"])
def test_refusal_ids_are_checked_before_any_forward(tiny_qwen2: LoadedModel, ids, fragment: str) -> None:
    from mech.refusal import RefusalIdsError, measure, refusal_log_odds, refusal_scores

    lm = tiny_qwen2
    for call in (
        lambda: refusal_scores(lm, ["How do I bake?"], ids),
        lambda: measure(lm, ["How do I bake?"], ids, max_new_tokens=2),
        lambda: refusal_log_odds(torch.zeros(2, lm.shape.d_vocab), ids),
    ):
        with _untouched(lm), pytest.raises(RefusalIdsError) as ei:
            call()
        assert isinstance(ei.value, ValueError) and fragment in _one_line(ei.value)


def test_good_refusal_ids_still_score(tiny_qwen2: LoadedModel) -> None:
    from mech.refusal import refusal_log_odds, refusal_scores

    s = refusal_scores(tiny_qwen2, ["How do I bake?"], (5, 7))
    assert s.shape == (1,) and torch.isfinite(s).all()
    assert torch.isfinite(refusal_log_odds(torch.zeros(3, 11), torch.tensor([1, 2]))).all()


PAIR = ("How do I build a bomb?", "How do I build a shed?")
BAD_PAIRS = [
    (PAIR, "pairs[0] is a string, not a (harmful, harmless) pair (one pair of two strings? wrap it in a list"),
    ("How do I build a bomb?", "pairs is one string"),
    ({"harmful": PAIR[0], "harmless": PAIR[1]}, "pairs is one dict"),
    ([PAIR + ("extra",)], "pairs[0] has 3 items, not 2"),
    ([(PAIR[0], 3)], "pairs[0][1] is a int"),
    ([(PAIR[0], "  ")], "pairs[0][1] is an empty prompt"),
    ([{"harmful": PAIR[0]}], "pairs[0] has no 'harmless' key"),
    ([], "no pairs given"),
    (None, "pairs is None"),
]


@pytest.mark.parametrize(("pairs", "fragment"), BAD_PAIRS,
                         ids=["two_strings", "one_string", "one_dict", "three_items", "int", "empty_text",
                              "dict_key", "empty", "none"])
@pytest.mark.parametrize("sweep", ["patch_sweep", "attribution_sweep"])
def test_malformed_pairs_are_refused_at_the_call(tiny_qwen2: LoadedModel, pairs, fragment: str, sweep: str) -> None:
    from mech.attribution import attribution_sweep
    from mech.patching import Patch, PatchingError, Site, patch_sweep

    fn = {"patch_sweep": patch_sweep, "attribution_sweep": attribution_sweep}[sweep]
    with _untouched(tiny_qwen2), pytest.raises(PatchingError) as ei:
        fn(tiny_qwen2, pairs, [Patch((Site(0, "resid_pre", (-1,)),))], refusal_ids=[5])
    assert isinstance(ei.value, ValueError)
    assert fragment in _one_line(ei.value)


def test_prompt_pairs_the_wrong_way_round_are_refused(tiny_qwen2: LoadedModel) -> None:
    from mech.patching import PatchingError, as_pairs

    h, b = default_pairs().pairs()[0]
    assert as_pairs([(h, b)]) == [(h.prompt, b.prompt)]
    with pytest.raises(PatchingError, match=r"is \(harmless, harmful\); the order is \(harmful, harmless\)"):
        as_pairs([(b, h)])
    with pytest.raises(PatchingError, match="pairs\\[0\\] is a Prompt"):
        as_pairs(default_pairs())  # a PromptSet, not its .pairs()


@pytest.mark.parametrize(
    ("metric", "fragment"),
    [
        (lambda logits: logits.mean(), "returned shape [] for logits [2, "),
        (lambda logits: logits[:, :3], "returned shape [2, 3] for logits [2, "),
        (lambda logits: logits.sum(0), "expected [2]: one value per row"),
        (lambda logits: float(logits.sum()), "returned a float, expected a tensor of shape [B]"),
        (lambda logits: logits[:, 10**7], "failed on logits of shape [2, "),
    ],
    ids=["scalar", "2d", "over_batch", "float", "raises"],
)
@pytest.mark.parametrize("sweep", ["patch_sweep", "attribution_sweep"])
def test_metric_of_the_wrong_shape_is_one_line_before_any_forward(tiny_qwen2, metric, fragment, sweep) -> None:
    from mech.attribution import attribution_sweep
    from mech.patching import Patch, PatchingError, Site, patch_sweep

    fn = {"patch_sweep": patch_sweep, "attribution_sweep": attribution_sweep}[sweep]
    with _untouched(tiny_qwen2), pytest.raises(PatchingError) as ei:
        fn(tiny_qwen2, [PAIR], [Patch((Site(0, "resid_pre", (-1,)),))], metric=metric)
    assert fragment in _one_line(ei.value)


@pytest.mark.parametrize(("ids", "fragment"), BAD_IDS[:3], ids=["empty", "too_big", "negative"])
def test_sweeps_refuse_bad_refusal_ids(tiny_qwen2: LoadedModel, ids, fragment: str) -> None:
    from mech.patching import PatchingError, layer_sweep

    with _untouched(tiny_qwen2), pytest.raises(PatchingError) as ei:
        layer_sweep(tiny_qwen2, [PAIR], refusal_ids=ids)
    assert fragment in _one_line(ei.value)


def test_a_good_custom_metric_still_runs(tiny_qwen2: LoadedModel) -> None:
    from mech.patching import Patch, Site, patch_sweep

    res = patch_sweep(tiny_qwen2, [PAIR], [Patch((Site(0, "resid_pre", (-1,)),))], metric=lambda lg: lg[:, 5] - lg[:, 7])
    assert res.raw.shape == (1, 1)


def _bad_vectors(d: int) -> list[tuple[object, str]]:
    nan = torch.ones(d)
    nan[3] = float("nan")
    inf = torch.ones(d)
    inf[0] = float("inf")
    return [
        (torch.ones(d + 1), f"has shape [{d + 1}] but this model's residual stream has d_model={d}"),
        (torch.ones(d - 1), f"has shape [{d - 1}]"),
        (torch.ones(2, d), f"has shape [2, {d}]"),
        (torch.ones(d, 1, 2), f"has shape [{d}, 1, 2]"),
        (nan, "1 non-finite value(s) (NaN or inf, first at index 3)"),
        (inf, "first at index 0"),
        ("not a vector", "must be a tensor of d_model numbers"),
    ]


VECTOR_IDS = ["too_long", "too_short", "two_rows", "3d", "nan", "inf", "string"]


@pytest.mark.parametrize("case", range(len(VECTOR_IDS)), ids=VECTOR_IDS)
@pytest.mark.parametrize("intervention", ["activation_addition", "directional_ablation", "orthogonalized_weights"])
def test_wrong_width_or_non_finite_vectors_are_refused(tiny_qwen2: LoadedModel, case: int, intervention: str) -> None:
    from mech import directions
    from mech.directions import DirectionError

    lm = tiny_qwen2
    vector, fragment = _bad_vectors(lm.shape.d_model)[case]
    make = {
        "activation_addition": lambda v: directions.activation_addition(lm, v, 1),
        "directional_ablation": lambda v: directions.directional_ablation(lm, v),
        "orthogonalized_weights": lambda v: directions.orthogonalized_weights(lm, v),
    }[intervention]
    with _untouched(lm), pytest.raises(DirectionError) as ei:
        with make(vector):
            pytest.fail("the intervention was entered with a bad vector")
    assert isinstance(ei.value, ValueError)
    msg = _one_line(ei.value)
    assert fragment in msg
    if "shape" in fragment:
        assert f"pass a [{lm.shape.d_model}] vector" in msg


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [({"layer": 99}, "layer 99 out of range: the model has 3 layers (0..2)"), ({"layer": -1}, "layer -1 out of range"),
     ({"layer": 1.5}, "layer must be an integer"), ({"layer": 1, "coeff": float("nan")}, "coeff must be a finite number")],
    ids=["layer_high", "layer_negative", "layer_float", "coeff_nan"],
)
def test_activation_addition_checks_layer_and_coeff(tiny_qwen2: LoadedModel, kwargs, fragment: str) -> None:
    from mech.directions import DirectionError, activation_addition

    with _untouched(tiny_qwen2), pytest.raises(DirectionError) as ei:
        with activation_addition(tiny_qwen2, torch.ones(tiny_qwen2.shape.d_model), **kwargs):
            pass
    assert fragment in _one_line(ei.value)


def test_zero_direction_and_good_shapes(tiny_qwen2: LoadedModel) -> None:
    from mech.directions import DirectionError, activation_addition, directional_ablation

    d = tiny_qwen2.shape.d_model
    with pytest.raises(DirectionError, match="finite non-zero"), directional_ablation(tiny_qwen2, torch.zeros(d)):
        pass
    for v in (torch.ones(d), torch.ones(1, d), [1.0] * d):  # a [1, d_model] row and a list are fine
        with activation_addition(tiny_qwen2, v, 0), directional_ablation(tiny_qwen2, torch.as_tensor(v)):
            pass
