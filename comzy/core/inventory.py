"""``comzy-server settings``: every setting, read from the pydantic settings models themselves.

The core's (``ServerSettings``), the cluster's (``ClusterSettings``, used by COMZY_ROLE edge and
control) and those of each enabled plugin: a plugin's settings are the pydantic-settings object it
keeps on ``self.settings`` (docs/plugin_hooks.md, "Settings"). Each setting is listed with its
environment variable, its current value (secrets as ``***``), its default, where the value came from
and its description, as a ``.env`` file that could be edited and used, or as JSON.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, SecretBytes, SecretStr, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

from comzy.core.settings import ServerSettings, explain_validation_error

#: A value written as it is in a .env file; anything else is quoted.
_PLAIN = re.compile(r"[A-Za-z0-9_./:,@%+={}<>*-]*")


@dataclass(frozen=True, slots=True)
class Setting:
    """One setting as ``comzy-server settings`` lists it."""

    #: ``core``, ``cluster`` or ``plugin NAME``.
    section: str
    #: The environment variable to set (the canonical name).
    variable: str
    #: Other names it is read from too (the original Comzy's ``HTTP_PORT``...).
    aliases: tuple[str, ...]
    #: The value now, as text (``***`` for a set secret); None when unset.
    value: str | None
    #: The default, as text; None when the default is "unset".
    default: str | None
    #: ``environment`` (set there), ``.env`` (from the .env file of the working directory) or ``default``.
    source: str
    secret: bool
    description: str


def model_variables(model: type[BaseSettings], name: str, info: FieldInfo) -> list[str]:
    """The environment variables a field of ``model`` is read from, the canonical one first."""
    alias = info.validation_alias
    if isinstance(alias, AliasChoices):
        return [str(choice) for choice in alias.choices]
    if isinstance(alias, str):
        return [alias]
    prefix = str(model.model_config.get("env_prefix") or "")
    return [(prefix + name).upper()]


def is_secret(info: FieldInfo) -> bool:
    """Whether the field holds a secret (``SecretStr``, ``SecretStr | None``...)."""
    kinds = getattr(info.annotation, "__args__", None) or (info.annotation,)
    return any(isinstance(kind, type) and issubclass(kind, (SecretStr, SecretBytes)) for kind in kinds)


def mask_urls(text: str) -> str:
    """A URL (or comma list of URLs) with the password or token masked (``user:***@host``)."""
    from comzy.core.cluster.settings import mask_url

    masked = []
    for item in text.split(","):
        try:
            masked.append(mask_url(item.strip()))
        except ValueError:
            masked.append("***" if "@" in item else item.strip())
    return ",".join(masked)


def _text(value: Any, secret: bool, url: bool) -> str | None:
    """How a value is shown: None for unset, ``***`` for a secret (a URL keeps all but its password)."""
    if value is None:
        return None
    if isinstance(value, SecretStr | SecretBytes):
        raw = value.get_secret_value()
        value = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
        if not url:
            return "***" if value else ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, Path):
        value = str(value)
    text = str(value)
    if url:
        return mask_urls(text)
    return "***" if secret and text else text


def _default(info: FieldInfo) -> Any:
    return info.get_default(call_default_factory=True)


def settings_of(section: str, model: type[BaseSettings], instance: BaseSettings | None) -> list[Setting]:
    """Every field of ``model``: its value from ``instance``, or, when the model could not be built
    (a bad value), from the environment as it is (the error is reported apart)."""
    found: list[Setting] = []
    environ_upper = {name.upper(): value for name, value in os.environ.items()}
    for name, info in model.model_fields.items():
        variables = model_variables(model, name, info)
        secret = is_secret(info)
        url = name.endswith("_url")
        in_environment = [v for v in variables if v.upper() in environ_upper]
        if instance is not None:
            value = getattr(instance, name)
            if in_environment:
                source = "environment"
            elif name in instance.model_fields_set:
                source = ".env"
            else:
                source = "default"
        elif in_environment:
            value, source = environ_upper[in_environment[0].upper()], "environment"
            if secret and not url:
                value = SecretStr(value)
        else:
            value, source = _default(info), "default"
        default = _default(info)
        found.append(Setting(section, variables[0], tuple(variables[1:]), _text(value, secret, url),
                             _text(default, secret, url), source, secret,
                             " ".join((info.description or "").split())))
    return found


def build(model: type[BaseSettings]) -> tuple[BaseSettings | None, str | None]:
    """``model`` read from the environment and ``.env``, or None and what is wrong (one line)."""
    try:
        return model(), None
    except ValidationError as exc:
        return None, explain_validation_error(model, exc)


def collect(plugins: Iterable[tuple[str, object]], plugin_errors: Iterable[tuple[str, str]] = ()
            ) -> tuple[list[Setting], list[str]]:
    """Every setting of the core, the cluster and the given (enabled, built) plugins; and the
    problems found (a bad value, a plugin that cannot be built), one line each."""
    from comzy.core.cluster.settings import ClusterSettings  # pydantic only: no NATS needed

    problems: list[str] = []
    rows: list[Setting] = []
    for section, model in (("core", ServerSettings), ("cluster", ClusterSettings)):
        instance, problem = build(model)
        if problem is not None:
            problems.append(f"{section} settings: {problem}")
        rows += settings_of(section, model, instance)
    for name, plugin in plugins:
        settings = getattr(plugin, "settings", None)
        if isinstance(settings, BaseSettings):
            rows += settings_of(f"plugin {name}", type(settings), settings)
    for name, error in plugin_errors:
        problems.append(f"plugin {name!r} cannot be built, so its settings are not listed: {error}")
    return rows, problems


_SECTION_TITLES = {
    "core": "core: the server itself",
    "cluster": "cluster: read only when COMZY_ROLE is edge or control",
}


def render(rows: list[Setting], as_json: bool, plugin_names: list[str]) -> str:
    """The listing: a ``.env`` file (a comment above each variable; unset ones commented out), or JSON."""
    if as_json:
        return json.dumps([asdict(row) | {"aliases": list(row.aliases)} for row in rows], indent=2)
    lines = ["# comzy-server reads these environment variables (or a .env file in the working directory).",
             "# Unset ones are commented out; secrets show as ***.",
             f"# Enabled plugins: {', '.join(plugin_names) or 'none'} (COMZY_PLUGINS; `comzy-server plugins` "
             "lists the installed ones)."]
    section = None
    for row in rows:
        if row.section != section:
            section = row.section
            title = _SECTION_TITLES.get(section, f"{section} (enabled)")
            lines += ["", f"# ---- {title} ----"]
        lines.append(f"# {row.description}" if row.description else "#")
        facts = [f"default: {_shown(row.default)}"]
        if row.aliases:
            facts.append(f"also read from {', '.join(row.aliases)}")
        if row.source != "default":
            facts.append(f"set in the {row.source}" if row.source == "environment" else "set in .env")
        lines.append(f"#   ({'; '.join(facts)})")
        if row.value is None:
            lines.append(f"# {row.variable}=")
        else:
            lines.append(f"{row.variable}={_quoted(row.value)}")
    without = [name for name in plugin_names if not any(r.section == f"plugin {name}" for r in rows)]
    if without:
        lines += ["", f"# Plugins without settings: {', '.join(without)}."]
    return "\n".join(lines)


def _shown(value: str | None) -> str:
    if value is None:
        return "unset"
    return _quoted(value) if value else '""'


def _quoted(value: str) -> str:
    """``value`` as a .env file reads it back: bare when plain, else in double quotes."""
    if _PLAIN.fullmatch(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


__all__ = ["Setting", "build", "collect", "is_secret", "mask_urls", "model_variables", "render", "settings_of"]
