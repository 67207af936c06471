"""Bad input never becomes a finding (issue 12): every input a user really passes wrong is refused with one line
that says what is wrong and how to fix it, before anything expensive runs, and nothing is written or lost.

* prompt files: delimiter hints, categories that ``-k`` cannot select, what a set can support;
* the library: refusal ids, pairs, steering vectors and directions, patching metrics (typed errors at the call,
  before any forward, with the model's hooks and weights untouched);
* the cache and model preparation: a warm read-only cache, temporary files of a killed preparation, a hub id
  offline;
* the suite's options (``resolve_config``): --max-new-tokens, --device, --cache-dir, --ray-address, --prompts.

Issue 26 continues by concern: ``test_bad_input_options.py`` (every option and ``--set`` item before the model
loads), ``test_bad_input_data.py`` (context, memory, degenerate settings, leakage, 4-bit on CPU, prompt files) and
``test_bad_input_report.py`` (no bad input replaces the last complete report).
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
    # every forward path (HF forward, the engine's partial forwards, generation) embeds tokens first
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
    from mech.patching import Patch, PatchingError, Site, patch_sweep
    from mech.patching.attribution import attribution_sweep

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
    from mech.patching import Patch, PatchingError, Site, patch_sweep
    from mech.patching.attribution import attribution_sweep

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


class _NoPool:
    """Stands in for a RayPool: any use of it means the input was not refused up front."""

    def map(self, *a, **k):
        raise AssertionError("work was sent to the pool")


@pytest.mark.parametrize(("pairs", "fragment"), BAD_PAIRS[:2] + BAD_PAIRS[3:4], ids=["two_strings", "one_string", "three_items"])
def test_distributed_sweep_refuses_malformed_pairs_before_the_pool(pairs, fragment: str) -> None:
    from mech.distributed import distributed_sweep
    from mech.patching import PatchingError

    with pytest.raises(PatchingError) as ei:
        distributed_sweep(_NoPool(), "layer_sweep", pairs, refusal_ids=[5])
    assert fragment in _one_line(ei.value)
    with pytest.raises(PatchingError, match="refusal_ids is empty"):
        distributed_sweep(_NoPool(), "layer_sweep", [PAIR], refusal_ids=[])
    with pytest.raises(ValueError, match="pairs_per_unit must be a positive integer"):
        distributed_sweep(_NoPool(), "layer_sweep", [PAIR], pairs_per_unit=0, refusal_ids=[5])


def test_ablation_scores_refuse_bad_refusal_ids_before_any_forward(tiny_qwen2: LoadedModel) -> None:
    from mech.interventions import Ablate
    from mech.refusal import RefusalIdsError
    from mech.scoring import refusal_scores

    for ids, fragment in BAD_IDS[:3]:
        with _untouched(tiny_qwen2), pytest.raises(RefusalIdsError) as ei:
            refusal_scores(tiny_qwen2, ["How do I bake?"], ids, [Ablate(("L0.H1",))])
        assert fragment in _one_line(ei.value)


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
    from mech.vectors import DirectionError

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
    from mech.directions import activation_addition
    from mech.vectors import DirectionError

    with _untouched(tiny_qwen2), pytest.raises(DirectionError) as ei:
        with activation_addition(tiny_qwen2, torch.ones(tiny_qwen2.shape.d_model), **kwargs):
            pass
    assert fragment in _one_line(ei.value)


def test_zero_direction_and_good_shapes(tiny_qwen2: LoadedModel) -> None:
    from mech.directions import activation_addition, directional_ablation
    from mech.vectors import DirectionError

    d = tiny_qwen2.shape.d_model
    with pytest.raises(DirectionError, match="finite non-zero"), directional_ablation(tiny_qwen2, torch.zeros(d)):
        pass
    for v in (torch.ones(d), torch.ones(1, d), [1.0] * d):  # a [1, d_model] row and a list are fine
        with activation_addition(tiny_qwen2, v, 0), directional_ablation(tiny_qwen2, torch.as_tensor(v)):
            pass


# ------------------------------------------------------------------------------------------------ the disk cache


def test_warm_cache_reads_without_a_lock_and_read_only(tmp_path: Path) -> None:
    import os
    import stat

    from mech.cache import DiskCache

    root = tmp_path / "results"
    DiskCache(root).get_or_compute("ns", {"a": 1}, lambda: {"x": 1})
    for lock in root.rglob("*.lock"):  # the writer's lock file is not part of the entry
        lock.unlink()
    before = _files(root)
    dirs = [root, *[d for d in root.rglob("*") if d.is_dir()]]
    for d in dirs:
        d.chmod(stat.S_IRUSR | stat.S_IXUSR)  # chmod -w (root bypasses it: the no-lock-file check below holds anyway)
    try:
        cache = DiskCache(root)

        def never() -> dict:
            raise AssertionError("a finished entry was recomputed")

        assert cache.get_or_compute("ns", {"a": 1}, never) == {"x": 1}
        assert (cache.hits, cache.misses) == (1, 0)
        assert _files(root) == before, "reading a finished entry created or changed a file (a .lock?)"
        assert not list(root.rglob("*.lock"))
    finally:
        for d in dirs:
            d.chmod(stat.S_IRWXU)
    assert os.access(root, os.W_OK)


def test_unwritable_cache_computes_without_storing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mech.cache
    from mech.cache import DiskCache

    root = tmp_path / "results"
    DiskCache(root).get_or_compute("ns", {"a": 1}, lambda: [1])
    before = _files(root)

    class ReadOnlyLock:  # what FileLock does in a directory it cannot write (root cannot be denied by chmod)
        def __init__(self, path: str) -> None:
            raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(mech.cache, "FileLock", ReadOnlyLock)
    cache = DiskCache(root)
    assert cache.get_or_compute("ns", {"a": 1}, lambda: [9]) == [1]  # finished: read, no lock needed
    with pytest.warns(RuntimeWarning, match="not writable .*computing .* without storing it"):
        assert cache.get_or_compute("ns", {"a": 2}, lambda: [2]) == [2]
    assert _files(root) == before


def test_cache_writes_stay_locked_and_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mech.cache
    from mech.cache import DiskCache

    locks: list[str] = []
    real = mech.cache.FileLock

    def spy(path: str):
        locks.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(mech.cache, "FileLock", spy)
    cache = DiskCache(tmp_path)
    cache.get_or_compute("ns", {"a": 1}, lambda: 1)
    assert len(locks) == 1 and locks[0].endswith(".json.lock")
    cache.get_or_compute("ns", {"a": 1}, lambda: 2)
    assert len(locks) == 1  # the hit took no lock
    # a corrupt entry is recomputed (under the lock) and replaced whole
    entry = next(tmp_path.rglob("*.json"))
    entry.write_text("{not json")
    assert cache.get_or_compute("ns", {"a": 1}, lambda: 3) == 3 and len(locks) == 2
    assert json.loads(entry.read_text()) == 3
    assert not [p for p in tmp_path.rglob(".*") if p.is_file()], "a temporary file was left behind"


# ------------------------------------------------------------------------------------------ model preparation


def test_killed_preparation_leaves_no_temporary_files_on_the_next_run(tmp_path: Path, monkeypatch) -> None:
    """SIGKILL cannot run ``finally``: the temporary GGUF and the temporary safetensors dir of a killed
    preparation are removed by the next preparation (under the lock); other files stay."""
    import mech.registry as models

    chunks = [tmp_path / "wheel" / f"part{i}.bin" for i in (1, 2)]
    chunks[0].parent.mkdir()
    chunks[0].write_bytes(b"GGUF" + b"a" * 100)
    chunks[1].write_bytes(b"b" * 50)
    data = b"".join(c.read_bytes() for c in chunks)
    import hashlib

    spec = models.ModelSpec("tiny-chunked", "tiny.gguf", hashlib.sha256(data).hexdigest(), len(data),
                            ("d1", "d2"), ("m1", "m2"), "pip install tiny")
    monkeypatch.setattr(models, "dist_file", lambda d, m: chunks[int(d[1:]) - 1])
    cache = tmp_path / "cache"
    (cache / "gguf").mkdir(parents=True)
    (cache / "models").mkdir()
    # what a killed run leaves: mkstemp / mkdtemp names next to the final ones
    stale_file = cache / "gguf" / ".tiny.gguf.k1ll3d"
    stale_file.write_bytes(b"x" * 4096)
    stale_dir = cache / "models" / ".tiny-fp32.k1ll3d"
    stale_dir.mkdir()
    (stale_dir / "model.safetensors").write_bytes(b"x" * 4096)
    keep = [cache / "gguf" / "other.gguf", cache / "models" / ".other-fp32.abc"]
    keep[0].write_bytes(b"other")
    keep[1].write_bytes(b"other model's temporary file")

    out = models.assemble_gguf(spec, cache)
    assert out.read_bytes() == data
    assert not stale_file.exists()
    assert all(k.exists() for k in keep)
    # the de-quantize step cleans its own temporary dirs the same way (a corrupt GGUF fails after the cleanup)
    with pytest.raises(models.ModelError, match="corrupt or unsupported GGUF"):
        models.dequantize_gguf(out, spec.sha256, cache, "tiny-fp32")
    assert not stale_dir.exists()
    assert all(k.exists() for k in keep)
    assert not [p for p in (cache / "models").iterdir() if p.name.startswith(".tiny-fp32.")]


def test_prepared_model_is_found_without_a_lock_in_a_read_only_cache(tmp_path, monkeypatch) -> None:
    import mech.models as models
    import mech.registry as registry

    spec = registry.REGISTRY[registry.DEFAULT_MODEL]
    final = tmp_path / "models" / f"{spec.name}-fp32"
    final.mkdir(parents=True)
    (final / "model.safetensors").write_bytes(b"")
    (final / "mech-manifest.json").write_text(json.dumps({"gguf_sha256": spec.sha256}))
    before = _files(tmp_path)

    def no_lock(*a, **k):
        raise AssertionError("a prepared model took the preparation lock")

    monkeypatch.setattr(registry, "_prepare_lock", no_lock)
    assert registry.prepare(spec.name, tmp_path) == final
    models.check_model_source(spec.name, tmp_path)
    assert _files(tmp_path) == before


def test_unwritable_cache_for_an_unprepared_model_is_one_line(tmp_path: Path, monkeypatch) -> None:
    import mech.registry as models

    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache dir should be")
    spec = models.ModelSpec("ghost", "ghost.gguf", "0" * 64, 3, ("d1", "d2"), ("m1", "m2"), "pip install ghost")
    monkeypatch.setattr(models, "dist_file", lambda d, m: blocker)
    with pytest.raises(models.ModelError) as ei:
        models.assemble_gguf(spec, blocker / "sub")
    assert "cannot prepare ghost.gguf in the cache dir" in _one_line(ei.value) and "--cache-dir" in str(ei.value)


def test_hub_id_offline_fails_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    import mech.models as models
    import mech.registry as registry

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    for call in (lambda: models.load_model("no-such-owner/no-such-model", cache_dir=tmp_path),
                 lambda: models.check_model_source("no-such-owner/no-such-model", tmp_path),
                 lambda: models.n_layers_of("no-such-owner/no-such-model", tmp_path)):
        with pytest.raises(registry.ModelError) as ei:
            call()
        msg = _one_line(ei.value)
        assert "not in the local Hugging Face cache and HF_HUB_OFFLINE is set" in msg
        assert "huggingface-cli download no-such-owner/no-such-model" in msg
    assert time.perf_counter() - t0 < 5, "an offline hub id was retried"
    assert not list(tmp_path.iterdir())


def test_hub_id_unreachable_fails_within_seconds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    import mech.models as models
    import mech.registry as registry

    for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_dead_port()}")
    t0 = time.perf_counter()
    with pytest.raises(registry.ModelError) as ei:
        models.load_model("no-such-owner/no-such-model", cache_dir=tmp_path)
    msg = _one_line(ei.value)
    assert "not in the local Hugging Face cache and the hub could not be reached (127.0.0.1:" in msg
    assert time.perf_counter() - t0 < 8


def _dead_port() -> int:
    """A local TCP port nothing listens on."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------ the options


