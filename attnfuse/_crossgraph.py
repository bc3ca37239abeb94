"""Mask structure across graph boundaries (graph breaks, DDP's graph splitting, FSDP2's per-layer compile).

The mask analysis (`attnfuse.passes.masks`) proves structure from a graph's own nodes; a mask built in one graph
and read in another arrives as a graph input, and would be dense.  `compile_graph` wraps what the backend compiles:

* A graph that *builds* masks (`_maskrecipe.recipes`: mask-like outputs computed from small inputs by pure ops)
  registers each such output tensor after every call, weakly keyed by the tensor object, with its recipe, the
  inputs it read and the ``_version`` of each (a *certificate*; nothing is kept alive by it).
* A graph whose attention sites read a (.., Lq, Lk) mask input (`_maskrecipe.mask_inputs`) becomes a dispatcher:
  per call, each such input either has a valid certificate (the same tensor, unmodified, its inputs unmodified:
  "proven in an earlier graph"), or its values are checked for a band / key-padding structure
  (`_maskrecognize.recognize`, once per tensor object and version: "verified at run time"), or the call runs the
  dense graph, compiled as before.  A structured call runs a *variant*: the graph with the mask input's uses read
  from the recipe (`_maskrecipe.splice`), compiled on first use with the call's real tensors and cached by
  signature; the mask analysis then proves the structure on it by itself.  A variant where no site gains
  structure is remembered and not used.

Nothing here runs while an outer compile traces (the dense function is called), and every decision is made on the
real tensors of a call, so fake example inputs (DDPOptimizer) change nothing.  The report's ``mask["source"]``
says which (`PROVEN`, `EARLIER`, `VERIFIED`, `DENSE` with ``mask["why"]``); a variant's report is published as it
is compiled (it becomes `attnfuse.last_report()`).  Logger ``attnfuse.crossgraph``: INFO per variant compiled,
DEBUG per dispatch decision.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch.utils.weak import WeakIdKeyDictionary

from . import _sources
from .config import Config
from .passes import _maskrecipe
from .passes._maskrecognize import recognize
from .report import Report

__all__ = ["DENSE", "EARLIER", "PROVEN", "VERIFIED", "compile_graph"]

log = logging.getLogger("attnfuse.crossgraph")

PROVEN = "proven"
EARLIER = "proven in an earlier graph (run-time certificate)"
VERIFIED = "verified at run time (values checked once per mask tensor)"
DENSE = "dense"
_WHY_INPUT = ("the mask is a graph input with no certificate and its values are not a band / key-padding "
              "structure (this graph's dense version; calls whose mask is certified or verified run a variant)")
_WHY_OWN = "this graph's nodes prove no structure for the mask"
_WHY_VARIANT = "the mask was recognized at run time, but the spliced graph's analysis proves no structure from it"
_MAX_VARIANTS = 8

_CERTIFICATES: WeakIdKeyDictionary = WeakIdKeyDictionary()  # mask tensor -> _Certificate
_RECOGNIZED: WeakIdKeyDictionary = WeakIdKeyDictionary()  # mask tensor -> (its _version, decision or None)

Compile = Callable[..., Callable[..., Any]]


@dataclasses.dataclass
class _Certificate:
    recipe: _maskrecipe.Recipe
    values: tuple  # one per leaf: the tensors it read (kept: small), constants
    versions: tuple  # their _version (None: not a tensor)
    version: int  # the mask's own _version when it was returned

    def valid(self, mask: torch.Tensor) -> bool:
        return mask._version == self.version and all(
            v is None or t._version == v for t, v in zip(self.values, self.versions))


def _real(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and not torch._subclasses.fake_tensor.is_fake(x)


def _tracing() -> bool:
    return torch.compiler.is_compiling()


def _register(out: Any, args: tuple, produced: dict, owner: fx.GraphModule) -> None:
    for pos, recipe in produced.items():
        mask = out if pos is None else out[pos] if isinstance(out, (tuple, list)) and pos < len(out) else None
        if not _real(mask):
            continue
        values = tuple(leaf.value(args, owner) for leaf in recipe.leaves)
        if any(isinstance(v, torch.Tensor) and not _real(v) for v in values):
            continue
        versions = tuple(v._version if isinstance(v, torch.Tensor) else None for v in values)
        _CERTIFICATES[mask] = _Certificate(recipe, values, versions, mask._version)


class _Producer:
    """``fn``, registering a certificate for each mask output after every call; other attributes are ``fn``'s
    (with ``inner="eager"`` the compiled graph module's ``graph``, ``code``)."""

    def __init__(self, fn: Callable[..., Any], produced: dict, owner: fx.GraphModule) -> None:
        self.inner, self.produced, self.owner = fn, produced, owner

    def __call__(self, *args: Any) -> Any:
        out = self.inner(*args)
        if not _tracing():
            _register(out, args, self.produced, self.owner)
        return out

    def __getattr__(self, attr: str) -> Any:
        if "inner" not in self.__dict__:
            raise AttributeError(attr)
        return getattr(self.__dict__["inner"], attr)


def decide(mask: Any) -> tuple[str, _maskrecipe.Recipe, tuple] | None:
    """(source, recipe, leaf values) that rebuild ``mask`` exactly, or None: a valid certificate, else its
    values recognized (once per tensor object and version)."""
    if not _real(mask) or mask.requires_grad:  # a mask with a gradient must stay the tensor it is
        return None
    cert = _CERTIFICATES.get(mask)
    if cert is not None and cert.valid(mask):
        return EARLIER, cert.recipe, cert.values
    cached = _RECOGNIZED.get(mask)
    if cached is not None and cached[0] == mask._version:
        return cached[1]
    version, found, got = mask._version, recognize(mask), None
    if found is not None:
        batch = mask.shape[0] if mask.dim() == 4 else 1
        recipe = _maskrecipe.synthesized(tuple(mask.shape), mask.dtype, mask.device, found.left, found.right,
                                         found.kv is not None, batch, found.fill)
        got = (VERIFIED, recipe, () if found.kv is None else (found.kv,))
    _RECOGNIZED[mask] = (version, got)
    log.debug("mask tensor %s %s: %s", tuple(mask.shape), mask.dtype,
              f"recognized as {found.describe()}" if found else "values have no band / key-padding structure")
    return got


def _site_key(anchor: fx.Node) -> tuple[str, str]:
    return _sources.module_path(anchor), _sources.source(anchor)


def _annotate(report: Report, inputs: set, decided: dict | None = None) -> None:
    """Set every site's ``mask["source"]`` (and ``mask["why"]`` when dense)."""
    for site in report.sites:
        if not site.mask:
            continue
        key = (site.module, site.source)
        kinds = set(site.mask.get("kind", "none").split("+"))
        flat = kinds <= {"dense", "bias", "none"}
        if decided and key in decided:
            source, why = (DENSE, _WHY_VARIANT) if flat and "none" not in kinds else (decided[key], None)
        elif key in inputs and kinds & {"dense", "bias"} and flat:
            source, why = DENSE, _WHY_INPUT
        elif "dense" in kinds:
            source, why = DENSE, _WHY_OWN
        else:
            source, why = PROVEN, None
        site.mask["source"] = source
        if why:
            site.mask["why"] = why


def _signature(args: tuple, chosen: dict) -> tuple:
    def one(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return tuple(x.shape), x.stride(), x.dtype, x.device, x.requires_grad
        if isinstance(x, (tuple, list)):  # torch.Size among them: a recipe's constants are written into the graph
            return type(x), tuple(one(y) for y in x)
        return type(x), x if isinstance(x, (int, float, bool, str, type(None), torch.dtype, torch.device)) else repr(x)

    recipes = tuple((i, recipe.code, tuple(one(v) for v in values)) for i, (_, recipe, values) in chosen.items())
    return torch.is_grad_enabled(), recipes, tuple(one(a) for a in args)


def _propagate(gm: fx.GraphModule, args: Sequence[Any]) -> None:
    """Fresh fake values (``meta["val"]``) on every node of ``gm`` for these real inputs (static shapes)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fakes = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
    grad = torch.is_grad_enabled()
    try:
        FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*fakes)
    finally:
        torch.set_grad_enabled(grad)


class _Dispatcher:
    """Per call: the dense graph, or the variant whose masks are rebuilt from their certified / verified
    recipes (module docstring)."""

    def __init__(self, gm: fx.GraphModule, config: Config, compile_one: Compile, dense: Callable[..., Any],
                 inputs: dict[int, set]) -> None:
        self.gm, self.config, self.compile_one, self.inner, self.inputs = gm, config, compile_one, dense, inputs
        self.variants: dict[tuple, Callable[..., Any] | None] = {}

    def __getattr__(self, attr: str) -> Any:  # the dense function's attributes (``graph`` with inner="eager")
        if "inner" not in self.__dict__:
            raise AttributeError(attr)
        return getattr(self.__dict__["inner"], attr)

    def __call__(self, *args: Any) -> Any:
        if _tracing():
            return self.inner(*args)
        chosen = {}
        for i in self.inputs:
            got = decide(args[i]) if i < len(args) else None
            if got is not None:
                chosen[i] = got
        if not chosen:
            log.debug("dense call: no mask input has a certificate or a recognized structure")
            return self.inner(*args)
        sig = _signature(args, chosen)
        if sig not in self.variants:
            if len(self.variants) >= _MAX_VARIANTS:
                log.debug("dense call: %d variants already compiled for this graph", _MAX_VARIANTS)
                return self.inner(*args)
            self.variants[sig] = self._compile(args, chosen)
        variant = self.variants[sig]
        if variant is None:
            log.debug("dense call: the variant for these masks gains no structure")
            return self.inner(*args)
        log.debug("structured call: %s", ", ".join(f"input {i} {s}" for i, (s, _, _) in sorted(chosen.items())))
        extra = [v for _, (_, _, values) in sorted(chosen.items()) for v in values if isinstance(v, torch.Tensor)]
        return variant(*args, *extra)

    def _compile(self, args: tuple, chosen: dict) -> Callable[..., Any] | None:
        try:
            spliced = _maskrecipe.splice(self.gm, {i: (r, v) for i, (_, r, v) in chosen.items()})
            real = [*args, *(v for _, (_, _, vs) in sorted(chosen.items()) for v in vs if isinstance(v, torch.Tensor))]
            _propagate(spliced, real)
            decided = {key: source for i, (source, _, _) in chosen.items() for key in self.inputs[i]}
            reports: list[Report] = []

            def note(report: Report) -> None:
                _annotate(report, set(), decided)
                reports.append(report)

            fn = self.compile_one(spliced, real, self.config, note)
        except Exception as exc:
            if self.config.strict:
                raise
            log.warning("attnfuse: compiling a structured variant failed (%s: %s); the dense graph runs",
                        type(exc).__name__, exc)
            return None
        gained = [s for r in reports for s in r.sites if s.mask.get("source") in (EARLIER, VERIFIED)]
        if not gained:
            log.info("variant for mask inputs %s gains no structure; the dense graph runs", sorted(chosen))
            return None
        log.info("compiled a structured variant (%s): %s", ", ".join(sorted({s.mask["source"] for s in gained})),
                 ", ".join(f"{s.module or s.source}: {s.mask.get('kind')}" for s in gained))
        return fn


def compile_graph(gm: fx.GraphModule, example_inputs: Sequence[Any], config: Config, compile_one: Compile
                  ) -> Callable[..., Any]:
    """``compile_one(gm, example_inputs, config, annotate)`` (the backend's compile of one graph; ``annotate``
    gets the report before it is published), wrapped to keep mask structure across graphs (module docstring)."""
    produced, inputs = {}, {}
    try:
        produced = _maskrecipe.recipes(gm)
        # under context parallelism every rank must run the same collectives: a variant chosen by one rank's own
        # values could split a site on one rank and not on another, so those graphs keep their dense masks
        if config.context_parallel is None:
            inputs = {i: {_site_key(a) for a in anchors} for i, anchors in _maskrecipe.mask_inputs(gm).items()}
    except Exception as exc:
        if config.strict:
            raise
        log.debug("cross-graph mask analysis failed (%s: %s); the graph compiles alone", type(exc).__name__, exc)
    pristine = fx.GraphModule(gm, copy.deepcopy(gm.graph)) if inputs else None
    keys = set().union(*inputs.values()) if inputs else set()
    fn = compile_one(gm, example_inputs, config, lambda report: _annotate(report, keys))
    if inputs:
        fn = _Dispatcher(pristine, config, compile_one, fn, inputs)
    if produced:
        fn = _Producer(fn, produced, gm)
    return fn
