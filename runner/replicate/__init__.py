"""Replication: the primary claims of the suite across models, prompt sets and precisions, side by side.

A finding about one model on one prompt set is an anecdote; this runs the pre-specified primary claim of every
hypothesis for each (model, prompt set, dtype) combination and draws the comparison. It sits above the suite
(imports point down: ``runner`` -> ``fixtures``/``hypotheses`` -> ``mech``) and reads the suite's own
configuration validator (:func:`fixtures.config.check_set_args`), verdicts and hypothesis families
(:mod:`fixtures.report`) instead of copying them. One module per concept:

1. :mod:`.specs`: the runs (:class:`~.specs.RunSpec`, one per model x prompt set x dtype) and every input check,
   each failure one line saying how to fix it, before any expensive work: the models resolve (registry name with
   its data wheels installed or already prepared, local dir, ``.gguf`` file, hub id), the prompt files load and
   validate, the ``--set`` items pass the suite's validator. A prompt set is ``pairs`` (the project's), a file
   (trained, selected and judged on), or ``eval:FILE`` (trained and selected on the pairs, judged on FILE: the
   suite's ``--eval-prompts``).
2. :mod:`.memory`: each model's :mod:`mech.memory` estimate at the run's dtype/quantization against available RAM
   (or GPU memory on CUDA). A model that would swap is refused, not started.
3. :mod:`.run`: a collect-only pass of the suite checks its options exactly as the runs will see them; then for
   each run, ``pytest hypotheses/ -m primary`` as a subprocess with its own reports dir
   ``<out>/replication/<run>/`` and the shared ``--cache-dir``: every sweep lands in the disk cache as it
   finishes, so a killed replication resumes where it stopped. A finished run leaves a stamp (``run.json``) keyed
   by its inputs and the source of the suite and the library; a re-run with the same key reuses it without
   starting pytest, and any change re-runs it (warm from the disk cache).
4. :mod:`.gather`: each run's findings (a ``-m primary`` run is partial by construction) as rows of claims with one
   cell per run. A run that ended without findings (crash, kill, usage error) gives an ``error`` cell for every
   claim, never a verdict.
5. :mod:`.depth` and :mod:`.stability`: per run, the layer-normalized depth (layer / n_layers) of the selected
   refusal direction (H4), the early probe layer (H2) and the top attribution heads (H1), so "where" compares
   across models of different depths; and, where the suite recorded it, how often each selection recurs over
   bootstrap resamples (flagged below one half).
6. :mod:`.figures`, :mod:`.page`, :mod:`.table`: ``<out>/replication.json``, ``<out>/replication.html``
   (self-contained, plotly.js inlined, opens offline; read top-down: the verdict grid with a link from every cell
   to its run's report, the forest plots, the depths, the stability) and ``<out>/replication.md`` (the
   replication table for the README: per primary and run, verdict, effect [CI], n, p, Holm p, and the depths).
7. :mod:`.main`: :func:`~.main.replicate` and the command line ``python -m runner replicate``.
"""
