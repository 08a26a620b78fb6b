"""The demo command runs against its own embedded server and says what it claims."""

from __future__ import annotations

import subprocess
import sys


def test_demo_command_exits_zero_and_narrates_the_chain() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "natsmw", "demo"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Started an embedded nats-server with JetStream at nats://127.0.0.1:" in out
    assert "stream message #2 on orders.new, delivery 1: calling the handler" in out
    assert "the handler settled it: nak" in out
    assert "stream message #2 on orders.new, delivery 2: calling the handler" in out
    assert "Done: orders [1, 2, 3] billed" in out
    assert out.count("the handler settled it: ack") == 3
