"""Live state built from the frozen config: one owner, reached by name.

state.Runtime owns balancers and members (admin and health state, changed only
through Runtime.apply); routes.RouteRuntime owns per-route facts and counters;
counters holds the plain counters the request path bumps.
"""

from .counters import ListenerCounters, RouteCounters
from .routes import RouteRuntime
from .state import Change, Edit, Invalid, Runtime

__all__ = ["Change", "Edit", "Invalid", "ListenerCounters", "RouteCounters",
           "RouteRuntime", "Runtime"]
