"""Deliver one message now, without a spool: what ``mta-client send`` does.

For each recipient domain: resolve its MX hosts, pick an egress source from
the pool (weighted, in the MX address's family), open a connection through
kumoproxy (or directly), speak SMTP, and report one outcome per recipient.

Failures are sorted the way an MTA must sort them:

* the *source* failed (the proxy says it is not plumbed or not allowed):
  try another source of the same family; the destination is not to blame;
* the *destination* or the *proxy* could not be reached, or the SMTP session
  broke before any answer: try the next MX host (RFC 5321 §5.1);
* the server answered: its reply decides (2xx delivered, 4xx deferred, 5xx
  bounced), per recipient.
"""

from __future__ import annotations

import random
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

import trio

from kumoproxy.proto.common import format_endpoint
from mta_client.config import ClientConfig, PoolEntry
from mta_client.egress import EgressPath, ProxyAuthError, open_egress
from mta_client.errors import (
    ConnectionLostError,
    EgressError,
    SmtpError,
    SmtpReply,
    SmtpTimeoutError,
    SourceRefusedError,
)
from mta_client.mx import Destination, MxCandidate, MxError, MxPermanentError, MxResolver
from mta_client.smtp_session import Envelope, SmtpSession, TlsMode

#: How long opening one egress connection (proxy handshake included) may take.
CONNECT_TIMEOUT = 30.0

#: What sends us to the next MX host: the path or the session broke before
#: the server could answer for the recipients.
_DESTINATION_FAILURES = (EgressError, ConnectionLostError, SmtpTimeoutError, trio.TooSlowError)

#: ``smtp.timeouts`` keys -> the session's names for them.
_TIMEOUT_NAMES = {
    "greeting": "greeting",
    "mail": "MAIL",
    "rcpt": "RCPT",
    "data": "DATA",
    "data_end": "DATA-END",
    "data_block": "data-block",
}


@dataclass(frozen=True, slots=True)
class RecipientOutcome:
    """One line of ``mta-client send`` output."""

    recipient: str
    status: str  # delivered | deferred | bounced
    code: int
    enhanced: str | None
    text: str
    source: str | None  # ip:port actually used
    mx: str | None

    def as_json(self) -> dict[str, object]:
        return {
            "recipient": self.recipient,
            "status": self.status,
            "code": self.code,
            "enhanced": self.enhanced,
            "text": self.text,
            "source": self.source,
            "mx": self.mx,
        }


def _synthetic(
    recipients: Sequence[str], status: str, code: int, enhanced: str, text: str, mx: str | None
) -> list[RecipientOutcome]:
    return [RecipientOutcome(r, status, code, enhanced, text, None, mx) for r in recipients]


def _domain(address: str) -> str:
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        raise ValueError(f"not an address: {address!r}")
    return domain.lower().rstrip(".")


def egress_path(entry: PoolEntry) -> EgressPath:
    """How to reach destinations from a pool entry's source."""
    return EgressPath(
        source=entry.source,
        proxy=(str(entry.proxy[0]), entry.proxy[1]) if entry.proxy is not None else None,
        protocol=entry.protocol,
        username=entry.username,
        password=entry.password,
    )


def smtp_timeouts(configured: dict[str, float]) -> dict[str, float]:
    """``smtp.timeouts`` from the config, under the names SmtpSession uses."""
    return {_TIMEOUT_NAMES[key]: seconds for key, seconds in configured.items()}


