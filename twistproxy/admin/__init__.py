"""The admin listener's resources: server-status, metrics, balancer-manager."""
