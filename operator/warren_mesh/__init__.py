"""warren-mesh: Warren's encrypted WireGuard overlay, driven by etcd leases and watches."""

__version__ = "0.1.0"
