"""Large bodies by reference: a claim check over the JetStream object store.

A publisher given a [`ClaimCheck`][natsmw.ClaimCheck] stores a body over its threshold in an
object store bucket and sends the message with a ``Natsmw-Claim`` header instead of the body::

    await natsmw.publish(js, "scans.new", twenty_megabytes, claim_check=ClaimCheck())

    @compose(with_size_limit(max_body=64 << 20), with_delay_cap(60), with_claim_check())
    async def handle(msg): ...  # msg.data is the whole body again

The header's value is JSON: ``{"bucket": ..., "name": ..., "size": ..., "digest": ...}``,
where ``digest`` is the object store's own (``SHA-256=`` and the URL-safe base64 of the
body's SHA-256). A consumer without natsmw reads the body with nats-py alone::

    claim = json.loads(msg.headers["Natsmw-Claim"])
    body = (await (await js.object_store(claim["bucket"])).get(claim["name"])).data
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import time
import uuid
import weakref
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import ObjectStoreConfig
from nats.js.errors import (
    BadObjectMetaError,
    BucketNotFoundError,
    NotFoundError,
    ObjectNotFoundError,
)
from nats.js.object_store import OBJ_CHUNKS_PRE_TEMPLATE, VALID_BUCKET_RE, ObjectStore

from natsmw import guards, ops
from natsmw._throttle import Throttled
from natsmw.chain import Decorator, Handler, layer
from natsmw.duration import Duration, to_positive_seconds, to_seconds
from natsmw.guards import Rejection, SizeGuard, SizeGuardStats
from natsmw.headers import peek_header
from natsmw.message import WIRE_BODY, MessageProxy, capped_by

__all__ = [
    "CLAIM_HEADER",
    "Claim",
    "ClaimCheck",
    "ClaimResolver",
    "with_claim_check",
]

log = logging.getLogger("natsmw.claim")

CLAIM_HEADER = guards.CLAIM_HEADER
"""The header that carries a [`Claim`][Claim] in place of the body."""

DEFAULT_BUCKET = "natsmw_claims"
_LONGEST_HEADER = 4096
_LONGEST_NAME = 1024  # base64 in a subject: well under the server's 4 KiB control line
_SUBJECT_IN_NAME = 128
# Reads of claimed bodies at once, per client: twenty 20 MB reads on one connection outran the
# server's pending limit for a client (64 MB), and it closed the connection.
_READS_AT_ONCE = 4
_BYTES_PER_REQUEST = 4 << 20
_READERS: weakref.WeakKeyDictionary[Client, asyncio.Semaphore] = weakref.WeakKeyDictionary()

ClaimErrorAction = Literal["nak", "dead_letter"]
_ACTIONS = ("nak", "dead_letter")


@dataclass(frozen=True)
class Claim:
    """Where a body sent by reference is: an object ``name`` in object store ``bucket``, of
    ``size`` bytes, whose SHA-256 is ``digest`` (``SHA-256=<URL-safe base64>``)."""

    bucket: str
    name: str
    size: int
    digest: str

    def header(self) -> str:
        """The ``Natsmw-Claim`` header value: compact JSON."""
        return json.dumps(
            {"bucket": self.bucket, "name": self.name, "size": self.size, "digest": self.digest},
            separators=(",", ":"),
        )

    @classmethod
    def from_header(cls, value: str) -> Claim:
        """Read a ``Natsmw-Claim`` header value.

        Raises:
            ValueError: not a claim (not JSON, a field missing or of the wrong type).
        """
        if len(value) > _LONGEST_HEADER:
            raise ValueError(f"not a {CLAIM_HEADER} header: {len(value)} characters long")
        try:
            fields = json.loads(value)
            claim = cls(fields["bucket"], fields["name"], fields["size"], fields["digest"])
        except (ValueError, KeyError, TypeError, RecursionError) as error:
            raise ValueError(f"not a {CLAIM_HEADER} header: {value[:200]!r} ({error!r})") from None
        if not (
            isinstance(claim.bucket, str)
            and isinstance(claim.name, str)
            and isinstance(claim.size, int)
            and not isinstance(claim.size, bool)
            and claim.size >= 0
            and isinstance(claim.digest, str)
        ):
            raise ValueError(f"not a {CLAIM_HEADER} header: {value[:200]!r} (a field's type)")
        # A name the server cannot take in a subject would close the connection (a control
        # line over its limit): refused here, as any header that is not a claim.
        if (
            VALID_BUCKET_RE.match(claim.bucket) is None
            or len(claim.bucket) > _LONGEST_NAME
            or not claim.name
            or len(claim.name) > _LONGEST_NAME
        ):
            raise ValueError(f"not a {CLAIM_HEADER} header: {value[:200]!r} (bucket or name)")
        return claim


class ClaimCheck:
    """What a publisher stores by reference, and where.

    Give it to [`natsmw.publish`][natsmw.publish] or
    [`publish_not_before`][natsmw.publish_not_before] as ``claim_check=``. A body of more than
    ``threshold`` bytes is stored as an object in ``bucket`` (made on first use: 3 replicas on
    a cluster, objects kept ``ttl``), and the message carries a ``Natsmw-Claim`` header and an
    empty body. Smaller bodies travel as they are.

    Objects are not deleted when a message is handled: several consumers may read one. They
    live as long as ``ttl`` says; make it at least the stream's ``max_age`` plus the longest
    delay a message may wait, or a message may outlive its body (its consumers then keep it
    and say so; see [`with_claim_check`][with_claim_check]). ``ttl=None`` keeps them until
    deleted. An existing bucket is used as it is (with a warning if it keeps objects for
    less than ``ttl``). ``timeout`` bounds opening or making the bucket; an upload is bounded
    by nats-py's wait for each chunk's confirmation.

    Raises:
        ValueError: a negative ``threshold``, a bad ``ttl`` or ``replicas``.
        TypeError: ``threshold`` or ``replicas`` not an ``int``.
    """

    def __init__(
        self,
        *,
        threshold: int = 512 * 1024,
        bucket: str = DEFAULT_BUCKET,
        ttl: Duration | None = timedelta(days=7),
        replicas: int | None = None,
        timeout: Duration = 60.0,
    ) -> None:
        if isinstance(threshold, bool) or not isinstance(threshold, int):
            raise TypeError(f"threshold must be a number of bytes (int), got {threshold!r}")
        if threshold < 0:
            raise ValueError(f"threshold must be zero or more, got {threshold!r}")
        if replicas is not None and (
            isinstance(replicas, bool) or not isinstance(replicas, int) or not 1 <= replicas <= 5
        ):
            raise ValueError(f"replicas must be 1 to 5 (the server's most), got {replicas!r}")
        if not isinstance(bucket, str) or VALID_BUCKET_RE.match(bucket) is None:
            raise ValueError(
                f"bucket must be an object store name (letters, digits, '-' and '_'), "
                f"got {bucket!r}"
            )
        self.threshold = threshold
        self.bucket = bucket
        self.ttl = None if ttl is None else to_seconds(ttl, "ttl")
        if self.ttl == 0:
            raise ValueError("ttl must be more than zero (None keeps objects until deleted)")
        self.replicas = replicas
        self.timeout = to_positive_seconds(timeout, "timeout")
        self._stores: weakref.WeakKeyDictionary[Client, ObjectStore] = weakref.WeakKeyDictionary()

    def __repr__(self) -> str:
        return f"ClaimCheck(threshold={self.threshold}, bucket={self.bucket!r}, ttl={self.ttl})"

    async def check_in(
        self, js: JetStreamContext, subject: str, payload: bytes, headers: Mapping[str, str]
    ) -> tuple[bytes, dict[str, str], Claim | None]:
        """The body and headers to publish for ``payload``: as given if it is small, else an
        empty body and a claim, the object stored (and confirmed) first.

        Raises:
            nats.errors.Error, asyncio.TimeoutError: the object could not be stored; nothing
                was published.
        """
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise TypeError(f"payload must be bytes, got {type(payload).__name__}")
        if len(payload) <= self.threshold:
            return payload, dict(headers), None
        payload = bytes(payload)  # nats-py's object store takes bytes, not views
        store = await self._store(js)
        # The subject names the object for an operator; cut, so that any subject makes a claim
        # its consumers accept (a header escapes each non-ASCII character in six).
        name = f"{subject[:_SUBJECT_IN_NAME]}/{uuid.uuid4().hex}"
        # No overall timeout on the upload: nats-py waits for each chunk's confirmation with
        # its own, and takes the chunks away again on an error; a cancellation would leave
        # them behind, unlisted, for the bucket's ttl (forever without one).
        try:
            info = await store.put(name, payload)
        except NotFoundError:  # the bucket was deleted since it was opened: made again
            self._stores.pop(js._nc, None)
            store = await self._store(js)
            info = await store.put(name, payload)
        claim = Claim(self.bucket, name, info.size or 0, info.digest or "")
        return b"", {**headers, CLAIM_HEADER: claim.header()}, claim

    async def discard(self, js: JetStreamContext, claim: Claim) -> None:
        """Delete the object of a claim whose message was not published (best effort)."""
        try:
            store = await self._store(js)
            await asyncio.wait_for(store.delete(claim.name), self.timeout)
        except (NatsError, asyncio.TimeoutError, OSError) as error:
            log.warning(
                "could not delete object %r of bucket %r after its message failed to publish "
                "(%r): it stays until its ttl",
                claim.name, claim.bucket, error,
            )  # fmt: skip

    async def _store(self, js: JetStreamContext) -> ObjectStore:
        client: Client = js._nc
        store = self._stores.get(client)
        if store is None:
            store = self._stores[client] = await self._open(js, client)
        return store

    async def _check_ttl(self, js: JetStreamContext) -> None:
        """Say so when a bucket made by someone else keeps objects for less than ``ttl``."""
        try:
            info = await asyncio.wait_for(js.stream_info(f"OBJ_{self.bucket}"), self.timeout)
        except (NatsError, asyncio.TimeoutError, OSError):
            return  # the put will tell
        kept = info.config.max_age or None  # seconds; 0: until deleted
        if kept is not None and (self.ttl is None or kept < self.ttl):
            log.warning(
                "object store %r keeps objects %.0fs, less than this ClaimCheck's ttl (%s): "
                "messages that wait longer will find their body gone",
                self.bucket, kept, "none" if self.ttl is None else f"{self.ttl:.0f}s",
            )  # fmt: skip

    async def _open(self, js: JetStreamContext, client: Client) -> ObjectStore:
        try:
            store = await asyncio.wait_for(js.object_store(self.bucket), self.timeout)
        except BucketNotFoundError:
            pass
        else:
            await self._check_ttl(js)
            return store
        clustered = bool((getattr(client, "_server_info", None) or {}).get("cluster"))
        counts = [self.replicas] if self.replicas else [3, 1] if clustered else [1]
        last: BaseException | None = None
        for count in counts:
            config = ObjectStoreConfig(
                description="natsmw: message bodies sent by reference (claim checks)",
                ttl=self.ttl,
                replicas=count,
            )
            try:
                return await asyncio.wait_for(
                    js.create_object_store(self.bucket, config=config), self.timeout
                )
            except (NatsError, asyncio.TimeoutError, OSError) as error:
                last = error
                if count == 3 and len(counts) > 1:
                    log.warning(
                        "could not create object store %r with 3 replicas (%r); creating it "
                        "with 1: bodies sent by reference will not survive the loss of its "
                        "server", self.bucket, error,
                    )  # fmt: skip
        # Made by another publisher meanwhile, with another configuration: use it.
        try:
            return await asyncio.wait_for(js.object_store(self.bucket), self.timeout)
        except BucketNotFoundError:
            assert last is not None
            raise last from None


def _same_digest(one: str, other: str) -> bool:
    """``SHA-256=<base64>`` digests: the algorithm's name in any case, the value exactly."""
    name, _, value = one.partition("=")
    other_name, _, other_value = other.partition("=")
    return name.lower() == other_name.lower() and value == other_value


