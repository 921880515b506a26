"""Alias rules for plugins that grant or map aliases: the same checks and wording as the core's.

A plugin that lets users claim a name, or maps a host to one, checks it with :func:`check_alias`
so that every part of Comzy accepts and refuses the same names with the same reasons.
"""

from __future__ import annotations

from comzy.core.aliases import ALIAS_RE, check_alias, random_alias

__all__ = ["ALIAS_RE", "check_alias", "random_alias"]
