"""Runners above the suite: they launch ``pytest hypotheses/`` many times and read its findings, using the suite's
own configuration and verdicts (imports point down: runner -> fixtures/hypotheses -> mech)."""
