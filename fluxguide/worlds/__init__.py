"""Worlds: self-contained base models with their own data, rewards, verifier and prompt splits.

A world reaches the layers above only through the :class:`fluxguide.backbones.Backbone` contract and the
plug-in registry (:mod:`fluxguide.plugins`); nothing outside this folder imports it by name.
"""
