"""The "Cluster" section of the balancer-manager and server-status pages: this node,
the nodes whose heartbeats are in Redis (a config digest other than this node's is
flagged), and where the last change applied came from."""

from __future__ import annotations

import time

from twisted.web.template import tags


def cluster_html(sync) -> list:
    s = sync.summary()
    state = "connected" if s["connected"] else ("OFF: " + s["error"] if s["error"]
                                                else "NOT connected (serving with its own "
                                                     "state; reconnecting)")
    facts = tags.dl(
        tags.dt(f"Cluster {s['name']}, this node {s['node']}: Redis {s['redis']} {state}"),
        "\n", tags.dt(f"State version {s['version']}, config digest {s['digest']}"
                      + (f", {s['pending']} change(s) not yet shared" if s["pending"] else "")
                      + (f", {s['dropped']} offline change(s) replaced by the cluster's"
                         if s["dropped"] else "")),
        "\n", tags.dt("Last change: " + origin_text(s["last_change"])),
        "\n", tags.dt("Health checks: " + (", ".join(
            f"balancer://{b} by {h}" for b, h in s["health_checkers"].items())
            or "no checker yet") + " (share_health)" if s["share_health"] else
            "Health checks: each node its own"))
    head = tags.tr(*(tags.th(t) for t in ("Node", "Config digest", "Version", "Pid",
                                         "Seen (s ago)")))
    rows = [head]
    for n in s["nodes"]:
        digest = n["digest"] or "?"
        if not n["same_config"]:
            digest += " (DIFFERS from this node's)"
        rows.append(tags.tr(tags.td(n["node"] + (" (this node)" if n["self"] else "")),
                            tags.td(digest), tags.td(str(n["version"])),
                            tags.td(str(n["pid"])), tags.td(f"{n['seen']:g}")))
    out = [tags.h2("Cluster"), "\n", facts, "\n", tags.table(*rows, border="0"), "\n"]
    if s["changes"]:
        changes = [tags.tr(*(tags.th(t) for t in ("Version", "From node", "Source", "Who",
                                                 "At (UTC)", "Change")))]
        for c in s["changes"]:
            changes.append(tags.tr(tags.td(str(c.get("version"))), tags.td(c.get("node", "?")),
                                   tags.td(c.get("source", "?")), tags.td(c.get("who") or "-"),
                                   tags.td(time.strftime("%H:%M:%S",
                                                         time.gmtime(c.get("at") or 0))),
                                   tags.td(c.get("what", ""))))
        out += [tags.h3("Recent changes"), "\n", tags.table(*changes, border="0"), "\n"]
    return out + [tags.hr(), "\n"]


def origin_text(o) -> str:
    if not o:
        return "none applied yet"
    at = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(o.get("at") or 0))
    return (f"version {o.get('version')} from node {o.get('node', '?')} "
            f"({o.get('source', '?')}, {o.get('who') or '-'}) at {at} UTC")


def cluster_auto(sync) -> list[str]:
    s = sync.summary()
    lines = [f"ClusterName: {s['name']}", f"ClusterNode: {s['node']}",
             f"ClusterConnected: {1 if s['connected'] else 0}",
             f"ClusterNodes: {len(s['nodes'])}",
             f"ClusterNodesOtherConfig: {sum(1 for n in s['nodes'] if not n['same_config'])}",
             f"ClusterVersion: {s['version']}", f"ClusterDigest: {s['digest']}",
             f"ClusterPending: {s['pending']}"]
    lines.append(f"ClusterShareHealth: {1 if s['share_health'] else 0}")
    for b, h in s["health_checkers"].items():
        lines.append(f"ClusterHealthChecker: {b} {h}")
    o = s["last_change"]
    if o:
        lines.append(f"ClusterLastChange: {o.get('version')} {o.get('node', '?')} "
                     f"{o.get('source', '?')}")
    return lines
