"""No bad input loses the last report (issue 26, item 2 and 4): a run in which every claim erred, or which could not
write its cache, is written as partial with its reason; ``baseline.json`` follows the same rule as
``findings.json``; a claim whose statistic is NaN gets no verdict. Checked on synthetic claim files run as a
``hypotheses/`` suite (pytester), and on the disk cache directly."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch

from mech.cache import DiskCache

ROOT = Path(__file__).resolve().parents[1]

_CONFTEST = '''
import pytest
from fixtures.report import report_file, watch_cache

pytest_plugins = ["fixtures.options", "fixtures.config", "fixtures.report"]


def pytest_configure(config):
    config.addinivalue_line("markers", "localized_circuit: H1")
    config.addinivalue_line("markers", "primary: primary")


@pytest.fixture(scope="session")
def cache(pytestconfig):
    import os
    from mech.cache import DiskCache
    c = DiskCache(os.environ["SYN_CACHE"])
    watch_cache(pytestconfig, c)
    return c


@pytest.fixture(scope="session")
def baseline_file(pytestconfig):
    report_file(pytestconfig, "baseline.json", {"rates": {"harmful": 0.9}, "prompt_set": "syn"})
'''

_GOOD = '''
import pytest

pytestmark = [pytest.mark.localized_circuit]


@pytest.mark.primary
def test_holds(claim, baseline_file, cache):
    """A claim whose assertion holds."""
    v = cache.get_or_compute("syn", {"k": 1}, lambda: 0.001)
    claim.result(p_value=v, effect=1.0, n=10, test="t")


def test_also_holds(claim):
    """Another one."""
    claim.result(p_value=0.01, n=10, test="t")
'''

_ALL_ERR = '''
import pytest

pytestmark = [pytest.mark.localized_circuit]


def test_crashes(claim, baseline_file):
    """A bad --set would make every claim err like this."""
    {}["missing"]


def test_crashes_too(claim):
    """Another."""
    raise ValueError("bad value")
'''

_NAN = '''
import pytest

pytestmark = [pytest.mark.localized_circuit]


def test_empty_null(claim):
    """A permutation test against zero random sets: p is NaN."""
    p = float("nan")
    claim.result(statistic=0.3, p_value=p, n=0, test="permutation")
    assert p < 0.05, f"p = {p}"


def test_nan_effect_that_passes(claim):
    """NaN compares False, so a `not (x < t)` assertion would pass on NaN."""
    e = float("nan")
    claim.result(effect=e, p_value=0.01, n=3, test="t")
    assert not e < 0.5


def test_fine(claim):
    """A finite result keeps its verdict."""
    claim.result(p_value=0.01, n=3, test="t")
'''


def _run(pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str, *args: str,
         cache: Path | None = None):
    pytester.makeconftest(_CONFTEST)
    (pytester.path / "hypotheses").mkdir(exist_ok=True)
    (pytester.path / "hypotheses" / "test_claims.py").write_text(body)
    reports = tmp_path / "reports"
    reports.mkdir(exist_ok=True)
    monkeypatch.setenv("PYTHONPATH", f"{ROOT}{os.pathsep}{pytester.path}")
    monkeypatch.setenv("MECH_REPORTS_DIR", str(reports))
    monkeypatch.setenv("MECH_CACHE_DIR", str(tmp_path / "mech-cache"))
    monkeypatch.setenv("SYN_CACHE", str(cache or tmp_path / "cache"))
    result = pytester.runpytest_subprocess("hypotheses", "--rootdir", str(pytester.path), "-p", "no:cacheprovider",
                                           "-q", *args)
    return result, reports


def _last_complete(reports: Path) -> None:
    (reports / "findings.json").write_text('{"last": "complete"}')
    (reports / "baseline.json").write_text('{"last": "complete"}')


def test_a_complete_run_replaces_the_reports(pytester, tmp_path, monkeypatch):
    """The control: a complete run with verdicts does replace findings.json and baseline.json."""
    (tmp_path / "reports").mkdir()
    _last_complete(tmp_path / "reports")
    result, reports = _run(pytester, tmp_path, monkeypatch, _GOOD)
    assert result.ret == 0, result.stdout.str()[-2000:]
    f = json.loads((reports / "findings.json").read_text())
    assert f["run"]["complete"] and f["summary"]["supported"] == 2
    b = json.loads((reports / "baseline.json").read_text())
    assert b["rates"] == {"harmful": 0.9} and b["run"]["complete"] and b["prompt_set"] == "syn"
    assert not list(reports.glob("*.partial.json")) and not list(reports.glob(".*inprogress"))


def test_a_run_where_every_claim_erred_never_replaces_the_last_report(pytester, tmp_path, monkeypatch):
    (tmp_path / "reports").mkdir()
    _last_complete(tmp_path / "reports")
    result, reports = _run(pytester, tmp_path, monkeypatch, _ALL_ERR)
    assert json.loads((reports / "findings.json").read_text()) == {"last": "complete"}
    assert json.loads((reports / "baseline.json").read_text()) == {"last": "complete"}
    f = json.loads((reports / "findings.partial.json").read_text())
    assert not f["run"]["complete"]
    assert any("every one of the 2 claims erred" in w for w in f["run"]["partial_because"]), f["run"]
    b = json.loads((reports / "baseline.partial.json").read_text())
    assert b["run"]["partial_because"] == f["run"]["partial_because"]
    assert "kept the last complete findings.json" in result.stdout.str()


def test_a_run_that_could_not_write_its_cache_never_replaces_the_last_report(pytester, tmp_path, monkeypatch):
    (tmp_path / "reports").mkdir()
    _last_complete(tmp_path / "reports")
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache dir should be")
    result, reports = _run(pytester, tmp_path, monkeypatch, _GOOD, cache=blocker / "results")
    assert json.loads((reports / "findings.json").read_text()) == {"last": "complete"}
    f = json.loads((reports / "findings.partial.json").read_text())
    assert f["summary"]["supported"] == 2  # the verdicts are there, in the partial report
    why = "; ".join(f["run"]["partial_because"])
    assert "could not be written" in why and "not kept" in why, why
    assert (reports / "baseline.partial.json").is_file()


def test_a_partial_selection_writes_baseline_partial(pytester, tmp_path, monkeypatch):
    """-k (another selection, another prompt set...): baseline.json is kept, the run's goes to baseline.partial.json
    and says why."""
    (tmp_path / "reports").mkdir()
    _last_complete(tmp_path / "reports")
    result, reports = _run(pytester, tmp_path, monkeypatch, _GOOD, "-k", "holds")
    assert json.loads((reports / "baseline.json").read_text()) == {"last": "complete"}
    b = json.loads((reports / "baseline.partial.json").read_text())
    assert not b["run"]["complete"] and any("-k" in w for w in b["run"]["partial_because"])


def test_nan_never_reaches_a_verdict(pytester, tmp_path, monkeypatch):
    result, reports = _run(pytester, tmp_path, monkeypatch, _NAN)
    claims = {c["id"].split("::")[1]: c for c in json.loads((reports / "findings.json").read_text())["claims"]}
    for name in ("test_empty_null", "test_nan_effect_that_passes"):
        assert claims[name]["verdict"] == "not tested", claims[name]
        assert "is NaN" in claims[name]["message"]
    assert "p_value is NaN" in claims["test_empty_null"]["message"]
    assert claims["test_fine"]["verdict"] == "supported"


# ------------------------------------------------------------------------------------------- the disk cache


def test_a_full_cache_disk_keeps_the_result_and_counts_it_unstored(tmp_path, monkeypatch):
    cache = DiskCache(tmp_path / "c")

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache, "store", full)
    with pytest.warns(RuntimeWarning, match="No space left on device"):
        assert cache.get_or_compute("ns", {"a": 1}, lambda: {"x": 1}) == {"x": 1}
    assert cache.unstored["ns"] == 1 and "No space left on device" in cache.unstored_reason


def test_a_corrupt_cache_entry_is_named_deleted_and_recomputed(tmp_path):
    cache = DiskCache(tmp_path / "c")
    cache.get_or_compute("t", {"a": 1}, lambda: {"w": torch.ones(2)}, fmt="torch")
    (entry,) = (tmp_path / "c" / "t").glob("*.pt")
    entry.write_bytes(b"\x80\x04garbage that is no torch file")
    fresh = DiskCache(tmp_path / "c")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = fresh.get_or_compute("t", {"a": 1}, lambda: {"w": torch.zeros(2)}, fmt="torch")
    assert torch.equal(out["w"], torch.zeros(2))
    msgs = [str(x.message) for x in w if issubclass(x.category, RuntimeWarning)]
    assert any(str(entry) in m and "corrupt" in m and "deleted it and recomputing" in m for m in msgs), msgs
    assert "\n" not in msgs[0]


@pytest.mark.slow
def test_ctrl_c_exits_2_keeps_the_last_report_and_names_the_partial_page(tmp_path: Path) -> None:
    """Ctrl-C in the middle of ``pytest hypotheses/`` (tiny model): exit 2 (interrupted), not 3; syrupy neither
    calls the unreached snapshots unused nor advises ``--snapshot-update`` (which deletes them); the last complete
    report is kept and the log names the page as it is on disk."""
    import signal
    import subprocess
    import sys
    import time

    from fixtures.tiny_models import build_tiny_model
    from tests.helpers import small_prompt_file

    tiny = build_tiny_model("qwen2", seed=0)
    tiny.model.save_pretrained(tmp_path / "tiny")
    tiny.tokenizer.save_pretrained(tmp_path / "tiny")
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "findings.json").write_text('{"last": "complete"}')
    (reports / "hypotheses.html").write_text("<html>last complete</html>")
    env = {**os.environ, "MECH_REPORTS_DIR": str(reports), "MECH_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("MECH_SET", None)
    prompts = small_prompt_file(tmp_path / "p.csv")

    def interrupted_run() -> tuple[int, str]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pytest", str(ROOT / "hypotheses"), "--rootdir", str(ROOT), "-c",
             str(ROOT / "pyproject.toml"), "-p", "no:cacheprovider", "--model", str(tmp_path / "tiny"), "--prompts",
             str(prompts), "--max-new-tokens", "4", "--no-progress", "-q"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:  # the plan is printed when the run starts: interrupt inside the first stages
            lines.append(line)
            if "no estimate" in line or "total if nothing is cached" in line:
                time.sleep(2)
                proc.send_signal(signal.SIGINT)
                break
        rest, _ = proc.communicate(timeout=300)
        return proc.returncode, "".join(lines) + rest

    code, out = interrupted_run()
    # pytest's own KeyboardInterrupt report can fail where the interrupt lands in a frame without a line number
    # (CPython 3.11: "unsupported operand type(s) for -: 'NoneType' and 'int'" in _pytest/_code/code.py): that
    # is pytest's bug, not this project's; interrupt once more rather than fail on it
    if code != pytest.ExitCode.INTERRUPTED and "'NoneType' and 'int'" in out and "_pytest/_code/code.py" in out:
        code, out = interrupted_run()
    proc = subprocess.CompletedProcess([], code)
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, out[-3000:]
    assert "--snapshot-update" not in out and "snapshots unused" not in out
    assert "KeyboardInterrupt" in out and "INTERNALERROR" not in out
    assert json.loads((reports / "findings.json").read_text()) == {"last": "complete"}
    assert (reports / "hypotheses.html").read_text() == "<html>last complete</html>"
    assert (reports / "findings.partial.json").is_file() and (reports / "hypotheses.partial.html").is_file()
    # the page is ours (hypotheses.partial.html); pytest-html's test log beside it is what its line names
    assert f"Generated html report: {(reports / 'pytest-log.partial.html').resolve().as_uri()}" in out
    assert not list(reports.glob(".*inprogress*"))