def tls_context() -> ssl.SSLContext:
    """MTA-to-MTA TLS encrypts without verifying (RFC 7435): MX certificates often
    do not match, and a verified-only policy (DANE, MTA-STS) is not implemented."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class Sender:
    """Delivers envelopes once, through the configured egress pool."""

    def __init__(
        self,
        config: ClientConfig,
        *,
        resolver: MxResolver | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.rng = rng or random.Random()  # noqa: S311 (load spreading, not secrecy)
        self.resolver = resolver or MxResolver(
            nameservers=config.dns.nameservers or None,
            routes=config.dns.routes,
            port=config.smtp.port,
            rng=self.rng,
        )
        self._tls_context = tls_context()
        self._timeouts = smtp_timeouts(config.smtp.timeouts)

    async def send(
        self,
        sender: str,
        recipients: Sequence[str],
        message: bytes,
        *,
        source: PoolEntry | None = None,
    ) -> list[RecipientOutcome]:
        """Deliver to every recipient; one outcome each, in the order given."""
        by_domain: dict[str, list[str]] = {}
        for recipient in recipients:
            by_domain.setdefault(_domain(recipient), []).append(recipient)
        outcomes: dict[str, RecipientOutcome] = {}
        for domain, group in by_domain.items():
            for outcome in await self._send_domain(domain, sender, group, message, source):
                outcomes[outcome.recipient] = outcome
        return [outcomes[r] for r in recipients]

    async def _send_domain(
        self,
        domain: str,
        sender: str,
        recipients: list[str],
        message: bytes,
        source: PoolEntry | None,
    ) -> list[RecipientOutcome]:
        entries = [source] if source is not None else list(self.config.pool)
        families = frozenset(e.source.version for e in entries)
        try:
            destination = await self.resolver.resolve(domain, families=families)
        except MxPermanentError as exc:
            return _synthetic(recipients, "bounced", 550, "5.1.2", str(exc), None)
        except MxError as exc:
            return _synthetic(recipients, "deferred", 451, "4.4.3", str(exc), None)
        return await self._try_candidates(destination, entries, sender, recipients, message)

    async def _try_candidates(
        self,
        destination: Destination,
        entries: list[PoolEntry],
        sender: str,
        recipients: list[str],
        message: bytes,
    ) -> list[RecipientOutcome]:
        last = f"no MX host of {destination.domain} could be reached"
        last_mx: str | None = None
        refused_sources: set[PoolEntry] = set()
        for candidate in destination.candidates:
            last_mx = candidate.host
            while True:
                usable = [
                    e
                    for e in entries
                    if e.source.version == candidate.address.version and e not in refused_sources
                ]
                if not usable:
                    break
                entry = self.rng.choices(usable, weights=[e.weight for e in usable])[0]
                try:
                    return await self._deliver_via(entry, candidate, sender, recipients, message)
                except SourceRefusedError as exc:
                    refused_sources.add(entry)  # this source is the problem: try another
                    last = f"source {entry.source} refused by the proxy: {exc}"
                except ProxyAuthError as exc:
                    refused_sources.add(entry)
                    last = f"proxy refused the credentials of source {entry.source}: {exc}"
                except (
                    EgressError,
                    ConnectionLostError,
                    SmtpTimeoutError,
                    trio.TooSlowError,
                ) as exc:
                    last = f"{candidate.host} [{candidate.address}]: {exc or type(exc).__name__}"
                    break  # the destination side failed: next MX host
        return _synthetic(recipients, "deferred", 451, "4.4.1", last, last_mx)

    async def _deliver_via(
        self,
        entry: PoolEntry,
        candidate: MxCandidate,
        sender: str,
        recipients: list[str],
        message: bytes,
    ) -> list[RecipientOutcome]:
        with trio.fail_after(CONNECT_TIMEOUT):
            connection = await open_egress(egress_path(entry), (candidate.address, candidate.port))
        local_ip, local_port = connection.local
        used = format_endpoint(local_ip, local_port)
        try:
            session = await SmtpSession.start(
                connection.stream,
                ehlo=entry.ehlo,
                tls=TlsMode(self.config.smtp.tls),
                tls_context=self._tls_context,
                timeouts=self._timeouts,
            )
        except SmtpError as exc:  # greeting or EHLO refused: the server spoke for all
            return [_from_reply(r, exc.reply, used, candidate.host) for r in recipients]
        async with session:
            result = await session.deliver(Envelope(sender, tuple(recipients), message))
            with trio.move_on_after(10):
                await session.quit()
        return [
            RecipientOutcome(
                r.recipient,
                r.status,
                r.reply.code,
                r.reply.enhanced,
                r.reply.text,
                used,
                candidate.host,
            )
            for r in result.recipients
        ]


def _from_reply(recipient: str, reply: SmtpReply, source: str, mx: str) -> RecipientOutcome:
    status = "bounced" if reply.is_permanent else "deferred"
    return RecipientOutcome(recipient, status, reply.code, reply.enhanced, reply.text, source, mx)


def exit_status(outcomes: Sequence[RecipientOutcome]) -> int:
    """0: all delivered; 75 (EX_TEMPFAIL): some deferred, none bounced; 1: any bounced."""
    statuses = {o.status for o in outcomes}
    if statuses <= {"delivered"}:
        return 0
    if "bounced" in statuses:
        return 1
    return 75
