"""The one registry of guidance architectures: names for the scripts and ``build_policy``, classes for checkpoints.

An architecture declares itself once, in its class statement::

    class MyNet(BaseGuidanceModel, architecture="my-net"):   # the name(s) ``build_policy`` and ``--policy`` take
        text_aware = False                                    # reads neither txt nor vec (default True)

        @classmethod
        def for_backbone(cls, backbone, *, hidden_dim, grid_size, device): ...   # sized for a backbone

Every subclass of :class:`~fluxguide.policies.base.BaseGuidanceModel` (the users' included, with or without a name)
is also recorded by class name, which is how a checkpoint's config (``{"type": class name, ...}``) rebuilds it; a
composite declares its parts (:class:`~fluxguide.policies.composite.CompositeGuidance`). Names work as every
plug-in name does (:class:`fluxguide.plugins.Registry`): registered in code, declared in the ``fluxguide.policies``
entry-point group by an installed package (a factory, or a class with ``for_backbone``), or a spec
``package.module:attribute``. This module imports nothing else from fluxguide but the plug-in machinery, so the
contract (``policies/base.py``) can register into it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

from fluxguide.plugins import Registry, canonical_name

PolicyFactory = Callable[..., Any]
"""``factory(backbone, **sizes) -> BaseGuidanceModel``: what a name stands for (a class's ``for_backbone``)."""


class ArchitectureRegistry(Registry[PolicyFactory]):
    """Guidance architectures by name (factories sized for a backbone) and by class name (checkpoints)."""

    def __init__(self) -> None:
        super().__init__("policy architecture", "fluxguide.policies")
        self._classes: dict[str, type] = {}

    def declare(self, cls: type, names: Sequence[str]) -> None:
        """Record ``cls`` by class name, and its ``for_backbone`` under ``names`` (called by the class statement).

        A class defined again (a module imported twice, a notebook cell rerun) replaces its earlier self.

        Raises:
            TypeError: ``names`` given but the class has no ``for_backbone`` of its own.
            ValueError: a name another class (or factory) holds.
        """
        self._classes[cls.__name__] = cls
        if not names:
            return
        if "for_backbone" not in vars(cls):
            raise TypeError(f"{cls.__name__} declares the architecture name(s) {list(names)} but no for_backbone "
                            "classmethod: define for_backbone(cls, backbone, **sizes) to size it for a backbone")
        for name in names:
            owner = getattr(self._factories.get(canonical_name(name)), "__self__", None)
            again = owner is not None and (owner.__module__, owner.__qualname__) == (cls.__module__, cls.__qualname__)
            self.register(name, cls.for_backbone, overwrite=again)

    def guidance_class(self, type_name: str) -> type:
        """The class a checkpoint config's ``"type"`` names.

        Raises:
            ValueError: no such class has been defined (its module is not imported).
        """
        cls = self._classes.get(type_name)
        if cls is None:
            raise ValueError(f"unknown guidance model type {type_name!r}; known: {sorted(self._classes)}. "
                             "Import the module that defines it before building")
        return cls

    def factory(self, name: str) -> PolicyFactory:
        """The factory ``name`` stands for; a guidance class (an entry point or a spec naming the class) stands for
        its ``for_backbone``."""
        found = self.get(name)
        return found.for_backbone if inspect.isclass(found) and hasattr(found, "for_backbone") else found

    def text_blind_names(self) -> list[str]:
        """The names registered in code whose networks can read no text: the class declares ``text_aware =
        False``, or its ``for_backbone`` takes ``text_conditioning``."""
        blind = []
        for name, factory in self._factories.items():
            owner = getattr(factory, "__self__", None)
            if owner is not None and (not getattr(owner, "text_aware", True)
                                      or "text_conditioning" in inspect.signature(factory).parameters):
                blind.append(name)
        return sorted(blind)


ARCHITECTURES = ArchitectureRegistry()
"""Every guidance architecture: the built-ins (``"mlp"``, ``"attention"``, ``"conv"``, ``"affine"``), a class
declared with ``architecture=``, an installed package's ``fluxguide.policies`` entry point, or a spec
``"package.module:factory"``. A factory is called as ``factory(backbone, **sizes)`` and gets those of
``hidden_dim``, ``num_layers``, ``num_heads``, ``text_conditioning``, ``vec_dim``, ``txt_dim``, ``grid_size`` and
``device`` it declares (all of them if it takes ``**kwargs``)."""
