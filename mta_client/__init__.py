"""mta_client: deliver mail through a kumoproxy pool from a chosen egress IP.

A sans-IO SMTP client (:mod:`mta_client.proto.smtp`) with a thin trio shell,
egress through kumoproxy over SOCKS5 or the PROXY protocol, and MX
resolution with per-destination *site* names for traffic shaping.
"""

__version__ = "0.1.0"
