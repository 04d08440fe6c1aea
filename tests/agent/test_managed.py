"""The managed agent takes its schedule from the configuration server's policy."""

from __future__ import annotations

import ssl
from pathlib import Path

from agent.config import AgentConfig, TrackerChoice
from agent.managed import Controller


def config(tmp_path: Path) -> AgentConfig:
    return AgentConfig(
        machine_id="web1", state_dir=tmp_path, process_host="", process_port=0, tls_name="",
        disks=(), tracker=TrackerChoice.SCAN, tag_interval=1.0, app_interval=None,
        pre_script=("/local/pre",), post_script=(), freeze_timeout=1.0,
        tls_cert=tmp_path / "c", tls_key=tmp_path / "k", tls_ca=tmp_path / "ca", managed=True,
    )  # fmt: skip


def test_policy_overrides_the_local_schedule_and_fills_only_what_it_has(tmp_path: Path) -> None:
    ctl = Controller(config(tmp_path), [], lambda disk: None, ssl.create_default_context())  # type: ignore[arg-type, return-value]
    assert ctl._schedule() == (1.0, None, ("/local/pre",), ())
    ctl._apply_policy({"crash_interval_s": 5, "app_interval_s": 3600.0,
                       "pre_script": "/opt/db/freeze --fast", "post_script": None})  # fmt: skip
    assert ctl._schedule() == (5.0, 3600.0, ("/opt/db/freeze", "--fast"), ())
    ctl._apply_policy({"crash_interval_s": -1, "app_interval_s": "x"})  # nonsense: local values
    assert ctl._schedule() == (1.0, None, ("/local/pre",), ())
    ctl._apply_policy("not a policy")
    assert ctl._schedule() == (1.0, None, ("/local/pre",), ())
