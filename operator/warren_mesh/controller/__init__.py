"""The Kubernetes operator: custom resources <-> mesh records in etcd (kopf handlers, one sync loop per Mesh)."""
