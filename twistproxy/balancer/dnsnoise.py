"""The log lines twisted.names' per-query UDP ports write, and the filter that drops them.

Apart from discovery.py so that setting up the log (cli, the Windows service) does not
import twisted.names, which only a balancer with members_from needs.
"""

from __future__ import annotations


_PORT_NOISE = ("DNSDatagramProtocol starting on ", "(UDP Port ",
               "Starting protocol <twisted.names.dns.DNSDatagramProtocol",
               "Stopping protocol <twisted.names.dns.DNSDatagramProtocol")


def quiet_dns_ports(event) -> "object":
    """A twisted.logger filter predicate: the lines Twisted's UDP port logs for each
    DNS query ("... starting on", "(UDP Port N Closed)") are dropped, the rest is
    left to the next predicate."""
    from twisted.logger import PredicateResult
    text = event.get("log_text")
    if text is None and event.get("message"):
        text = " ".join(str(m) for m in event["message"])
    if text and text.startswith(_PORT_NOISE):
        return PredicateResult.no
    return PredicateResult.maybe
