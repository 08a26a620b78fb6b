"""The demo command runs against its own embedded server and says what it claims."""

from __future__ import annotations

import re
import subprocess
import sys


def test_demo_command_exits_zero_and_shows_the_delay_cap_at_work() -> None:
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
    assert "order 2 is large: the handler calls nak(delay=2.0)" in out
    holds = re.findall(r"#2, delivery \d+: held by natsmw .* nak\(delay=(\d\.\d\d)s\)", out)
    assert len(holds) >= 5
    assert all(float(delay) <= 0.25 for delay in holds)
    assert re.search(r"#2, delivery \d+: the handler ran, the server got: ack", out)
    waited = re.search(r"again (\d+\.\d\d)s after it asked for 2.0s, never before", out)
    assert waited is not None
    assert float(waited[1]) >= 2.0
    assert "Done: orders [1, 2, 3] billed." in out
    assert "handler_calls(msg) said 2 on its last run" in out
    assert "jitter" in out
    assert "natsmw_deadlines" in out
    assert re.search(rf"cap.stats: capped=1 holds={len(holds)} ", out)
    # The trace: the deferring span and the final run linking back; holds make no span,
    # the final one says how many there were.
    deferring = re.search(r"span ([0-9a-f]{16}) process orders\.> \(CONSUMER\), delivery 1,", out)
    assert deferring is not None
    assert "event natsmw.delay.capped: requested_s=2.00, cap_s=0.25" in out
    assert out.count("event natsmw.delay.hold:") == 0
    assert out.count(" process orders.> (CONSUMER)") == 2
    assert f"held_deliveries={len(holds)}," in out
    assert f"link to span {deferring[1]}: the one that asked for the delay" in out


def test_the_demo_without_the_demo_extra_says_what_to_install() -> None:
    """The natsmw command comes with the base package; the demo needs the extra."""
    hide_sdk = (
        "import sys; sys.modules['opentelemetry.sdk'] = None; "  # as if not installed
        "from natsmw.__main__ import main; sys.exit(main(['demo']))"
    )
    result = subprocess.run(
        [sys.executable, "-c", hide_sdk], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "pip install 'natsmw[demo]'" in result.stderr
    assert "Traceback" not in result.stderr
