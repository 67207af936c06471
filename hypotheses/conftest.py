"""Parametrize claims by the categories of the prompt set in use (``-k cybercrime``) and by the model's
layers (``-k layer12``); check every input before the model loads (options, ``--set``, the reports folder, the
prompt files, data use by prompt text, the context and memory of the longest batch); mark the claims that cannot
run in this configuration `not tested` before anything runs (``--quantize 4bit`` on CPU)."""

from __future__ import annotations

import pytest

from fixtures.config import get_suite_config
from fixtures.eval_set import load_eval_set
from fixtures.families import FAMILIES
from fixtures.options import check_reports_dir, resolve_config
from fixtures.report import reports_path
from mech.context import ContextError, check_batch_memory, check_context, context_length, prompt_lengths
from mech.memory import memory_budget
from mech.models import load_tokenizer, n_layers_of, pick_device, pick_dtype
from mech.prompts import PromptFileError, PromptSet, benign_alarming, default_pairs, load_prompts
from mech.registry import ModelError


def _categories(config: pytest.Config) -> list[str]:
    """The categories of --prompts and --eval-prompts (both checked here: a bad file is a usage error)."""
    cfg = resolve_config(config)
    try:
        ps = load_prompts(cfg.prompts) if cfg.prompts else default_pairs()
    except PromptFileError as e:
        raise pytest.UsageError(f"prompts: {e}") from None
    cats = set(ps.categories())
    if cfg.eval_prompts:
        try:
            cats |= set(load_eval_set(cfg.eval_prompts).categories())
        except PromptFileError as e:
            raise pytest.UsageError(f"--eval-prompts: {e}") from None
    return sorted(cats)


def _n_layers(config: pytest.Config) -> int:
    cfg = resolve_config(config)
    try:
        return n_layers_of(cfg.model, cfg.cache_dir)
    except ModelError as e:
        raise pytest.UsageError(f"model: {e}") from None


def _prompt_sets(config: pytest.Config) -> list[tuple[str, PromptSet]]:
    cfg = resolve_config(config)
    sets = [("--prompts " + cfg.prompts if cfg.prompts else "data/refusal_pairs.json",
             load_prompts(cfg.prompts) if cfg.prompts else default_pairs())]
    if cfg.eval_prompts:
        sets.append(("--eval-prompts " + cfg.eval_prompts, load_eval_set(cfg.eval_prompts)))
    sets.append(("data/benign_alarming.json", benign_alarming()))
    return sets


def _check_data_use(config: pytest.Config, sets: list[tuple[str, PromptSet]]) -> None:
    """Prompt texts (normalized: case, whitespace, invisible characters), not ids: an --eval-prompts row whose text
    is also a selecting (train or validation) prompt is refused; a text repeated inside --prompts is kept in one
    split (PromptSet.split) and said so."""
    cfg = resolve_config(config)
    (name, ps) = sets[0]
    dups = ps.duplicate_texts()
    if dups:
        tr = config.pluginmanager.get_plugin("terminalreporter")
        if tr is not None:
            tr.write_line(f"prompts: {len(dups)} prompt text(s) of {name} appear more than once (e.g. ids "
                          f"{', '.join(dups[0][:3])}): each is kept in one split, never selected on in one and judged "
                          "in another", yellow=True)
    if cfg.eval_prompts:
        suite = get_suite_config(config)
        train, val, _ = ps.split(suite.split, seed=suite.split_seed)
        selecting = PromptSet("selecting", tuple(train) + tuple(val))
        same = selecting.same_texts(sets[1][1])
        if same:
            q, p = same[0]
            raise pytest.UsageError(
                f"--eval-prompts {cfg.eval_prompts}: {len(same)} row(s) have the text of a prompt that selects (train or "
                f"validation split of {name}), e.g. {q.id.removeprefix('eval:')!r} = {p.id!r}: the claims would be "
                "judged on prompts they were selected on; remove those rows from one of the files")


def _check_context(config: pytest.Config, sets: list[tuple[str, PromptSet]]) -> None:
    """Every prompt fits the model's context with the tokens generated, and the longest batch fits in memory:
    checked with the tokenizer and config only, before the model loads (mech.context)."""
    cfg = resolve_config(config)
    suite = get_suite_config(config)
    try:
        tok, model_cfg, display = load_tokenizer(cfg.model, cfg.cache_dir)
        rows = [(name, i, p.id.removeprefix("eval:"), p.prompt) for name, ps in sets for i, p in enumerate(ps, 1)]
        lengths = prompt_lengths(tok, rows, display)
    except ModelError as e:
        raise pytest.UsageError(f"model: {e}") from None
    new = max(suite.max_new_tokens, suite.length_probe_tokens)
    what = "--max-new-tokens" if new == suite.max_new_tokens else "length_probe_tokens, the length check"
    try:
        check_context(lengths, new, context_length(model_cfg), display, what)
        if cfg.device_map is None and not cfg.distributed:
            dev = pick_device(cfg.device)
            budget, budget_what = memory_budget(cfg.device)
            check_batch_memory(model_cfg, lengths, new, 64, str(pick_dtype(cfg.dtype, dev)).replace("torch.", ""),
                               cfg.quantize, budget, budget_what, display)
    except ContextError as e:
        raise pytest.UsageError(str(e)) from None


