"""TLS for socks5 listeners: the server context, loaded once with clear errors.

With ``client_ca`` set, clients must present a certificate signed by it
(mutual TLS): the certificate is then the credential, and a client without
one never reaches the SOCKS5 negotiation.
"""

from __future__ import annotations

import ssl

from kumoproxy.config import TlsConfig
from kumoproxy.errors import KumoproxyError


class TlsSetupError(KumoproxyError):
    """A certificate, key or CA file could not be loaded."""


def server_context(tls: TlsConfig) -> ssl.SSLContext:
    """An SSLContext for the server side of a listener (TLS 1.2 or newer)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(tls.certificate, tls.private_key)
    except (OSError, ssl.SSLError) as exc:
        raise TlsSetupError(
            f"cannot load certificate {tls.certificate} with key {tls.private_key}: {_reason(exc)}"
        ) from exc
    if tls.client_ca is not None:
        try:
            context.load_verify_locations(cafile=tls.client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise TlsSetupError(f"cannot load client_ca {tls.client_ca}: {_reason(exc)}") from exc
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _reason(exc: OSError | ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    return exc.strerror or str(exc)
