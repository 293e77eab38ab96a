"""The admin side: HTTP pages that read the runtime and submit changes to it.

Owns the admin listener and the rules for every admin page (site.py: allowed
networks, Basic auth, TLS, Host/Origin checks, vhost routes with a `handler`), the
balancer-manager (manager.py: Apache's page, its form fields, XML and JSON) and the
state file that keeps manager changes across restarts (persist.py). server-status
(status.py) and /metrics (metrics.py) are mounted by site.py. Built on twisted.web,
off the request path: nothing here runs per proxied request.
"""
