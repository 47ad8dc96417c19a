"""kumoproxy: an egress proxy for email.

MTAs connect over SOCKS5 or the HAProxy PROXY protocol; kumoproxy binds each
outbound connection to the source IP they ask for and relays the bytes.
"""

__version__ = "0.1.0"