class _Config:
    """The part of pytest.Config that resolve_config reads."""

    def __init__(self, **opts: object) -> None:
        self.opts = opts

    def getoption(self, name: str) -> object:
        return self.opts.get(name, False if name == "no_cache" else None)


@pytest.fixture
def resolve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """resolve_config on the given options (no MECH_* env vars; the cache dir in tmp_path unless given)."""
    import os

    from fixtures.options import resolve_config

    for k in list(os.environ):
        if k.startswith("MECH_") or k == "RAY_ADDRESS":
            monkeypatch.delenv(k)
    monkeypatch.setenv("MECH_CACHE_DIR", str(tmp_path / "default-cache"))

    def run(**opts: object):
        return resolve_config(_Config(**opts))

    return run


def _usage_error(resolve, **opts: object) -> str:
    with pytest.raises(pytest.UsageError) as ei:
        resolve(**opts)
    return _one_line(ei.value)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [("0", "--max-new-tokens must be >= 1, got 0: with no generated tokens every completion is empty"),
     ("-5", "--max-new-tokens must be >= 1, got -5"),
     ("lots", "--max-new-tokens must be an integer >= 1, got 'lots'"),
     ("2.5", "must be an integer >= 1, got '2.5'")],
)
def test_max_new_tokens_must_be_a_positive_integer(resolve, value: str, fragment: str) -> None:
    assert fragment in _usage_error(resolve, max_new_tokens=value)
    assert resolve(max_new_tokens="1").max_new_tokens == 1


