"""The public entry points; the only place that orders the stages.

trace -> fold BatchNorm -> analyze (coupling groups) -> plan -> rewrite (minimize, compensate_ln) -> verify -> report
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from .coupling import Coupling, coupling_groups
from .errors import InputError, RewriteError, TraceError, VerificationError
from .planning import Plan, plan_removal
from .report import Report, count_macs, count_parameters, count_stored
from .tracing import Traced, _FactRecorder, dtype_guards, hooked_modules, preserved_buffers, refuse_wrappers, trace, working_copy
from .verify import verify as _verify

__all__ = ["analyze", "plan", "compress", "REPORT_KEY"]

REPORT_KEY = "srfx_report"


def _check_finite(model: nn.Module) -> None:
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.device.type == "meta":
            raise InputError(f"{name} is on the meta device and has no values: srfx reads the weights to find dead channels; "
                             "materialize the model first (model.to_empty(device=...) and load its state dict)")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise InputError(f"{name} holds NaN or Inf values: srfx cannot prove anything about them; fix the weights first.")


_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_dtypes(model: nn.Module) -> None:
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() or t.is_complex():
            if t.dtype not in _DTYPES:
                raise InputError(f"{name} is {t.dtype}: srfx handles float16, bfloat16, float32 and float64 models")


def _check_outputs(model: nn.Module, inputs: tuple) -> None:
    """Outputs must be tensors or (nested) tuples/lists/dicts of tensors: anything else
    cannot be compared, so nothing could be verified."""
    from torch.utils import _pytree as pytree

    with torch.no_grad(), preserved_buffers(model):
        out = model(*inputs)
    bad = [type(x).__name__ for x in pytree.tree_leaves(out) if not isinstance(x, torch.Tensor)]
    if bad:
        raise InputError(
            f"{type(model).__name__} returns a {bad[0]} among its outputs: srfx needs tensors or nested "
            "tuples/lists/dicts of tensors; wrap the model so forward returns only tensors."
        )


def _blame_an_unfaithful_trace(reference: nn.Module, traced: fx.GraphModule, inputs: tuple, random_inputs: int, failure: VerificationError) -> None:
    """A rewrite failed verification: if the traced graph it started from (the passes rewrite
    copies, so it is as fx recorded it) differs from the model too, the graph fx recorded was
    wrong to begin with; say so (TraceError) rather than blame the rewrite."""
    try:
        with preserved_buffers(traced):
            _verify(reference, traced, inputs, random_inputs=random_inputs)
    except VerificationError:
        raise TraceError(
            f"torch.fx's trace of {type(reference).__name__} computes something else than the model before srfx changed "
            f"anything (max relative error {failure.max_rel_error:.3e}). Its forward does something fx does not record: "
            "Python state it changes or reads (counters, caches, Python random numbers, values taken with .item()), "
            "or a write into a tensor that fx traced as a new one. Make forward a function of its inputs and weights "
            "(keep counters and caches outside it)."
        ) from failure


def _rebuilt(traced: fx.GraphModule, folded: fx.GraphModule, removal: Plan) -> tuple[str, ...]:
    """Parameters whose values the rewrite changed beyond slicing: weights and biases BatchNorm
    folding rescaled, and the weights of readers that absorbed a compensated norm."""
    before = dict(traced.named_parameters(remove_duplicate=False))
    names = {n for n, p in folded.named_parameters(remove_duplicate=False)
             if n in before and (p.shape != before[n].shape or not torch.equal(p, before[n]))}
    names |= {role.weight for site in removal.compensations for role in site.readers}
    return tuple(sorted(names))


def _kept_indices(before: fx.GraphModule, after: fx.GraphModule, removal: Plan) -> dict:
    """The plan's kept indices for the parameters of ``after`` that really are those slices of
    ``before``'s: the traced model before BatchNorm folding, so a bias that folding gave a
    bias-less conv is not described as the model's; readers compensate_ln widened are new
    tensors too, left out."""
    params_before = dict(before.named_parameters(remove_duplicate=False))
    params_after = dict(after.named_parameters(remove_duplicate=False))
    kept = {}
    for name, axes in removal.kept_indices().items():
        if name not in params_before or name not in params_after:
            continue
        shape = list(params_before[name].shape)
        for axis, keep in axes.items():
            shape[axis] = len(keep)
        if shape == list(params_after[name].shape):
            kept[name] = {axis: torch.as_tensor(keep, dtype=torch.long) for axis, keep in axes.items()}
    return kept


# a compensated norm costs its readers up to three columns (u, v, ones) per removed-channel set,
# and each removed channel frees at least one column of every reader: from this many removed
# channels on, compensation pays for itself, below it the rewrite is tried both ways
_COMPENSATION_PAYS_FROM = 4


def _rewrite(graph: fx.GraphModule, removal: Plan) -> fx.GraphModule:
    from srfx.passes import compensate_ln, minimize

    return compensate_ln(minimize(graph, removal).graph_module, removal).graph_module


def _smallest_rewrite(graph: fx.GraphModule, coupling: Coupling) -> tuple[Plan, fx.GraphModule]:
    """The plan and its rewrite, with compensation only where it makes the model smaller: a
    norm that loses a channel or two can cost its readers more columns than it frees, so such
    norms are also planned without absorption and the smaller result kept (never larger)."""
    removal = plan_removal(coupling)
    result = _rewrite(graph, removal)
    doubtful = [
        site.node for site in removal.compensations
        if site.readers and coupling.dims[site.in_dim].size - len(removal.keep(site.in_dim)) < _COMPENSATION_PAYS_FROM
    ]
    unabsorbed: frozenset = frozenset()
    stored = count_stored(result)
    for node in doubtful:
        trial = plan_removal(coupling, removal.constants, unabsorbed | {node})
        candidate = _rewrite(graph, trial)
        if count_stored(candidate) < stored:
            removal, result, unabsorbed, stored = trial, candidate, unabsorbed | {node}, count_stored(candidate)
    if removal.compensations and stored > count_stored(graph):
        # backstop (the count above makes it unreachable as far as we know): without
        # compensation the rewrite only removes and folds, which never adds a stored value
        removal = plan_removal(coupling, removal.constants, frozenset(site.node for site in removal.compensations))
        result = _rewrite(graph, removal)
    return removal, result


@contextlib.contextmanager
def _without_autocast():
    """An autocast region around the call is the user's execution policy, not the model: inside,
    tracing would record half-precision values and verification would measure bfloat16 rounding
    (and pass a rewrite that is wrong by that much). srfx works and verifies at the model's own
    dtypes; the result runs under the user's autocast like the model does."""
    with contextlib.ExitStack() as stack:
        for device_type in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
            stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


