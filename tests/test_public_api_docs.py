"""Every public name is documented, and so are its parameters.

Walks ``beyondgrad.__all__`` and, recursively, the ``__all__`` of every public subpackage or
submodule it exports (``beyondgrad.linops``, ``beyondgrad.conv.einsum``, ...). For every
function, class, constructor, public method and property it checks that a docstring exists, and
that each named parameter is documented: its name appears in the docstring (an ``Args:``
section lists it, or the prose names it). A class's constructor may be documented in the class
docstring or in ``__init__``'s.

The test prints every offender, one per line (``name: what is missing``). The names known to be
undocumented today are listed one by one in ``PENDING``, so any *new* undocumented name fails.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import inspect
import os
import re
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

import beyondgrad as bg

# Dunder methods that are part of a class's public interface (others are Python protocol).
PUBLIC_DUNDERS = ("__init__", "__call__")

# Parameters a docstring need not name.
IMPLICIT_PARAMS = {"self", "cls"}

# Public names with known offenders (the part of an ``offenders()`` line before the colon):
# names whose docstrings are being written in files another change owns. Remove a line once its
# name is documented. Do NOT add new names here: document them instead.
PENDING: frozenset[str] = frozenset()


def public_names(module: types.ModuleType) -> list[str]:
    """The names a module exports: its ``__all__``, or its public functions defined there."""
    names = getattr(module, "__all__", None)
    if names is not None:
        return list(names)
    return [
        name
        for name, obj in vars(module).items()
        if not name.startswith("_")
        and inspect.isfunction(obj)
        and obj.__module__ == module.__name__
    ]


def walked_modules(module: types.ModuleType) -> dict[str, types.ModuleType]:
    """``module`` and every beyondgrad module its public names reach (subpackages such as
    ``beyondgrad.linops``, public submodules such as ``beyondgrad.conv.einsum``)."""
    found = {module.__name__: module}
    for name in public_names(module):
        obj = getattr(module, name, None)
        if inspect.ismodule(obj) and obj.__name__.startswith("beyondgrad."):
            found.update(walked_modules(obj))
    return found


MODULES: dict[str, types.ModuleType] = walked_modules(bg)


def own_doc(obj: object) -> str:
    """The docstring written for ``obj`` (not a dataclass's generated signature line)."""
    doc = inspect.getdoc(obj) or ""
    if inspect.isclass(obj) and dataclasses.is_dataclass(obj):
        generated = obj.__name__ + "("
        if doc.startswith(generated) and "\n" not in doc.strip():
            return ""
    if inspect.isclass(obj) and doc == (inspect.getdoc(obj.__mro__[1]) or None):
        return ""  # inherited from the base class, says nothing about this one
    return doc


def named_parameters(func: object) -> list[str]:
    """The named parameters of a callable (no ``self``, ``*args``, ``**kwargs``)."""
    try:
        sig = inspect.signature(func)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return []
    return [
        p.name
        for p in sig.parameters.values()
        if p.name not in IMPLICIT_PARAMS
        and not p.name.startswith("_")
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]


def undocumented(params: list[str], doc: str) -> list[str]:
    """The parameters whose names do not appear as words in ``doc``."""
    return [p for p in params if not re.search(rf"(?<![\w.]){re.escape(p)}(?![\w-])", doc)]


def check_callable(qualname: str, func: object, doc: str | None = None) -> Iterator[str]:
    """Offender lines for one function or method; ``doc`` replaces its own docstring."""
    if doc is None:
        doc = inspect.getdoc(func) or ""
    if not doc:
        yield f"{qualname}: no docstring"
        return
    missing = undocumented(named_parameters(func), doc)
    if missing:
        yield f"{qualname}: parameters not documented: {', '.join(missing)}"


def method_doc(cls: type, name: str, func: object) -> str:
    """A method's docstring, else the one of the method it overrides (not ``object``'s)."""
    own = getattr(func, "__doc__", None)
    if own:
        return inspect.cleandoc(own)
    for base in cls.__mro__[1:]:
        if base is not object and name in vars(base):
            return inspect.getdoc(getattr(base, name)) or ""
    return ""


def class_members(cls: type) -> Iterator[tuple[str, object, type]]:
    """``(name, raw attribute, defining class)`` of the public members a class defines or
    inherits from a beyondgrad class (torch's and Python's own members are theirs to document)."""
    seen: set[str] = set()
    for owner in cls.__mro__:
        if not owner.__module__.startswith("beyondgrad"):
            continue
        for name, raw in vars(owner).items():
            if name in seen or (name.startswith("_") and name not in PUBLIC_DUNDERS):
                continue
            if not defined_in(raw, owner):
                continue  # patched in from elsewhere (torch wraps Optimizer.step per subclass)
            seen.add(name)
            yield name, raw, owner


def defined_in(raw: object, owner: type) -> bool:
    """Whether a class attribute was written in ``owner``'s body (functions: by their
    unwrapped ``__qualname__``; anything else: yes)."""
    func = raw.__func__ if isinstance(raw, staticmethod | classmethod) else raw
    if not inspect.isfunction(func):
        return True
    qualname = inspect.unwrap(func).__qualname__
    return qualname.startswith(owner.__qualname__ + ".") or "<locals>" in qualname


def check_class(qualname: str, cls: type, public: dict[type, str]) -> Iterator[str]:
    """Offender lines for a class, its constructor, public methods and properties.

    Members inherited from another public class are checked there (``public`` maps classes to
    their public names); members of private base classes are named by their defining module.
    """
    doc = own_doc(cls)
    if not doc:
        yield f"{qualname}: no docstring"
    if issubclass(cls, enum.Enum):
        return
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    for name, raw, owner in class_members(cls):
        if name in fields or (owner is not cls and owner in public):
            continue
        where = f"{qualname if owner is cls else owner.__module__ + '.' + owner.__qualname__}"
        where += f".{name}"
        func = raw.__func__ if isinstance(raw, staticmethod | classmethod) else raw
        if isinstance(raw, property):
            if not inspect.getdoc(raw):
                yield f"{where}: no docstring"
        elif name == "__init__":
            init_doc = method_doc(owner, name, func)
            yield from check_callable(where, func, init_doc + "\n" + own_doc(owner))
        elif inspect.isfunction(func):
            yield from check_callable(where, func, method_doc(owner, name, func))


def public_objects() -> Iterator[tuple[str, object]]:
    """``(public name, object)`` for every exported name of every walked module."""
    for modname, module in MODULES.items():
        yield modname, module
        for name in public_names(module):
            yield f"{modname}.{name}", getattr(module, name)


def offenders() -> list[str]:
    """Every offender line over all public names (deduplicated, sorted)."""
    objects = list(public_objects())
    public: dict[type, str] = {}
    for qualname, obj in objects:
        if inspect.isclass(obj):
            public.setdefault(obj, qualname)
    found: set[str] = set()
    for qualname, obj in objects:
        if inspect.ismodule(obj):
            if not inspect.getdoc(obj):
                found.add(f"{qualname}: no module docstring")
        elif inspect.isclass(obj):
            if public[obj] == qualname:  # a class exported twice is checked once
                found.update(check_class(qualname, obj, public))
        elif callable(obj):
            found.update(check_callable(qualname, obj))
        # Data (constants, presets, version strings) carry no docstrings of their own.
    return sorted(found)


def offender_name(line: str) -> str:
    """The public name an offender line is about."""
    return line.split(":", 1)[0]


def test_every_public_name_is_documented() -> None:
    new = [line for line in offenders() if offender_name(line) not in PENDING]
    assert not new, "undocumented public API (write Google-style Args/Returns):\n  " + "\n  ".join(
        new
    )


def test_pending_list_is_current() -> None:
    stale = sorted(PENDING - {offender_name(line) for line in offenders()})
    assert not stale, "documented now; remove from PENDING:\n  " + "\n  ".join(stale)


def test_the_checker_catches_offenders() -> None:
    def documented(a: int, b: int) -> int:
        """Add.

        Args:
            a: first.
            b: second.
        """
        return a + b

    def half(a: int, b: int) -> int:
        """Add ``a`` to something."""
        return a + b

    def bare(a: int) -> int:
        return a

    assert list(check_callable("documented", documented)) == []
    assert list(check_callable("half", half)) == ["half: parameters not documented: b"]
    assert list(check_callable("bare", bare)) == ["bare: no docstring"]

    @dataclasses.dataclass
    class Plain:
        x: int

    assert list(check_class("Plain", Plain, {})) == ["Plain: no docstring"]


@pytest.mark.parametrize("modname", sorted(MODULES))
def test_public_names_exist(modname: str) -> None:
    assert {"beyondgrad.cockpit", "beyondgrad.conv", "beyondgrad.linalg"} <= set(MODULES)
    assert {"beyondgrad.linops", "beyondgrad.optim", "beyondgrad.conv.einsum"} <= set(MODULES)
    module = MODULES[modname]
    for name in public_names(module):
        assert hasattr(module, name), f"{modname}.__all__ lists a missing name {name!r}"


# ---- the API reference pages (docs/api/*.md, rendered by mkdocstrings) ----------------------

ROOT = Path(__file__).parents[1]
DIRECTIVE = re.compile(r"^::: ([\w.]+)\s*$", re.MULTILINE)


def api_directives() -> set[str]:
    """Every ``::: identifier`` of the API reference pages."""
    found: set[str] = set()
    for page in (ROOT / "docs" / "api").glob("*.md"):
        found.update(DIRECTIVE.findall(page.read_text()))
    return found


def runtime_object(ident: str) -> object:
    """The object an identifier names at runtime: the attribute chain from the top package
    (``beyondgrad.linalg.solve`` is the function), else the longest importable module prefix
    and attributes from there (``beyondgrad.conv.unfold.unfold``)."""
    parts = ident.split(".")
    obj: object = importlib.import_module(parts[0])
    try:
        for part in parts[1:]:
            obj = getattr(obj, part)
        return obj
    except AttributeError:
        pass
    for k in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:k]))
        except ImportError:
            continue
        for part in parts[k:]:
            obj = getattr(obj, part)
        return obj
    raise AssertionError(f"{ident} names nothing")


