"""``Registration.take_policy``: the one ``on_register`` of a policy plugin (docs/plugin_hooks.md, "Policy
plugins"). The built-in policies use it (their own tests run it through a real server); these pin its contract
for third-party plugins: nothing sent, nothing kept; bad data refused with the plugin's label, nothing kept or
enforced; good data kept and enforced."""

from __future__ import annotations

from typing import Any

import pytest

from comzy import Registration, Reject


def registration(agent_data: dict[str, Any]) -> Registration:
    """A registration as the core hands it to ``on_register``, with the agent's plugin data."""
    return Registration(port=3000, requested_alias=None, token=None, client_address="127.0.0.1",
                        agent_version="comzy/0.1.0", agent_data=agent_data, required=list(agent_data))


def parse_limit(data: Any) -> dict[str, Any]:
    """A small policy's parser: a map with a positive whole ``limit``."""
    if not isinstance(data, dict) or not isinstance(data.get("limit"), int) or data["limit"] < 1:
        raise ValueError("'limit' must be a positive whole number")
    return {"limit": data["limit"]}


def test_a_policy_the_agent_sent_is_kept_and_enforced() -> None:
    wanted = registration({"quota": {"limit": 5, "ignored": True}, "other": {"x": 1}})
    wanted.plugin_state("quota")["kept"] = "before"  # what the plugin (or an earlier hook) put there stays
    assert wanted.take_policy("quota", parse_limit, "quota policy") == {"limit": 5}
    assert wanted.metadata["quota"] == {"kept": "before", "limit": 5}
    assert wanted.enforced == ["quota"]
    assert "other" not in wanted.metadata  # another plugin's data is left alone


def test_no_data_for_the_plugin_is_no_policy() -> None:
    wanted = registration({"other": {"limit": 5}})
    assert wanted.take_policy("quota", parse_limit) is None
    assert wanted.metadata == {} and wanted.enforced == []


@pytest.mark.parametrize(("label", "prefix"), [("quota policy", "quota policy: "), (None, "quota: ")])
def test_bad_data_is_refused_with_the_label_and_nothing_is_kept(label: str | None, prefix: str) -> None:
    wanted = registration({"quota": {"limit": 0}})
    with pytest.raises(Reject) as caught:
        wanted.take_policy("quota", parse_limit, label)
    assert str(caught.value) == (f"{prefix}the agent's data is not valid ('limit' must be a positive whole number); "
                                 "use a matching comzy agent")
    assert caught.value.__cause__ is None and caught.value.__suppress_context__  # no traceback of the parser
    assert wanted.metadata == {} and wanted.enforced == []  # fails closed: the core refuses an unconfirmed policy


def test_only_a_value_error_is_a_refusal() -> None:
    # Any other exception is a bug in the parser: it propagates (the core logs it and refuses generically).
    def broken(data: Any) -> dict[str, Any]:
        raise KeyError("bug")

    wanted = registration({"quota": {"limit": 1}})
    with pytest.raises(KeyError):
        wanted.take_policy("quota", broken)
    assert wanted.enforced == []