def analyze(model: nn.Module, example_input: Any) -> Coupling:
    """Trace ``model`` (a copy) and return its channel-coupling groups."""
    with _without_autocast():
        return coupling_groups(trace(model, example_input).graph_module)


def plan(model: nn.Module, example_input: Any) -> Plan:
    """What :func:`compress` would remove, as data (``print(plan)`` shows a table).
    BatchNorm is not folded first, so zero BatchNorm scales do not show here."""
    with _without_autocast():
        graph = trace(model, example_input).graph_module
        return _smallest_rewrite(graph, coupling_groups(graph))[0]


def compress(
    model: nn.Module,
    example_input: Any,
    *,
    sparsity: Optional[float] = None,
    verify: bool = True,
    random_inputs: int = 2,
    fold_batchnorm: bool = True,
) -> fx.GraphModule:
    """A smaller dense ``GraphModule`` computing what ``model`` computes (eval semantics).

    The mask is what the model carries: exact zeros in its weights, or masks left by
    ``torch.nn.utils.prune`` / ``torch.nn.utils.parametrize``. ``sparsity`` first applies
    global magnitude masking. The result is verified against the model on the example and
    ``random_inputs`` fresh inputs (``verify=False`` skips that). ``fold_batchnorm`` folds
    eval-mode BatchNorm into the conv before it. ``model`` is never modified. An enclosing
    ``torch.autocast`` is switched off inside: the rewrite is traced and verified at the model's
    own dtypes.
    The report is at ``result.meta["srfx_report"]``; its ``kept`` says which entries of each
    parameter survived (parameter name -> axis -> indices), to slice optimizer state with.
    """
    with _without_autocast():
        return _compress(model, example_input, sparsity=sparsity, verify=verify, random_inputs=random_inputs, fold_batchnorm=fold_batchnorm)


def _compress(model: nn.Module, example_input: Any, *, sparsity: Optional[float], verify: bool, random_inputs: int, fold_batchnorm: bool) -> fx.GraphModule:

    if not isinstance(model, nn.Module):
        raise InputError(f"srfx.compress takes a torch.nn.Module, got {type(model).__name__}")
    refuse_wrappers(model)
    notes = []
    if model.training:
        notes.append("the model is in train mode: srfx compresses its eval-mode function (BatchNorm running statistics, no dropout)")
    hooked = hooked_modules(model)
    if hooked:
        notes.append(f"module hooks ({', '.join(hooked)}) are not part of the result: torch.fx does not trace them, so srfx "
                     "compresses and verifies the model without them and never calls them")
    reference = working_copy(model)
    if sparsity is not None:
        from srfx.passes import mask as _mask

        reference, _ = _mask(reference, sparsity)
    _check_finite(reference)
    _check_dtypes(reference)
    traced: Traced = trace(reference, example_input)
    _check_outputs(reference, traced.example_inputs)
    from srfx.passes import fold_batchnorm as fold_bn

    graph = traced.graph_module
    if fold_batchnorm:  # first, so a zero BatchNorm scale shows up as zero conv rows to the plan
        graph = fold_bn(graph).graph_module
    removal, result = _smallest_rewrite(graph, coupling_groups(graph))
    rebuilt = _rebuilt(traced.graph_module, graph, removal)
    if result is traced.graph_module:  # nothing changed: still hand back a module of its own
        result = copy.deepcopy(result)
    try:
        with torch.no_grad(), preserved_buffers(result):
            _FactRecorder(result).run(*traced.example_inputs)
    except Exception as exc:  # a rewrite that does not even run: srfx's fault, said as such
        raise RewriteError(
            f"the rewritten module fails on the example input ({type(exc).__name__}: {str(exc).splitlines()[0]}). "
            "This is a bug in srfx: please report it with the model; srfx.plan(model, x) shows what it tried to remove."
        ) from exc
    with preserved_buffers(reference, result):
        try:
            err = _verify(reference, result, traced.example_inputs, random_inputs=random_inputs) if verify else None
        except VerificationError as exc:
            _blame_an_unfaithful_trace(reference, traced.graph_module, traced.example_inputs, random_inputs, exc)
            raise
    result.meta[REPORT_KEY] = Report(
        params_before=count_parameters(reference),
        params_after=count_parameters(result),
        stored_before=count_stored(reference),
        stored_after=count_stored(result),
        macs_before=count_macs(traced.graph_module),
        macs_after=count_macs(result),
        groups=removal.groups,
        max_rel_error=err,
        warnings=tuple(notes),
        heads=removal.attention_heads(),
        compensated_norms=len(removal.compensations),
        kept=_kept_indices(traced.graph_module, result, removal),  # before BN folding: the model's own names
        rebuilt=rebuilt,
        assumptions=dtype_guards(result.graph),
    )
    for note in notes:
        warnings.warn(note, stacklevel=3)
    return result
