"""Exact activation patching between harmful and harmless runs: batched, end-aligned, fast by construction.

A *patch* copies activations of a **source** run into a **receiver** run and reads the refusal metric at the
receiver's last position. Two directions:

* ``harmful_to_harmless`` (alias ``denoise``): source = harmful prompt, receiver = its harmless twin. Does the
  patched component *induce* refusal?
* ``harmless_to_harmful`` (alias ``noise``): source = harmless, receiver = harmful. Does it *remove* refusal?

Effects are reported raw (the metric of the patched run) and **normalized** per pair,
``(patched - clean) / (source - clean)``: 0 = the receiver's own (clean) baseline, 1 = the source run's baseline.

Positions are **end-aligned** by default: negative indices from the end. The chat template's post-instruction
tokens (``<|im_end|>\\n<|im_start|>assistant\\n`` for Qwen: 5 tokens) are identical in every prompt, so position
``-i`` of the source is patched into position ``-i`` of the receiver although the prompts differ in length.
Non-negative (absolute) positions are allowed for pairs whose prompts have the same token length.

Granularity (see :func:`layer_patches`, :func:`head_patches`, :func:`neuron_patches`): layer x {resid_pre,
attn_out, mlp_out} x position (each position, or all together); every attention head (``attn.hook_z``); MLP
neurons (``mlp.hook_post``). A :class:`Patch` is a set of :class:`Site` s, so circuits (several heads in several
layers patched together) are patches too.

The package, one concept per module:

* :mod:`~mech.patching.spec` — directions, the component registry (one :class:`SiteComponent` per granularity),
  :class:`Site`, :class:`Patch`, and the builders ``layer_patches`` / ``head_patches`` / ``neuron_patches``;
* :mod:`~mech.patching.plan` — pairs and the metric checked, each patch's sites resolved per pair
  (:func:`prepare_sweep`);
* :mod:`~mech.patching.reference` — the reference runs on :class:`mech.engine.Engine` (the partial-forward engine,
  which lives below patching: the batched intervention scores of :mod:`mech.set_scores` run on it too);
* :mod:`~mech.patching.exact` — exact sweeps (``method="fast"``: batched partial forwards; ``"naive"``: one
  full HF forward per patch with hooks, the reference the tests compare against);
* :mod:`~mech.patching.attribution` — attribution patching (AtP), verified against exact patching;
* :mod:`~mech.patching.result` — :class:`PatchResult`.
"""

from mech.patching.attribution import (
    Verification,
    attribution_patching,
    attribution_sweep,
    verify_against_exact,
)
from mech.patching.exact import head_sweep, layer_sweep, neuron_sweep, patch_sweep
from mech.patching.plan import (
    Method,
    Metric,
    Plan,
    PreparedSweep,
    RefusalMetric,
    SweepOptions,
    as_pairs,
    check_metric,
    make_metric,
    make_plan,
    metric_name,
    prepare_sweep,
    sweep_positions,
)
from mech.patching.reference import ReferenceRuns, reference_runs
from mech.patching.result import PatchResult
from mech.patching.spec import (
    COMPONENT_REGISTRY,
    COMPONENTS,
    DENOISE,
    DIRECTIONS,
    LAYER_COMPONENTS,
    NOISE,
    Patch,
    PatchDirection,
    PatchingError,
    Site,
    SiteComponent,
    end_positions,
    head_patches,
    kind_hook,
    layer_patches,
    neuron_patches,
    normalize_direction,
    register_component,
    unit_patches,
)

__all__ = [
    "COMPONENTS",
    "COMPONENT_REGISTRY",
    "DENOISE",
    "DIRECTIONS",
    "LAYER_COMPONENTS",
    "NOISE",
    "PatchDirection",
    "Method",
    "Metric",
    "Patch",
    "PatchResult",
    "PatchingError",
    "Plan",
    "PreparedSweep",
    "ReferenceRuns",
    "RefusalMetric",
    "Site",
    "SiteComponent",
    "SweepOptions",
    "Verification",
    "as_pairs",
    "attribution_patching",
    "attribution_sweep",
    "check_metric",
    "end_positions",
    "head_patches",
    "head_sweep",
    "kind_hook",
    "layer_patches",
    "layer_sweep",
    "make_metric",
    "make_plan",
    "metric_name",
    "neuron_patches",
    "neuron_sweep",
    "normalize_direction",
    "patch_sweep",
    "prepare_sweep",
    "reference_runs",
    "register_component",
    "sweep_positions",
    "unit_patches",
    "verify_against_exact",
]
