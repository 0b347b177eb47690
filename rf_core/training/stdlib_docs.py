"""Prompt → completion pairs from the standard library's own docstrings, read with `inspect`.

Standard library only, and run as a script in a fresh interpreter (`python -I -S rf_core/training/stdlib_docs.py`
prints the pairs as JSON) by `rf_core.training.data.stdlib_sft_examples`: the pairs then depend on the Python version
alone, not on what the calling process has imported or patched.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import sys
import warnings
from collections.abc import Iterable
from typing import Any

# Modules that import quickly with no side effects and document their API well. The order is part of the
# data set's definition: changing it changes which duplicates win and so the examples themselves.
SFT_MODULES = (
    "argparse",
    "array",
    "ast",
    "base64",
    "bisect",
    "bz2",
    "calendar",
    "cmath",
    "codecs",
    "collections",
    "collections.abc",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "email.message",
    "email.utils",
    "enum",
    "fnmatch",
    "fractions",
    "ftplib",
    "functools",
    "glob",
    "gzip",
    "heapq",
    "html",
    "http.client",
    "imaplib",
    "inspect",
    "io",
    "ipaddress",
    "itertools",
    "json",
    "logging",
    "lzma",
    "mailbox",
    "math",
    "operator",
    "os",
    "os.path",
    "pathlib",
    "platform",
    "pprint",
    "queue",
    "random",
    "re",
    "shlex",
    "shutil",
    "smtplib",
    "socket",
    "sqlite3",
    "statistics",
    "string",
    "subprocess",
    "sys",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "time",
    "traceback",
    "typing",
    "unicodedata",
    "urllib.parse",
    "uuid",
    "xml.etree.ElementTree",
    "zipfile",
)
_MIN_COMPLETION_CHARS = 20
_MAX_COMPLETION_CHARS = 600


def collect(limit: int | None = None) -> list[dict[str, str]]:
    """Prompt → completion pairs from standard-library docstrings.

    The prompt is a definition line such as ``def json.dumps(obj, *, skipkeys=False, ...):\\n`` and the
    completion is the first paragraph of that object's own docstring. Modules, members and methods are visited
    in a fixed order and duplicated prompts or completions are dropped, so the list is the same in every
    process of the same Python version.
    """
    examples: list[dict[str, str]] = []
    seen_prompts: set[str] = set()
    seen_completions: set[str] = set()
    for module_name in SFT_MODULES:
        for prompt, completion in _module_pairs(module_name):
            if prompt in seen_prompts or completion in seen_completions:
                continue
            seen_prompts.add(prompt)
            seen_completions.add(completion)
            examples.append({"prompt": prompt, "completion": completion})
            if limit is not None and len(examples) >= limit:
                return examples
    return examples


def _module_pairs(module_name: str) -> list[tuple[str, str]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated modules and names are still fine to document
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            return []
        # os.path is posixpath (or ntpath): accept members defined in the module the name points at.
        home_modules = {module_name, module.__name__}
        pairs: list[tuple[str, str]] = []
        for name, member in sorted(vars(module).items()):
            if name.startswith("_") or inspect.ismodule(member):
                continue
            if getattr(member, "__module__", None) not in home_modules:
                continue
            if inspect.isclass(member):
                pairs.extend(_definition_pair("class", f"{module_name}.{name}", member))
                for method_name, method in sorted(vars(member).items()):
                    function = getattr(method, "__func__", method)  # unwrap classmethod / staticmethod
                    if method_name.startswith("_") or not inspect.isroutine(function):
                        continue
                    pairs.extend(_definition_pair("def", f"{module_name}.{name}.{method_name}", function))
            elif inspect.isroutine(member):
                pairs.extend(_definition_pair("def", f"{module_name}.{name}", member))
        return pairs


def _definition_pair(keyword: str, qualified_name: str, member: Any) -> Iterable[tuple[str, str]]:
    # The member's own __doc__, not inspect.getdoc: that falls back to inherited docstrings, which repeat.
    doc = member.__doc__ if isinstance(getattr(member, "__doc__", None), str) else None
    if not doc:
        return
    completion = _first_paragraph(inspect.cleandoc(doc), qualified_name.rsplit(".", 1)[-1])
    if completion is None:
        return
    yield f"{keyword} {qualified_name}{_signature(member)}:\n", completion


def _first_paragraph(doc: str, short_name: str) -> str | None:
    paragraphs = [" ".join(part.split()) for part in doc.split("\n\n")]
    paragraphs = [part for part in paragraphs if part]
    # C functions without a text signature start their docstring with one ("dumps(obj) -> str"): skip it.
    if paragraphs and paragraphs[0].startswith(f"{short_name}(") and len(paragraphs) > 1:
        paragraphs = paragraphs[1:]
    if not paragraphs:
        return None
    paragraph = paragraphs[0]
    if len(paragraph) < _MIN_COMPLETION_CHARS or paragraph.startswith(f"{short_name}("):
        return None
    if len(paragraph) > _MAX_COMPLETION_CHARS:
        paragraph = paragraph[:_MAX_COMPLETION_CHARS].rsplit(" ", 1)[0] + " ..."
    return paragraph


def _signature(member: Any) -> str:
    try:
        signature = inspect.signature(member)
    except (TypeError, ValueError):
        return "(...)"
    # A default that is not a literal (a live object, a list of logging handlers) renders as "...": its repr
    # would carry memory addresses or process state.
    parameters = [
        parameter.replace(default=_OPAQUE)
        if parameter.default is not parameter.empty and not _is_literal(parameter.default)
        else parameter
        for parameter in signature.parameters.values()
    ]
    return str(signature.replace(parameters=parameters))


class _Opaque:
    def __repr__(self) -> str:
        return "..."


_OPAQUE = _Opaque()


def _is_literal(value: Any) -> bool:
    try:
        ast.literal_eval(repr(value))
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return False
    return True


if __name__ == "__main__":
    json.dump(collect(), sys.stdout)
