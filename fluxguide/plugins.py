"""Plug-ins by name: rewards, policy architectures, backbones and prompt sets, without launcher scripts.

Wherever fluxguide takes the name of one of these (a script's ``--reward``, :func:`fluxguide.rewards.make_reward`,
the envs' ``reward=`` / ``prompts=``, ``--policy``, ``--backbone``), three kinds of name work:

1. a name registered in code (``@register_reward("my-reward")`` and the like; the built-ins are registered so);
2. a name an installed package declares in the entry-point group of the kind, e.g. in its ``pyproject.toml``::

       [project.entry-points."fluxguide.rewards"]
       my-reward = "my_pkg.rewards:make_my_reward"

   (the groups are ``fluxguide.rewards``, ``fluxguide.policies``, ``fluxguide.backbones`` and
   ``fluxguide.prompts``; the shapes world registers itself this way, see fluxguide's own ``pyproject.toml``);
3. a spec ``package.module:attribute`` (dots after the colon walk attributes: ``pkg.mod:Class.factory``),
   imported when it is used.

A spec or entry point that fails to import raises :class:`PluginError` naming the module or the attribute
that failed. A name is never taken over silently: the built-ins (registered in code, or declared by fluxguide's
own distribution) win over an installed package's entry point of the same name, with a warning naming both; two
packages declaring one name are warned about, and asking for that name is refused (its spec picks one). This
module imports nothing else from fluxguide: it is the bottom of the layer stack.
"""

from __future__ import annotations

import importlib
import inspect
import re
import warnings
from collections.abc import Callable, Iterable
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Generic, TypeVar

from fluxguide.errors import UserError

T = TypeVar("T")


class PluginError(UserError, ImportError, ValueError):
    """A plug-in name or spec that cannot be resolved (unknown name, missing module or attribute, a name two
    installed packages declare)."""


#: The distribution whose entry points are built-ins (the shapes world's rewards, prompt sets and backbones).
BUILTIN_DISTRIBUTION = "fluxguide"


def distribution_name(ep: EntryPoint) -> str:
    """The name of the installed distribution that declares ``ep`` (``"?"`` when unknown)."""
    dist = getattr(ep, "dist", None)
    return str(dist.name) if dist is not None and dist.name else "?"


def describe_entry_point(ep: EntryPoint) -> str:
    """``entry point 'pkg.mod:make' of distribution 'pkg'``: where a name comes from, for messages."""
    return f"entry point {ep.value!r} of distribution {distribution_name(ep)!r}"


def describe_object(obj: object) -> str:
    """``'module:qualname'`` of a factory registered in code, for messages."""
    module = getattr(obj, "__module__", None) or "?"
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or type(obj).__name__
    return f"{module}:{name}"


def canonical_name(name: str) -> str:
    """Names are case-insensitive and ``_`` equals ``-``."""
    if not isinstance(name, str):
        raise TypeError(f"plug-in names are strings, got {type(name).__name__} {name!r}")
    return name.strip().lower().replace("_", "-")


def is_spec(name: str) -> bool:
    """Whether ``name`` is a ``package.module:attribute`` spec (rather than a registered name)."""
    return isinstance(name, str) and ":" in name and "/" not in name and "\\" not in name


def load_spec(spec: str, *, kind: str = "plug-in") -> Any:
    """The object a ``package.module:attribute`` spec names.

    Raises:
        PluginError: the spec is malformed, its module fails to import, or the attribute is missing; the
            message names which.
    """
    module_name, sep, attr = spec.strip().partition(":")
    if not sep or not module_name or not attr:
        raise PluginError(f"{kind} spec {spec!r} is not of the form 'package.module:attribute'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise PluginError(
            f"{kind} spec {spec!r}: could not import module {module_name!r} ({e}); check the module path and "
            f"that its package is installed in this environment"
        ) from e
    except Exception as e:  # the plug-in's own code failed while importing: its bug to fix, named as such
        raise PluginError(
            f"{kind} spec {spec!r}: importing module {module_name!r} raised {type(e).__name__}: {e}. Fix that "
            f"module (rerun with --debug or FLUXGUIDE_DEBUG=1 to see its traceback)"
        ) from e
    walked = module_name
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise PluginError(f"{kind} spec {spec!r}: {walked!r} has no attribute {part!r}")
        obj, walked = getattr(obj, part), f"{walked}.{part}"
    return obj


