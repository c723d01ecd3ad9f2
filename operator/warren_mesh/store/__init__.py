"""The mesh's store (etcd, and a memory store for tests of the logic above it).

gRPC and protobuf read process-wide settings once, when first imported, and any module of this package may import
them (directly, or through the etcd3 package, whose ``__init__`` imports gRPC): so the package applies them before
any of its modules is loaded. A module that imported ``etcd3`` before the settings let gRPC's fork handlers crash
about one child in thirty started while TLS calls were in flight (tests/integration/test_store.py)."""

from warren_mesh.store import runtime

runtime.prepare()