@pytest.mark.parametrize("value", ["-1", "x", "1.5"])
def test_shuffle_labels_must_be_a_seed(resolve, value: str) -> None:
    assert f"--shuffle-labels must be a non-negative integer seed, got {value!r}" in _usage_error(
        resolve, shuffle_labels=value)
    assert resolve(shuffle_labels="3").shuffle_labels == 3 and resolve().shuffle_labels is None


def test_device_must_exist_and_be_available(resolve) -> None:
    assert "--device 'gpu' is not one of auto, cpu, cuda, mps (or cuda:N)" in _usage_error(resolve, device="gpu")
    assert resolve(device="cpu").device == "cpu"
    if not torch.cuda.is_available():
        msg = _usage_error(resolve, device="cuda")
        assert msg == "--device cuda: CUDA is not available here; use --device cpu or auto"
        assert "CUDA is not available" in _usage_error(resolve, device="cuda:1")
    else:
        n = torch.cuda.device_count()
        assert f"this machine has {n} CUDA device(s)" in _usage_error(resolve, device=f"cuda:{n}")
    if not torch.backends.mps.is_available():
        assert _usage_error(resolve, device="mps").startswith("--device mps: MPS is not available here")


def test_cache_dir_must_be_a_directory(resolve, tmp_path: Path) -> None:
    a_file = tmp_path / "cache.txt"
    a_file.write_text("not a directory")
    msg = _usage_error(resolve, cache_dir=str(a_file))
    assert msg == f"--cache-dir {a_file} is a file, not a directory; pass a directory (it is created if missing) with --cache-dir or MECH_CACHE_DIR"
    msg = _usage_error(resolve, cache_dir=str(a_file / "sub"))
    assert f"--cache-dir {a_file / 'sub'} cannot be created: {a_file} is a file" in msg
    assert a_file.read_text() == "not a directory"
    assert resolve(cache_dir=str(tmp_path / "new" / "cache")).cache_dir == tmp_path / "new" / "cache"
    assert not (tmp_path / "new").exists(), "resolving the options created the cache dir"