def quantized_cpu_reason(config: pytest.Config) -> str | None:
    """Why the claims that rank heads by attribution patching cannot run in this configuration, or None:
    attribution patching needs gradients through every linear layer, and bitsandbytes' 4-bit CPU kernel
    (gemv_4bit, inference only) has none. Decided from the options, before the model loads."""
    cfg = resolve_config(config)
    if cfg.quantize == "4bit" and pick_device(cfg.device).type == "cpu":
        return ("--quantize 4bit on CPU: attribution patching needs gradients through the model and bitsandbytes' "
                "4-bit CPU kernel has none, so heads cannot be ranked; run without --quantize to test this claim")
    return None


_NEEDS_GRADIENTS = ("atp_noise",)  # stages that backpropagate through the model
_CATS = pytest.StashKey[list[str]]()
_LAYERS = pytest.StashKey[int]()


def _check_expressions(config: pytest.Config) -> None:
    """A malformed ``-k`` / ``-m`` expression is refused before anything (pytest itself finds it only after
    collection, so ``--plan`` printed the plan first)."""
    from _pytest.mark.expression import Expression

    for flag, expr in (("-k", config.option.keyword), ("-m", config.option.markexpr)):
        if expr and expr.strip():
            try:
                Expression.compile(expr.lstrip())
            except SyntaxError as e:
                raise pytest.UsageError(f"Wrong expression passed to '{flag}': {expr}: at column {e.offset}: {e.msg}; "
                                        "fix the expression (e.g. -k \"layer12 and attn\")") from None


def pytest_configure(config: pytest.Config) -> None:
    """Check every option, ``--set`` item, --prompts and --model once, before collection and before the model
    loads: a bad one is a one-line usage error (exit 4) and nothing is written."""
    _check_expressions(config)
    resolve_config(config)
    get_suite_config(config)
    if not config.getoption("mech_plan", False):  # --plan writes nothing
        check_reports_dir(reports_path(config))
    config.stash[_CATS] = _categories(config)
    config.stash[_LAYERS] = _n_layers(config)
    try:
        sets = _prompt_sets(config)
    except PromptFileError as e:  # already reported by _categories; kept for safety
        raise pytest.UsageError(f"prompts: {e}") from None
    _check_data_use(config, sets)
    _check_context(config, sets)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "category" in metafunc.fixturenames:
        cats: list[str] = metafunc.config.stash[_CATS]
        metafunc.parametrize("category", cats, ids=cats)
    if "late_layer" in metafunc.fixturenames:
        n = metafunc.config.stash[_LAYERS]
        layers = list(range(n // 3, n))
        metafunc.parametrize("late_layer", layers, ids=[f"layer{L}" for L in layers])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Report order: baseline, H1, H2, H3, H4; each hypothesis's primary claim first."""
    order = [f.marker for f in FAMILIES]

    def key(ix: tuple[int, pytest.Item]) -> tuple:
        i, item = ix
        fam = next((k for k, m in enumerate(order) if item.get_closest_marker(m)), len(order))
        return (fam, item.get_closest_marker("primary") is None, i)

    items[:] = [it for _, it in sorted(enumerate(items), key=key)]
    reason = quantized_cpu_reason(config)
    if reason:
        for item in items:
            info = getattr(item, "_fixtureinfo", None)
            if info is not None and set(_NEEDS_GRADIENTS) & set(info.names_closure):
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.hookimpl(hookwrapper=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int):
    """An interrupted or stopped run (Ctrl-C, -x) ran only some snapshot tests: syrupy would call the others
    unused, add 1 to the exit status (Ctrl-C gave 3, an internal error's code) and advise --snapshot-update,
    which deletes the committed snapshots. Only a run that reached its end may judge snapshots unused."""
    if exitstatus == pytest.ExitCode.INTERRUPTED or session.shouldstop or session.shouldfail:
        if hasattr(session.config.option, "disable_unused_snapshots"):
            session.config.option.disable_unused_snapshots = True
    yield
