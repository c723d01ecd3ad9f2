"""Values every layer shares: addresses, the key layout in etcd, device specs, watch results, routes."""
