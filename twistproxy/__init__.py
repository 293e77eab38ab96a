"""twistproxy: an edge proxy on Twisted that can take Apache mod_proxy's place."""

__version__ = "0.1.0"