def test_api_pages_cover_every_public_name() -> None:
    directives = api_directives()
    missing = []
    for qualname, obj in public_objects():
        if qualname.rsplit(".", 1)[-1].startswith("__"):
            continue  # __version__
        spellings = {qualname}
        if inspect.isclass(obj) or inspect.isfunction(obj):
            spellings.add(f"{obj.__module__}.{obj.__qualname__}")  # where it is defined
        if not spellings & directives:
            missing.append(qualname)
    assert not missing, "add a '::: name' line to a page under docs/api/ for:\n  " + "\n  ".join(
        missing
    )


def test_api_directives_name_what_they_mean() -> None:
    """mkdocstrings reads the source statically (griffe): where a package has a submodule and a
    public function of the same name (``beyondgrad.linalg.solve``), the static path names the
    module. Every directive must name the same kind of object as at runtime, else the page
    shows a module instead of the function (use the defining path, e.g.
    ``beyondgrad.linalg.solve.solve``, with a ``heading`` option)."""
    griffe = pytest.importorskip("griffe")
    package = griffe.load("beyondgrad", search_paths=[str(ROOT / "src")], resolve_aliases=True)
    wrong = []
    for ident in sorted(api_directives()):
        try:
            static = package[ident.split(".", 1)[1]] if "." in ident else package
        except KeyError:
            wrong.append(f"{ident}: not found")
            continue
        kind = (static.final_target if static.is_alias else static).kind.value
        obj = runtime_object(ident)
        expected = (
            "module"
            if inspect.ismodule(obj)
            else "class"
            if inspect.isclass(obj)
            else "function"
            if callable(obj)
            else "attribute"
        )
        if kind != expected:
            wrong.append(f"{ident}: the docs would show a {kind}, the name is a {expected}")
    assert not wrong, "\n  ".join(["API pages:", *wrong])


def test_docs_build_strict(tmp_path: Path) -> None:
    """``mkdocs build --strict`` (needs the ``docs`` extra; skipped without it). Not ``-q``:
    quiet mode hides the warnings that strict mode turns into a failure."""
    for module in ("mkdocs", "mkdocstrings_handlers.python", "material"):
        pytest.importorskip(module)
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "site" / "api" / "linops" / "index.html").exists()
