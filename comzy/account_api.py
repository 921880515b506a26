"""The account API's vocabulary for plugins that serve it (docs/agent_api.md).

A plugin that keeps user accounts serves these paths through the ``agent_routes`` hook and
answers every error with :func:`error_document` and the status of its :class:`ErrorCode`, so
the stock agent's ``comzy login``, ``status`` and ``aliases`` work with it unchanged.
"""

from __future__ import annotations

from comzy.core.account_api import ALIASES_PATH, ME_PATH, STATUS_PATH, ErrorCode, error_document, read_error

__all__ = ["ALIASES_PATH", "ME_PATH", "STATUS_PATH", "ErrorCode", "error_document", "read_error"]