def test_ray_address_dead_host_port_is_refused_within_seconds(resolve) -> None:
    import time

    port = _dead_port()
    t0 = time.perf_counter()
    msg = _usage_error(resolve, ray_address=f"127.0.0.1:{port}")
    assert f"--ray-address '127.0.0.1:{port}': nothing accepts connections at 127.0.0.1:{port}" in msg
    assert "ray start --head" in msg
    assert "is not host:port" in _usage_error(resolve, ray_address="my-cluster")
    assert "unknown scheme" in _usage_error(resolve, ray_address="http://head:6379")
    assert time.perf_counter() - t0 < 5


def test_ray_address_of_a_silent_peer_is_refused_within_the_timeout() -> None:
    """A peer that takes the connection but never answers (a hung host, a firewall that accepts): refused within
    the timeout, not retried without end."""
    import socket
    import time

    from mech.distributed import DistributedError, check_address

    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()  # the kernel completes the handshake; nobody ever reads or answers
        port = srv.getsockname()[1]
        t0 = time.perf_counter()
        with pytest.raises(DistributedError) as ei:
            check_address(f"127.0.0.1:{port}", timeout=1.0)
        assert time.perf_counter() - t0 < 3
    assert "does not answer like a Ray cluster" in _one_line(ei.value)


@contextlib.contextmanager
def _server(reply: bytes) -> Iterator[int]:
    """A local TCP server that answers every connection with ``reply``; yields its port."""
    import socket
    import threading

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    srv.settimeout(5)

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                with contextlib.suppress(OSError):
                    conn.recv(64)
                    conn.sendall(reply)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield srv.getsockname()[1]
    finally:
        srv.close()
        t.join(5)


SETTINGS_FRAME = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # what a gRPC server (Ray's GCS) answers first


