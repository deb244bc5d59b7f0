"""The ../shared habit: absent shared data skips with the reason, or fails where CI requires it."""

from __future__ import annotations

import pytest
from conftest import require_shared


def test_absent_shared_data_skips_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.delenv("VMR_REQUIRE_SHARED", raising=False)
    with pytest.raises(pytest.skip.Exception, match="absent"):
        require_shared(tmp_path / "nope")


def test_ci_turns_absence_into_a_failure(tmp_path, monkeypatch):
    monkeypatch.setenv("VMR_REQUIRE_SHARED", "1")
    with pytest.raises(pytest.fail.Exception, match="VMR_REQUIRE_SHARED=1"):
        require_shared(tmp_path / "nope")


def test_present_path_is_returned(tmp_path):
    assert require_shared(tmp_path) == tmp_path
