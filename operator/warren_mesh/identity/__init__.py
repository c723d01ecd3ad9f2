"""This node's identity: its WireGuard key, the mesh's certificates, the etcd client's TLS credentials."""