class _ClaimError(Exception):
    def __init__(self, limit: str, detail: str) -> None:
        super().__init__(detail)
        self.limit = limit


def with_claim_check(
    *,
    max_size: int = 64 << 20,
    on_error: ClaimErrorAction = "nak",
    nak_delay: Duration = 30.0,
    dead_letter_subject: str = "natsmw.dead_letter.{stream}",
    timeout: Duration = 60.0,
) -> ClaimResolver:
    """Give handlers the whole body of messages sent by reference (a ``Natsmw-Claim`` header).

    Before the handler runs, the object is read from its bucket, checked against the claim's
    size and digest, and put in ``msg.data`` (the header stays). Messages without the header
    pass at the cost of one header lookup. Put it inside a delay cap, so that held deliveries
    read nothing: ``compose(with_size_limit(...), with_delay_cap(60), with_claim_check())``.

    A body is never handed over wrong, and the message is never acked unseen:

    * a claim over ``max_size`` bytes, a missing object (deleted, or past its bucket's
      ``ttl``), a digest or size that does not match, or an unreadable header: logged as an
      error, and the message is naked (``on_error="nak"``: it comes back after ``nak_delay``,
      and waits an hour before its last allowed delivery, as the size guard does) or copied to
      ``dead_letter_subject`` and then terminated (``"dead_letter"``);
    * the object store unreachable or too slow (``timeout``): the message is naked, whatever
      ``on_error`` says.

    Args:
        max_size: the largest body read, in bytes.
        on_error: what becomes of a message whose body cannot be had.
        nak_delay: the delay of those naks (seconds or ``timedelta``).
        dead_letter_subject: as in [`with_size_limit`][natsmw.with_size_limit].
        timeout: the longest a read may take.

    Raises:
        ValueError: a negative ``max_size``, an unknown ``on_error``, a bad placeholder.
        TypeError: ``max_size`` not an ``int``, or a bad duration.
    """
    return ClaimResolver(
        max_size=max_size,
        on_error=on_error,
        nak_delay=nak_delay,
        dead_letter_subject=dead_letter_subject,
        timeout=timeout,
    )


