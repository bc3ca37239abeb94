"""Where a site is, for the report: the dotted path of the module it was traced in (`module_path`, as
``model.get_submodule`` takes it) and the model's own ``file.py:line`` that calls it (`source`), read from the
``nn_module_stack`` and ``stack_trace`` that dynamo (or ``torch.export``) records on each FX node."""

from __future__ import annotations

import os
import re

import torch
import torch.fx as fx

__all__ = ["module_path", "source"]

# Source-name wrappers dynamo writes around a base: ``getattr(base, 'name')`` and friends, all ``(base, key)``.
_SOURCE_CALLS = ("getattr(", "___odict_getitem(", "dict.__getitem__(", "list.__getitem__(")
# Steps of a source name that are not module names: the storage of children, a compiled submodule's wrapper.
_NOT_MODULES = frozenset(("__dict__", "_modules", "_orig_mod"))


def _literal(s: str, i: int) -> tuple[str, int]:
    """The quoted string or integer at ``s[i]`` (as text) and the index after it."""
    if s[i] in "'\"":
        j, out = i + 1, []
        while s[j] != s[i]:
            j += 1 if s[j] != "\\" else 2
            out.append(s[j - 1])
        return "".join(out), j + 1
    m = re.compile(r"-?\d+").match(s, i)
    if m is None:
        raise ValueError(s)
    return m.group(), m.end()


def _source_steps(s: str, i: int = 0) -> tuple[list[str], int]:
    """The attribute and item names dynamo's source name ``s`` walks from its root, and where it ends.

    The root is a local or global (``L['self']``, ``G['model']``) with the items taken out of it (``L['args'][0]``:
    a decorator's ``*args``); then ``.name``, ``[key]`` and the ``_SOURCE_CALLS`` wrappers, nested.
    """
    for call in _SOURCE_CALLS:
        if s.startswith(call, i):
            steps, i = _source_steps(s, i + len(call))
            if not s.startswith(", ", i):
                raise ValueError(s)
            key, i = _literal(s, i + 2)
            if s[i] != ")":
                raise ValueError(s)
            steps, i = [*steps, key], i + 1
            break
    else:
        if s[i:i + 2] not in ("L[", "G["):
            raise ValueError(s)
        i, steps = i + 1, []
        while i < len(s) and s[i] == "[":  # the root and the items taken out of it
            _, i = _literal(s, i + 1)
            i += 1
    while i < len(s) and s[i] in ".[":
        if s[i] == "[":
            key, i = _literal(s, i + 1)
            i += 1
        else:
            m = re.compile(r"[^.\[\],)]+").match(s, i + 1)
            if m is None:
                raise ValueError(s)
            key, i = m.group(), m.end()
        steps.append(key)
    return steps, i


def module_path(node: fx.Node | None) -> str:
    """The dotted path of the innermost module ``node`` was traced in, as ``model.get_submodule`` takes it.

    Dynamo records how it reached each module (`_source_steps`).  Anything else is kept as written:
    ``torch.export`` records the path itself (``layers.0``), and a source name with other steps (a key read
    from ``dict.keys(...)``) names no path without the model.
    """
    stack = (node.meta.get("nn_module_stack") or {}) if node is not None else {}
    if not stack:
        return ""
    path = str(list(stack.values())[-1][0])
    try:
        steps, end = _source_steps(path)
    except (ValueError, IndexError):
        return path
    return ".".join(step for step in steps if step not in _NOT_MODULES) if end == len(path) else path


# Library helpers that run attention on a model's behalf: a site's line is where the model calls them.
_HELPER_PATHS = ("/transformers/integrations/", "/diffusers/models/attention_dispatch.py")
_OWN_DIRS = tuple(os.path.join(os.path.dirname(os.path.abspath(f)), "") for f in (torch.__file__, __file__))


def _library_frame(path: str) -> bool:
    """Whether a stack frame's file is torch's, attnfuse's, or a library's attention helper (`_HELPER_PATHS`)."""
    full = os.path.abspath(path)
    return full.startswith(_OWN_DIRS) or any(part in full.replace(os.sep, "/") for part in _HELPER_PATHS)


def source(node: fx.Node | None) -> str:
    """``file.py:line`` of the innermost frame of ``node``'s stack trace in the model's own code (the last
    frame if every frame is a library's)."""
    trace = (node.meta.get("stack_trace") or "") if node is not None else ""
    found = re.findall(r'File "([^"]+)", line (\d+)', trace)
    if not found:
        return ""
    file, line = next((f for f in reversed(found) if not _library_frame(f[0])), found[-1])
    return f"{os.path.basename(file)}:{line}"
