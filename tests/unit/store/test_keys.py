"""The key format and what scopes grant (no servers)."""

from __future__ import annotations

import pytest

from conveyor.store.keys import KEY_PATTERN, check_scopes, grants, parse_key


def test_admin_grants_every_scope_and_others_only_themselves() -> None:
    for scope in ("tasks:read", "tasks:enqueue", "tasks:manage", "admin"):
        assert grants(["admin"], scope)
    assert grants(["tasks:read"], "tasks:read")
    assert not grants(["tasks:read"], "tasks:enqueue")
    assert not grants(["tasks:manage"], "tasks:read")
    assert not grants(["tasks:enqueue", "tasks:manage", "tasks:read"], "admin")


def test_scopes_are_checked_and_deduplicated() -> None:
    assert check_scopes(["tasks:read", " tasks:read", "admin"]) == ["tasks:read", "admin"]
    with pytest.raises(ValueError, match="tasks:write"):
        check_scopes(["tasks:write"])
    with pytest.raises(ValueError, match="none given"):
        check_scopes([""])


def test_only_the_key_format_parses() -> None:
    key = "cvk_0123456789abcdef_" + "A" * 20 + "_-" + "b" * 21
    assert KEY_PATTERN.fullmatch(key)
    assert parse_key(key) == ("0123456789abcdef", "A" * 20 + "_-" + "b" * 21)
    for wrong in ("s3cret", "cvk_0123456789abcdef_short", "cvk_0123456789ABCDEF_" + "A" * 43,
                  key + "x", "xcvk" + key[3:]):
        assert parse_key(wrong) is None, wrong