class ClaimResolver(Decorator):
    """The claim-check middleware; build it with [`with_claim_check`][with_claim_check]."""

    def __init__(
        self,
        *,
        max_size: int,
        on_error: ClaimErrorAction,
        nak_delay: Duration,
        dead_letter_subject: str,
        timeout: Duration,
    ) -> None:
        if isinstance(max_size, bool) or not isinstance(max_size, int):
            raise TypeError(f"max_size must be a number of bytes (int), got {max_size!r}")
        if max_size < 0:
            raise ValueError(f"max_size must be zero or more, got {max_size!r}")
        if on_error not in _ACTIONS:
            raise ValueError(f"on_error must be one of {_ACTIONS}, got {on_error!r}")
        # The size guard's ways of keeping a message (the nak that spares the last delivery,
        # the dead-letter copy) serve here as they are.
        self._keeper = SizeGuard(
            max_body=max_size,
            max_header_bytes=None,
            max_headers=None,
            on_oversize=on_error,
            dead_letter_subject=dead_letter_subject,
            nak_delay=nak_delay,
        )
        self.max_size = max_size
        self.on_error = on_error
        self.timeout = to_positive_seconds(timeout, "timeout")
        self._stores: weakref.WeakKeyDictionary[Client, dict[str, ObjectStore]] = (
            weakref.WeakKeyDictionary()
        )
        self._errors = Throttled(log)

    def __repr__(self) -> str:
        return f"with_claim_check(max_size={self.max_size}, on_error={self.on_error!r})"

    def _wrap(self, handler: Handler) -> Handler:
        if capped_by(handler) is not None:
            log.warning(
                "with_claim_check() wraps a handler that is already delay-capped: it reads "
                "every body again on each held delivery. Put it inside the cap: "
                "compose(..., with_delay_cap(...), with_claim_check())"
            )
        return layer(self._step)(handler)

    def _step(self, msg: MessageProxy, call_next: Handler) -> Awaitable[None]:
        value = peek_header(msg.__wrapped__, CLAIM_HEADER)
        if value is None:
            return call_next(msg)
        return self._resolve(msg, value, call_next)

    async def _resolve(self, msg: MessageProxy, value: str, call_next: Handler) -> None:
        started = time.monotonic()
        size = 0
        try:
            claim = Claim.from_header(value)
            size = claim.size
            if claim.size > self.max_size:
                raise _ClaimError("claim_size", f"{claim.size} bytes, over {self.max_size}")
            async with self._reading(msg.__wrapped__._client):
                data = await asyncio.wait_for(self._read(msg, claim), self.timeout)
        except ValueError as error:
            await self._refuse(msg, _ClaimError("claim_invalid", str(error)), size)
            return
        except _ClaimError as error:
            await self._refuse(msg, error, size, keep=error.limit == "claim_unreachable")
            return
        except (NatsError, asyncio.TimeoutError, OSError) as error:
            refused = _ClaimError(
                "claim_unreachable", f"the object store did not answer: {error!r}"
            )
            await self._refuse(msg, refused, size, keep=True)
            return
        # The proxy shares the message's fields: both see the body. What came on the wire
        # (the reference) is kept for a parked copy, which must not carry the body.
        setattr(msg, WIRE_BODY, msg.data)
        msg.data = data
        msg.report(
            "natsmw.claim.fetched",
            {"natsmw.claim.bucket": claim.bucket, "natsmw.claim.size": len(data),
             "natsmw.claim.duration": round(time.monotonic() - started, 6)},
        )  # fmt: skip
        await call_next(msg)

    def _reading(self, client: Client) -> asyncio.Semaphore:
        """What lets at most ``_READS_AT_ONCE`` reads run on ``client`` at a time (all
        claim checks together: they share its connection)."""
        reading = _READERS.get(client)
        if reading is None:
            reading = _READERS[client] = asyncio.Semaphore(_READS_AT_ONCE)
        return reading

    async def _read(self, msg: MessageProxy, claim: Claim) -> bytes:
        client: Client = msg.__wrapped__._client
        stores = self._stores.get(client)
        if stores is None:
            stores = self._stores[client] = {}
        store = stores.get(claim.bucket)
        if store is None:
            try:
                store = await client.jetstream().object_store(claim.bucket)
            except BucketNotFoundError:
                raise _ClaimError("claim_missing", f"no object store {claim.bucket!r}") from None
            stores[claim.bucket] = store
        try:
            info = await store.get_info(claim.name)
        except BadObjectMetaError:
            raise _ClaimError(
                "claim_corrupt", f"object {claim.name!r} in {claim.bucket!r}: unreadable record"
            ) from None
        except (ObjectNotFoundError, NotFoundError):
            raise _ClaimError(
                "claim_missing",
                f"no object {claim.name!r} in {claim.bucket!r} (deleted, or past the bucket's ttl)",
            ) from None
        if not _same_digest(info.digest or "", claim.digest) or info.size != claim.size:
            raise _ClaimError(
                "claim_corrupt",
                f"object {claim.name!r} in {claim.bucket!r} is {info.size} bytes with digest "
                f"{info.digest}, the claim says {claim.size} bytes with {claim.digest} "
                f"(replaced since)",
            )
        # Read with batched direct gets (object store streams allow them), a few MiB per
        # request, rather than through ObjectStore.get: its ordered consumer waits up to
        # 0.25 s for each of nats-py's flow-control answers (530 ms for 10 MiB, measured),
        # and a read cut short (a timeout) leaves no subscription behind filling with the
        # rest of the chunks. The digest is checked against the claim itself.
        chunks: list[bytes] = []
        if claim.size:
            got = 0
            digest = hashlib.sha256()
            subject = OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=claim.bucket, obj=info.nuid)
            try:
                async for chunk in ops._scan(
                    client, f"OBJ_{claim.bucket}", subject, max_bytes=_BYTES_PER_REQUEST
                ):
                    got += len(chunk.data)
                    if got > claim.size:
                        break
                    digest.update(chunk.data)
                    chunks.append(chunk.data)
                    if got == claim.size:
                        break
            except ops.OpsError as error:
                raise _ClaimError("claim_unreachable", str(error)) from None
            if got < claim.size:
                # Chunks gone while read (the object replaced or deleted since its record was
                # read), or a replica behind: read again later, when the record tells.
                raise _ClaimError(
                    "claim_unreachable",
                    f"object {claim.name!r} in {claim.bucket!r}: {got} of {claim.size} bytes found",
                )
            read = "SHA-256=" + base64.urlsafe_b64encode(digest.digest()).decode()
            if got != claim.size or not _same_digest(read, claim.digest):
                raise _ClaimError(
                    "claim_corrupt",
                    f"object {claim.name!r} in {claim.bucket!r}: read {got} bytes with "
                    f"digest {read}, the claim says {claim.size} bytes with {claim.digest}",
                )
        return b"".join(chunks)

    @property
    def stats(self) -> SizeGuardStats:
        """The messages whose body could not be had (successful reads are not counted):
        ``rejected`` in all, ``naked``, ``dead_lettered``, ``stranded``, as a size guard
        counts them."""
        return self._keeper.stats

    async def _refuse(
        self, msg: MessageProxy, error: _ClaimError, size: int, *, keep: bool = False
    ) -> None:
        kept = "naked" if keep or self.on_error == "nak" else "copied to the dead letters"
        if not msg.is_jetstream:
            kept = "dropped: a core NATS message cannot be kept"
        self._errors.error(
            error.limit, "cannot give %s its body (%s): %s; the message is %s",
            msg.subject, error.limit, error, kept,
        )  # fmt: skip
        rejection = Rejection(error.limit, size, self.max_size)  # type: ignore[arg-type]
        if keep and msg.is_jetstream:
            await self._keeper._keep(msg, rejection, "naked")
        else:
            await self._keeper._reject(msg, rejection)
