"""The BIOS UUID an agent enrols with (what links it to its VM)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.host_facts import PRODUCT_UUID_ENV, bios_uuid


def test_read_lower_case_and_stripped(tmp_path: Path) -> None:
    path = tmp_path / "product_uuid"
    path.write_text("4223C0DE-1234-5678-9ABC-DEF012345678\n")
    assert bios_uuid(path) == "4223c0de-1234-5678-9abc-def012345678"


@pytest.mark.parametrize(
    "text",
    ["", "not-a-uuid", "00000000-0000-0000-0000-000000000000",
     "FFFFFFFF-FFFF-FFFF-FFFF-FFFFFFFFFFFF"],
)  # fmt: skip
def test_placeholders_and_garbage_are_no_uuid(tmp_path: Path, text: str) -> None:
    path = tmp_path / "product_uuid"
    path.write_text(text)
    assert bios_uuid(path) is None


def test_missing_file_is_no_uuid(tmp_path: Path) -> None:
    assert bios_uuid(tmp_path / "absent") is None


def test_the_environment_names_another_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "uuid"
    path.write_text("4223c0de-1234-5678-9abc-def012345678")
    monkeypatch.setenv(PRODUCT_UUID_ENV, str(path))
    assert bios_uuid() == "4223c0de-1234-5678-9abc-def012345678"