def test_ray_address_of_something_else_is_refused(resolve) -> None:
    with _server(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n") as port:
        msg = _usage_error(resolve, ray_address=f"127.0.0.1:{port}")
    assert f"127.0.0.1:{port} accepts connections but does not answer like a Ray cluster (no gRPC)" in msg


def test_ray_client_address_needs_the_client_extra(resolve, monkeypatch) -> None:
    import mech.distributed as dist

    monkeypatch.setattr(dist, "_client_installed", lambda: False)
    msg = _usage_error(resolve, ray_address="ray://head:10001")
    assert "uses the Ray client, which is not installed (no grpcio)" in msg
    assert "pip install 'mech[ray-client]'" in msg and "ray[client]==2.60.0" in msg
    monkeypatch.setattr(dist, "_client_installed", lambda: True)
    port = _dead_port()
    assert f"nothing accepts connections at 127.0.0.1:{port}" in _usage_error(resolve, ray_address=f"ray://127.0.0.1:{port}")
    assert "nothing accepts connections at 127.0.0.1:10001" in _usage_error(resolve, ray_address="ray://127.0.0.1")


def test_ray_address_auto_needs_a_running_cluster(resolve, monkeypatch) -> None:
    from ray._private import services

    monkeypatch.setattr(services, "find_gcs_addresses", lambda: [])
    monkeypatch.setattr(services, "find_bootstrap_address", lambda temp_dir=None: None)
    msg = _usage_error(resolve, ray_address="auto")
    assert msg.startswith("--ray-address auto: no running Ray cluster on this machine; start one with `ray start --head`")
    port = _dead_port()  # a stale address file of a cluster that is gone
    monkeypatch.setattr(services, "find_bootstrap_address", lambda temp_dir=None: f"127.0.0.1:{port}")
    assert f"nothing accepts connections at 127.0.0.1:{port}" in _usage_error(resolve, ray_address="auto")


def test_ray_address_of_a_listening_cluster_passes(resolve) -> None:
    with _server(SETTINGS_FRAME) as port:
        cfg = resolve(ray_address=f" 127.0.0.1:{port} ")
    assert cfg.ray_address == f"127.0.0.1:{port}" and cfg.distributed


@pytest.mark.slow
def test_ray_address_of_a_real_local_cluster_passes() -> None:
    """Against a real Ray GCS (a local cluster, a few seconds): the gRPC probe recognises it, ``auto`` finds it."""
    ray = pytest.importorskip("ray")
    from mech.distributed import check_address

    if ray.is_initialized():
        pytest.skip("a Ray cluster is already initialized in this process")
    ray.init(num_cpus=1, include_dashboard=False, object_store_memory=80 * 2**20, logging_level="ERROR")
    try:
        gcs = ray.get_runtime_context().gcs_address
        assert check_address(gcs) == gcs
        assert check_address("auto")
    finally:
        ray.shutdown()


def test_options_are_resolved_once_per_session(tmp_path: Path, monkeypatch) -> None:
    import fixtures.options as options

    calls = []
    real = options._resolve_config
    monkeypatch.setattr(options, "_resolve_config", lambda c: calls.append(1) or real(c))
    monkeypatch.setenv("MECH_CACHE_DIR", str(tmp_path))

    class Config(_Config):
        stash = pytest.Stash()

    cfg = Config()
    assert options.resolve_config(cfg) is options.resolve_config(cfg) and len(calls) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-new-tokens", "0"], "ERROR: --max-new-tokens must be >= 1, got 0"),
        (["--cache-dir", "{file}"], "ERROR: --cache-dir {file} is a file, not a directory"),
        (["--device", "cuda"], "ERROR: --device cuda: CUDA is not available here"),
        (["--ray-address", "127.0.0.1:{port}"], "ERROR: --ray-address '127.0.0.1:{port}': nothing accepts connections"),
    ],
    ids=["max_new_tokens", "cache_dir_file", "device_cuda", "ray_dead"],
)
def test_suite_stops_with_one_line_before_the_model_loads(pytester: pytest.Pytester, tmp_path: Path, monkeypatch,
                                                          args: list[str], message: str) -> None:
    """``pytest hypotheses/`` with a bad option: one ERROR line (exit 4, a usage error), no traceback, and the
    last reports and the cache left as they were."""
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    root = Path(__file__).resolve().parent.parent
    a_file = tmp_path / "cache.txt"
    a_file.write_text("keep me")
    fill = {"file": str(a_file), "port": str(_dead_port())}
    args = [a.format(**fill) for a in args]
    message = message.format(**fill)
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "findings.json").write_text('{"complete": true}')
    (reports / "hypotheses.html").write_text("<html>last complete report</html>")
    before = _files(tmp_path)
    monkeypatch.setenv("MECH_REPORTS_DIR", str(reports))
    result = pytester.runpytest_subprocess(
        str(root / "hypotheses"), "--rootdir", str(root), "-c", str(root / "pyproject.toml"),
        "-p", "no:cacheprovider", *args, timeout=120)
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str()[-2000:] + result.stderr.str()[-2000:]
    lines = result.stderr.lines + result.stdout.lines
    errors = [line for line in lines if line.startswith("ERROR:")]
    assert len(errors) == 1 and errors[0].startswith(message), errors
    assert not [line for line in lines if "Traceback" in line]
    assert _files(tmp_path) == before
