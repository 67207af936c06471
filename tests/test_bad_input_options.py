"""Every option, env var and ``--set`` item is checked before the model loads (issue 26, items 1 and 7): one
validator (``fixtures/config.py`` :func:`parse_set`) serves the suite, ``--plan`` and ``python -m runner replicate``;
a bad value is one line, exit 4, nothing written. Also: the reports folder must be writable, ``--judge`` must not
be the model under study, a model or prompt set named twice in a replication, a malformed ``-k`` under ``--plan``,
and ``--co`` exits 0 without calling the committed snapshots unused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fixtures.config import RULES, ConfigError, SuiteConfig, parse_set, rule_for
from fixtures.tiny_models import build_tiny_model

ROOT = Path(__file__).resolve().parents[1]


def _one_line(e: BaseException) -> str:
    msg = str(e)
    assert msg and "\n" not in msg, f"not one line: {msg!r}"
    return msg


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


BAD_SET = [
    ("n_random_primary=abc", "--set 'n_random_primary=abc': expected an integer, got 'abc'; n_random_primary is int"),
    ("no_such_field=3", "'no_such_field' is not a field of the suite configuration"),
    ("n_random_primar=3", "did you mean n_random_primary?"),
    ("n_random_primary", "expected NAME=VALUE, e.g. --set n_random_primary=200"),
    ("split=0.5,0.5", "--set split: three positive fractions summing to 1 (train, validation, test), got 0.5,0.5"),
    ("split=0.5,0.5,0", "three positive fractions"),
    ("alpha=1.5", "--set alpha: alpha must lie in (0, 1), got 1.5; e.g. --set alpha=0.05 (the default)"),
    ("alpha=nan", "expected a finite number, got 'nan'"),
    ("harmful_min=2", "harmful_min must lie in (0, 1), got 2"),
    ("coherence_quantile=5", "coherence_quantile must lie in (0, 1), got 5"),
    ("n_random_per_category=0", "n_random_per_category must be at least 1, got 0"),
    ("n_random_primary=-3", "n_random_primary must be at least 1, got -3"),
    ("head_fraction=0", "head_fraction must lie in (0, 1], got 0"),
    ("kl_threshold=-1", "kl_threshold must be > 0, got -1"),
    ("harmless_max=0.9", "harmless_max (0.9) must be below harmful_min (0.8)"),
    ("gate_open=maybe", "expected true or false, got 'maybe'"),
]


@pytest.mark.parametrize(("item", "fragment"), BAD_SET, ids=[i for i, _ in BAD_SET])
def test_bad_set_item_is_one_line_naming_value_and_fix(item: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_set([("--set", item)], 64)
    assert fragment in _one_line(ei.value), str(ei.value)


def test_good_set_items_and_meaningful_zeros_pass() -> None:
    cfg = parse_set([("--set", "min_refusals=0"), ("--set", "n_random_primary=5"), ("--set", "split=0.6,0.2,0.2"),
                     ("--set", "gate_open=on"), ("--set", "induce_threshold=-2")], 64)
    assert (cfg.min_refusals, cfg.n_random_primary, cfg.split, cfg.gate_open, cfg.induce_threshold) == (
        0, 5, (0.6, 0.2, 0.2), True, -2.0)
    assert parse_set([], 256).max_new_tokens == 256  # a long generation with the default length probe is fine


def test_length_probe_shorter_than_generation_is_refused_only_when_set() -> None:
    with pytest.raises(ConfigError, match="length_probe_tokens \\(8\\) is shorter than max_new_tokens \\(64\\)"):
        parse_set([("--set", "length_probe_tokens=8")], 64)


def test_every_numeric_field_has_a_rule_or_a_kind_rule() -> None:
    """The table is data: a field without an entry still gets the rule of its kind (a new ``n_*`` count field of
    issue 21 is checked >= 1 without an edit here), and each rule of the table names a real field."""
    d = SuiteConfig()
    names = set(SuiteConfig.__dataclass_fields__)
    assert set(RULES) <= names
    for name in names:
        default = getattr(d, name)
        rule = rule_for(name, default)
        if isinstance(default, int) and not isinstance(default, bool) and name.startswith("n_"):
            # a count is at least 1, unless its rule says why 0 means something (e.g. "leave that control out")
            assert rule is not None and (not rule.holds(0) or rule.why) and rule.holds(default), name
        if rule is not None:
            assert rule.holds(default), f"the default of {name} breaks its own rule"
    assert rule_for("n_new_count_of_issue_21", 100).describe() == "must be at least 1"


def test_mech_set_env_items_are_named_as_such(monkeypatch) -> None:
    from fixtures.config import set_items

    class Cfg:
        def getoption(self, name, default=None):
            return ["alpha=0.01"]

    monkeypatch.setenv("MECH_SET", "n_random_primary=7; alpha=2")
    items = set_items(Cfg())
    assert items == [("MECH_SET item", "n_random_primary=7"), ("MECH_SET item", " alpha=2"), ("--set", "alpha=0.01")]
    with pytest.raises(ConfigError, match=r"^MECH_SET item alpha: alpha must lie in \(0, 1\), got 2"):
        parse_set(items[:2], 64)


def test_replicate_uses_the_suites_validator() -> None:
    """``python -m runner replicate --set`` gives the very line the suite gives (the runner calls the suite's own
    validator, :func:`fixtures.config.check_set_args`)."""
    from runner.replicate.specs import ReplicationError, check_set_items

    for item in ("alpha=1.5", "harmful_min=2", "n_random_per_category=0", "split=0.5,0.5", "nonsense"):
        with pytest.raises(ConfigError) as suite_err:
            parse_set([("--set", item)], None)
        with pytest.raises(ReplicationError) as rep_err:
            check_set_items([item])
        assert str(rep_err.value) == str(suite_err.value)
    check_set_items(["n_random_primary=5", "gate_open=false"])


def test_replicate_refuses_a_model_or_prompt_set_named_twice(tmp_path: Path) -> None:
    from runner.replicate.specs import ReplicationError, check_inputs

    with pytest.raises(ReplicationError) as ei:
        check_inputs(["smollm2-135m-instruct", "smollm2-135m-instruct"], ["pairs"], tmp_path)
    assert "--models names smollm2-135m-instruct twice" in _one_line(ei.value)
    with pytest.raises(ReplicationError, match="--prompts names pairs twice"):
        check_inputs(["smollm2-135m-instruct"], ["pairs", "pairs"], tmp_path)


# ------------------------------------------------------------------------------------ the suite, end to end


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tiny") / "tiny-qwen2"
    tiny = build_tiny_model("qwen2", seed=0)
    tiny.model.save_pretrained(d)
    tiny.tokenizer.save_pretrained(d)
    return d


def suite_usage_error(pytester: pytest.Pytester, tmp_path: Path, monkeypatch, tiny_dir: Path, *args: str,
                      env: dict[str, str] | None = None) -> str:
    """Run ``pytest hypotheses/`` on the tiny model; assert exit 4, one ERROR line, no traceback, the last reports
    and the cache untouched (the model was never loaded: nothing reached the cache), and return the line."""
    reports = tmp_path / "reports"
    reports.mkdir(exist_ok=True)
    (reports / "findings.json").write_text('{"complete": true}')
    (reports / "hypotheses.html").write_text("<html>last complete report</html>")
    (tmp_path / "cache").mkdir(exist_ok=True)
    before = _files(tmp_path)
    monkeypatch.setenv("MECH_REPORTS_DIR", str(reports))
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    result = pytester.runpytest_subprocess(
        str(ROOT / "hypotheses"), "--rootdir", str(ROOT), "-c", str(ROOT / "pyproject.toml"), "-p",
        "no:cacheprovider", "--model", str(tiny_dir), "--cache-dir", str(tmp_path / "cache"), *args, timeout=300)
    out = result.stdout.lines + result.stderr.lines
    assert result.ret == pytest.ExitCode.USAGE_ERROR, "\n".join(out[-30:])
    errors = [ln for ln in out if ln.startswith("ERROR:")]
    assert len(errors) == 1 and not [ln for ln in out if "Traceback" in ln or "INTERNALERROR" in ln], out[-30:]
    assert _files(tmp_path) == before, "a refused run wrote or removed something"
    return errors[0]


@pytest.mark.parametrize(("args", "env", "fragment"), [
    (["--set", "n_random_primary=abc"], {}, "ERROR: --set 'n_random_primary=abc': expected an integer"),
    (["--set", "no_field=1"], {}, "'no_field' is not a field of the suite configuration"),
    (["--set", "alpha"], {}, "expected NAME=VALUE"),
    (["--set", "split=0.5,0.5"], {}, "three positive fractions summing to 1"),
    (["--set", "alpha=1.5"], {}, "alpha must lie in (0, 1), got 1.5"),
    (["--set", "harmful_min=2"], {}, "harmful_min must lie in (0, 1)"),
    (["--set", "coherence_quantile=5"], {}, "coherence_quantile must lie in (0, 1)"),
    (["--set", "n_random_per_category=0"], {}, "n_random_per_category must be at least 1, got 0"),
    ([], {"MECH_SET": "alpha=1.5"}, "ERROR: MECH_SET item alpha: alpha must lie in (0, 1)"),
    (["--plan", "--set", "alpha=1.5"], {}, "alpha must lie in (0, 1)"),
    (["--plan", "-k", "layer12 and"], {}, "Wrong expression passed to '-k': layer12 and: at column 12"),
    (["--max-new-tokens", "600"], {}, "--max-new-tokens 600 is not below the context of tiny-qwen2 (512 tokens)"),
    ([], {"MECH_NO_CACHE": "yess"}, "ERROR: MECH_NO_CACHE='yess' is not one of 1, true, yes, 0, false, no"),
], ids=["type", "unknown", "no_equals", "split", "alpha", "harmful_min", "quantile", "empty_null", "env", "plan",
        "plan_bad_k", "max_new_tokens_vs_context", "switch_env"])
def test_bad_input_is_one_line_exit_4_before_the_model_loads(pytester, tmp_path, monkeypatch, tiny_dir, args, env,
                                                              fragment) -> None:
    line = suite_usage_error(pytester, tmp_path, monkeypatch, tiny_dir, *args, env=env)
    assert fragment in line, line


def test_judge_equal_to_the_model_is_refused(pytester, tmp_path, monkeypatch, tiny_dir) -> None:
    line = suite_usage_error(pytester, tmp_path, monkeypatch, tiny_dir, "--judge", str(tiny_dir))
    assert f"--judge {tiny_dir} is the model under study" in line and "pick another judge" in line


def test_reports_folder_must_be_writable(pytester, tmp_path, monkeypatch, tiny_dir) -> None:
    a_file = tmp_path / "reports-file"
    a_file.write_text("not a folder")
    line = suite_usage_error(pytester, tmp_path, monkeypatch, tiny_dir, env={"MECH_REPORTS_DIR": str(a_file)})
    assert f"the reports folder (MECH_REPORTS_DIR or reports/) {a_file} is a file, not a directory" in line
    under = a_file / "sub"
    line = suite_usage_error(pytester, tmp_path, monkeypatch, tiny_dir, env={"MECH_REPORTS_DIR": str(under)})
    assert f"{under} cannot be written" in line and "point MECH_REPORTS_DIR at another directory" in line


def test_a_full_or_read_only_reports_folder_is_one_line(tmp_path: Path, monkeypatch) -> None:
    """Root ignores permissions, so a full / read-only device is simulated where the probe file is written."""
    import tempfile

    from fixtures.options import check_reports_dir

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", full)
    with pytest.raises(pytest.UsageError) as ei:
        check_reports_dir(tmp_path)
    assert "cannot be written (No space left on device); make it writable, free space" in _one_line(ei.value)


def test_collect_only_exits_0_and_never_suggests_deleting_snapshots(pytester, tmp_path, monkeypatch, tiny_dir):
    monkeypatch.setenv("MECH_REPORTS_DIR", str(tmp_path / "reports"))
    snap = ROOT / "hypotheses" / "__snapshots__" / "test_snapshots.ambr"
    before = snap.read_bytes()
    result = pytester.runpytest_subprocess(
        str(ROOT / "hypotheses"), "--rootdir", str(ROOT), "-c", str(ROOT / "pyproject.toml"), "-p",
        "no:cacheprovider", "--model", str(tiny_dir), "--cache-dir", str(tmp_path / "cache"), "--co", "-q",
        timeout=300)
    out = result.stdout.str() + result.stderr.str()
    assert result.ret == 0, out[-2000:]
    assert "--snapshot-update" not in out  # syrupy's advice after "N snapshots unused": it deletes them
    assert "snapshots unused" not in out and "snapshot unused" not in out
    assert snap.read_bytes() == before
    assert not (tmp_path / "reports" / "findings.json").exists()  # --co is partial: the last report stays


def test_corrupt_gguf_is_one_line_with_the_fix(tmp_path: Path) -> None:
    from mech.models import n_layers_of
    from mech.registry import ModelError

    bad = tmp_path / "model.gguf"
    bad.write_bytes(os.urandom(2048))
    with pytest.raises(ModelError) as ei:
        n_layers_of(str(bad), tmp_path / "cache")
    msg = _one_line(ei.value)
    assert f"corrupt or unsupported GGUF {bad}" in msg and "download the file again" in msg