class Registry(Generic[T]):
    """Named factories of one kind: registered in code, declared by entry points, or given as specs.

    Args:
        kind: what the names stand for, in messages (``"reward"``).
        group: the entry-point group installed packages declare names in (``"fluxguide.rewards"``).
        builtins: ``() -> [(name, obj), ...]``, the built-ins, registered at the registry's first use rather than
            at its import: a module that defines a built-in may import the registry's own module (the algorithms'
            modules import ``AlgorithmSpec`` from theirs), so registering them at import would find it half-done.
    """

    def __init__(self, kind: str, group: str,
                 builtins: Callable[[], Iterable[tuple[str, T]]] | None = None) -> None:
        self.kind, self.group = kind, group
        self._factories: dict[str, T] = {}
        self._builtins = builtins
        self._warned: set[tuple[str, ...]] = set()  # the collisions warned about

    def _table(self) -> dict[str, T]:
        """What is registered in code, the built-ins loaded first (once; a failed load is retried next time)."""
        load, self._builtins = self._builtins, None
        if load is not None:
            added: list[str] = []
            try:
                for name, obj in load():
                    key = canonical_name(name)
                    if key in self._factories:
                        raise ValueError(f"two built-in {self.kind}s are named {key!r}")
                    self._factories[key] = obj
                    added.append(key)
            except BaseException:
                for key in added:
                    del self._factories[key]
                self._builtins = load
                raise
        return self._factories

    def register(self, name: str, obj: T | None = None, *, overwrite: bool = False) -> Any:
        """Register ``obj`` under ``name``; without ``obj``, a decorator.

        Raises:
            ValueError: ``name`` is taken and ``overwrite`` is False.
        """
        key = canonical_name(name)

        def add(value: T) -> T:
            if key in self._table() and not overwrite:
                raise ValueError(f"a {self.kind} named {key!r} is already registered; pick another name or overwrite=True")
            self._factories[key] = value
            return value

        return add if obj is None else add(obj)

    def _warn_once(self, name: str, eps: list[EntryPoint], message: str) -> None:
        """Warn about the collision of ``name`` with ``eps`` once per registry (the registry is asked often)."""
        key = (name, *sorted(f"{distribution_name(ep)}={ep.value}" for ep in eps))
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, UserWarning, stacklevel=3)

    def _declared(self) -> dict[str, list[EntryPoint]]:
        """The group's entry points by canonical name, one per declaring distribution."""
        declared: dict[str, list[EntryPoint]] = {}
        for ep in entry_points(group=self.group):
            eps = declared.setdefault(canonical_name(ep.name), [])
            if all((distribution_name(e), e.value) != (distribution_name(ep), ep.value) for e in eps):
                eps.append(ep)
        return declared

    def _entry_points(self) -> dict[str, list[EntryPoint]]:
        """The entry points each name resolves to: one, or several when installed packages collide.

        fluxguide's own entry point wins over another package's of the same name (warned); between other
        packages none wins (warned here, refused by :meth:`get`).
        """
        resolved: dict[str, list[EntryPoint]] = {}
        for key, eps in self._declared().items():
            builtin = [ep for ep in eps if distribution_name(ep) == BUILTIN_DISTRIBUTION]
            others = [ep for ep in eps if distribution_name(ep) != BUILTIN_DISTRIBUTION]
            if builtin and others:
                builtin_source = f"built in by {describe_entry_point(builtin[0])}"
                self._warn_once(key, eps, self._shadow_message(key, builtin_source, others))
                resolved[key] = builtin[:1]
            else:
                if len(eps) > 1:
                    self._warn_once(key, eps, self._ambiguous_message(key, eps))
                resolved[key] = eps
        return resolved

    def _shadow_message(self, key: str, builtin: str, others: list[EntryPoint]) -> str:
        ignored = " and ".join(describe_entry_point(ep) for ep in others)
        return (f"{self.kind} {key!r} is {builtin}, and also declared by {ignored} in group {self.group!r}: the "
                f"built-in is used and the entry point ignored. Rename that entry point, or name it by its spec "
                f"({', '.join(repr(ep.value) for ep in others)}) to use it")

    def _ambiguous_message(self, key: str, eps: list[EntryPoint]) -> str:
        both = " and ".join(describe_entry_point(ep) for ep in eps)
        return (f"{self.kind} {key!r} is declared by several installed packages in group {self.group!r}: {both}; "
                f"fluxguide does not pick one silently. Name the one you want by its spec "
                f"({' or '.join(repr(ep.value) for ep in eps)}), or uninstall one of them")

    def registered(self) -> dict[str, T]:
        """What was registered in code, by name, in registration order (no entry point is loaded)."""
        return dict(self._table())

    def names(self) -> list[str]:
        """Every registered and entry-point name, sorted."""
        return sorted(set(self._table()) | set(self._entry_points()))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (is_spec(name) or canonical_name(name) in self.names())

    def get(self, name: str) -> T:
        """The factory ``name`` stands for (a registered name, an entry point, or a spec).

        Raises:
            PluginError: unknown name (the message lists the known ones and the spec form), or a spec or entry
                point that fails to import.
        """
        if is_spec(name):
            return load_spec(name, kind=self.kind)
        key = canonical_name(name)
        eps = self._entry_points().get(key, [])
        if key in self._table():
            if eps:  # registered in code: a built-in (or the user's own registration) is never replaced
                builtin_source = f"registered in code ({describe_object(self._factories[key])})"
                self._warn_once(key, eps, self._shadow_message(key, builtin_source, eps))
            return self._factories[key]
        if len(eps) > 1:
            raise PluginError(self._ambiguous_message(key, eps))
        if eps:
            ep = eps[0]
            try:
                return ep.load()
            except Exception as e:  # ImportError, a missing attribute, or the package's own code failing
                raise PluginError(
                    f"{self.kind} {name!r} (entry point {ep.value!r} in group {self.group!r}) failed to load: "
                    f"{type(e).__name__}: {e}"
                ) from e
        raise PluginError(
            f"unknown {self.kind} {name!r}; valid names: {', '.join(self.names())}, or a spec "
            f"'package.module:attribute' naming your own factory"
        )


