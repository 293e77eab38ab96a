"""balancer:// groups: members and their status, the lbmethods, sticky routes."""

from .group import Balancer, Member

__all__ = ["Balancer", "Member"]
