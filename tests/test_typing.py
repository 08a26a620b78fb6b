"""What a type checker makes of decorated handlers (mypy --strict, run on real snippets), and
of the README's and the quickstart's code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from mypy import api

ROOT = Path(__file__).resolve().parent.parent

SHAPES = """
import asyncio
import functools
from collections.abc import Awaitable, Callable
from datetime import timedelta

from nats.aio.client import Client
from nats.aio.msg import Msg

from natsmw import (
    MessageProxy,
    compose,
    install,
    middleware,
    with_delay_cap,
    with_size_limit,
)


async def step(msg: MessageProxy, call_next: Handler) -> None:
    await call_next(msg)


@with_delay_cap(60)
async def plain(msg: Msg) -> None:
    await msg.nak(delay=5)


@compose(with_size_limit(max_body=10), with_delay_cap(60))
async def proxied(msg: MessageProxy) -> None:
    await msg.nak(delay=timedelta(hours=3))


class Service:
    @middleware(step)
    async def on_msg(self, msg: MessageProxy) -> None:
        await msg.nak(delay=timedelta(minutes=1))

    @staticmethod
    @with_delay_cap(60)
    async def static(msg: Msg) -> None: ...


def users_middleware(
    call_next: Callable[[Msg], Awaitable[None]],
) -> Callable[[Msg], Awaitable[None]]:
    async def handle(msg: Msg) -> None:
        await call_next(msg)

    return handle


async def users_step(msg: Msg, call_next: Callable[[Msg], Awaitable[None]]) -> None:
    await call_next(msg)


@compose(users_middleware, middleware(users_step), with_delay_cap(60))
async def with_users_own(msg: Msg) -> None: ...


async def use(nc: Client, msg: Msg) -> None:
    install(nc, chain=users_middleware)
    install(nc, chain=compose(users_middleware, with_delay_cap(60)))
    reveal_type(plain)
    reveal_type(proxied)
    reveal_type(Service().on_msg)
    await nc.subscribe("a", cb=plain)
    await nc.subscribe("b", cb=proxied)
    await nc.subscribe("c", cb=Service().on_msg)
    await nc.subscribe("d", cb=Service.static)
    asyncio.create_task(proxied(msg))
    asyncio.create_task(Service().on_msg(msg))
    partial = with_delay_cap(60)(functools.partial(Service.on_msg, Service()))
    await nc.subscribe("e", cb=partial)
"""

MISTAKES = """
from nats.aio.msg import Msg

from natsmw import MessageProxy, with_delay_cap


@with_delay_cap(60)
def not_async(msg: Msg) -> None: ...


async def as_text(msg: MessageProxy) -> None:
    await msg.nak(delay="3h")
"""


def _mypy(tmp_path: Path, source: str) -> str:
    module = tmp_path / "snippet.py"
    module.write_text(source)
    stdout, stderr, _ = api.run(
        ["--strict", "--no-incremental", "--cache-dir", str(tmp_path / "cache"), str(module)]
    )
    return stdout + stderr


def _python_block(markdown: Path, starts_with: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", markdown.read_text(), re.S)
    return next(block for block in blocks if block.startswith(starts_with))


def test_decorated_handlers_keep_their_shape_for_mypy(tmp_path: Path) -> None:
    source = "from natsmw.chain import Handler\n" + SHAPES
    output = _mypy(tmp_path, source)
    revealed = re.findall(r'Revealed type is "(.*)"', output)
    assert revealed == [
        "def (nats.aio.msg.Msg) -> typing.Coroutine[Any, Any, None]",
        "def (nats.aio.msg.Msg) -> typing.Coroutine[Any, Any, None]",
        "def (nats.aio.msg.Msg) -> typing.Coroutine[Any, Any, None]",
    ], output
    errors = [line for line in output.splitlines() if ": error:" in line]
    assert errors == [], output


def test_mypy_names_the_mistakes(tmp_path: Path) -> None:
    output = _mypy(tmp_path, MISTAKES)
    assert ':7: error: Argument 1 to "__call__" of "Decorator" has incompatible type' in output
    assert ':12: error: Argument "delay" to "nak" of "MessageProxy" has incompatible type' in output


@pytest.mark.parametrize(
    ("markdown", "starts_with"),
    [("README.md", "from datetime import timedelta"), ("docs/quickstart.md", "import asyncio")],
)
def test_the_documented_code_passes_mypy_strict(
    tmp_path: Path, markdown: str, starts_with: str
) -> None:
    source = _python_block(ROOT / markdown, starts_with)
    if "send_reminder" in source:  # the user's own code, in the README's example
        source += "\n\nasync def send_reminder(data: bytes) -> None: ...\n"
    output = _mypy(tmp_path, source)
    assert "Success: no issues found" in output, output