#: How Python words a call whose arguments do not fit the signature (the caller's mistake, not the callee's bug).
_SIGNATURE_MISMATCH = re.compile(r"unexpected keyword argument|missing \d+ required|takes \d+ positional|"
                                 r"got multiple values|takes no (keyword )?arguments")


def signature_mismatch(error: TypeError) -> bool:
    """Whether ``error`` says a call's arguments did not fit the callee's signature (the caller's options)."""
    return bool(_SIGNATURE_MISMATCH.search(str(error)))


def build_plugin(kind: str, name: str, factory: Callable[..., T], **options: Any) -> T:
    """``factory(**options)``, refusing options the factory (or the class it constructs) does not take with a
    :class:`PluginError` naming the plug-in and the options, rather than a bare ``TypeError``."""
    try:
        return factory(**options)
    except TypeError as e:
        if not signature_mismatch(e):
            raise
        raise PluginError(f"{kind} {name!r} does not take the options {options}: {e}. Check their names (the "
                          f"scripts' --{kind}-kwargs) against the {kind}'s signature") from e


def call_with_options(factory: Callable[..., T], *args: Any, **options: Any) -> T:
    """``factory(*args, **options)`` with only the options ``factory`` declares (all of them if it takes
    ``**kwargs``): the registries offer every option they know, and a plug-in names the ones it uses."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin without a signature: offer nothing optional
        return factory(*args)
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        options = {k: v for k, v in options.items() if k in params}
    return factory(*args, **options)
