"""The CLI's TARGET: ``path/to/file.py:fn`` or ``pkg.module:fn``, loaded into ``(model, args, kwargs)``.

``fn()`` takes no arguments and returns ``(model, example_args)`` or ``(model, example_args, kwargs)``:
``model`` an ``nn.Module`` or any callable, ``example_args`` a tuple (one tensor is accepted and wrapped),
``kwargs`` a dict of keyword arguments for the model.  A file is imported under a unique module name with
its own directory on ``sys.path`` while it loads and ``fn()`` runs, so it can import its neighbours; a
module is imported with the current directory on ``sys.path``.

Every problem raises `TargetError` with a one-line message that says what to fix.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import os
import pathlib
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import torch

USAGE = "TARGET must be 'path/to/file.py:fn' or 'pkg.module:fn', where fn() returns (model, example_args)"


class TargetError(Exception):
    """TARGET cannot be loaded: a missing file or function, an import error, a bad return value."""


@dataclasses.dataclass(frozen=True)
class Target:
    """What ``fn()`` returned, checked: call ``model(*args, **kwargs)``."""

    spec: str
    model: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


def load_target(spec: str) -> Target:
    """Import TARGET's file or module, call its function and check what it returned."""
    where, _, name = spec.rpartition(":")
    if not where or not name.isidentifier():
        raise TargetError(f"{USAGE}; got {spec!r}")
    is_file = where.endswith(".py") or "/" in where or os.sep in where
    directory = str(pathlib.Path(where).expanduser().resolve().parent) if is_file else os.getcwd()
    with _on_sys_path(directory):
        module = _import_file(where) if is_file else _import_module(where)
        fn = getattr(module, name, _MISSING)
        if fn is _MISSING:
            raise TargetError(f"{where} has no {name!r}; {_callables(module)}")
        if not callable(fn):
            raise TargetError(f"{spec} is a {type(fn).__name__}, not a function; {USAGE}")
        try:
            result = fn()
        except Exception as exc:
            raise TargetError(f"{spec}() raised {type(exc).__name__}: {exc}{_where(exc)}") from None
    return _check(spec, result)


_MISSING = object()


@contextmanager
def _on_sys_path(directory: str) -> Iterator[None]:
    added = directory not in sys.path
    if added:
        sys.path.insert(0, directory)
    try:
        yield
    finally:
        if added and directory in sys.path:
            sys.path.remove(directory)


def _import_file(where: str) -> ModuleType:
    path = pathlib.Path(where).expanduser()
    if not path.is_file():
        raise TargetError(f"no such file: {where}" if not path.exists() else f"not a file: {where}")
    path = path.resolve()
    stem = "".join(c if c.isalnum() else "_" for c in path.stem)
    name = f"_attnfuse_target_{stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise TargetError(f"cannot import {where}: not a Python source file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses, pickle and inspect look modules up by name
    try:
        spec.loader.exec_module(module)
    except ImportError as exc:
        del sys.modules[name]
        raise TargetError(f"cannot import {where}: {exc}") from None
    except (Exception, SystemExit) as exc:
        del sys.modules[name]
        raise TargetError(f"importing {where} raised {type(exc).__name__}: {exc}{_where(exc)}") from None
    return module


def _import_module(where: str) -> ModuleType:
    try:
        return importlib.import_module(where)
    except ImportError as exc:
        raise TargetError(f"cannot import {where}: {exc}") from None
    except (Exception, SystemExit) as exc:
        raise TargetError(f"importing {where} raised {type(exc).__name__}: {exc}{_where(exc)}") from None


def _callables(module: ModuleType) -> str:
    """The public functions and classes a module defines itself (not the ones it imports)."""
    names = [n for n, v in vars(module).items() if not n.startswith("_") and callable(v)
             and getattr(v, "__module__", None) == module.__name__]
    return f"its callables: {', '.join(names)}" if names else "it defines no public functions"


def _where(exc: BaseException) -> str:
    """`` (at file.py:12)`` for the innermost frame of ``exc``'s traceback, or ``""``."""
    frames = traceback.extract_tb(exc.__traceback__)
    if isinstance(exc, SyntaxError) or not frames:
        return ""
    return f" (at {frames[-1].filename}:{frames[-1].lineno})"


def _kind(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of ({', '.join(type(v).__name__ for v in value)})"
    return f"a {type(value).__name__}"


def _check(spec: str, result: Any) -> Target:
    expected = "(model, example_args) or (model, example_args, kwargs)"
    if not isinstance(result, (tuple, list)) or len(result) not in (2, 3):
        raise TargetError(f"{spec}() must return {expected}; it returned {_kind(result)}")
    model, args, *rest = result
    if not callable(model):
        raise TargetError(f"{spec}() returned {_kind(model)} as the model; it must be an nn.Module or a callable")
    if isinstance(args, torch.Tensor):
        args = (args,)
    elif isinstance(args, list):
        args = tuple(args)
    elif not isinstance(args, tuple):
        raise TargetError(f"{spec}() returned {_kind(args)} as example_args; it must be a tuple (or one tensor)")
    kwargs = rest[0] if rest else {}
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise TargetError(f"{spec}() returned {_kind(kwargs)} as kwargs; it must be a dict of keyword arguments")
    return Target(spec, model, args, dict(kwargs))
