"""Node identity in Kubernetes: each agent pod gets an etcd client certificate for its own node, and no other.

The enroller (``warren-mesh enroller``, a Deployment of its own) holds the mesh's CA key and etcd's root
credential; nothing else in the cluster does. An agent (``warren-mesh enroll``, the DaemonSet's init container)
makes its key on the node, and sends a certificate request with its pod's projected service-account token. The
enroller has the API server review the token (TokenReview, audience ``warren-mesh``), finds the pod the token is
bound to, and signs a certificate for the node that pod is scheduled to (CN ``node-NAME``), creating that node's
etcd user and role. The node is never taken from the request. docs/security.md has the design and its limits.
"""

from __future__ import annotations

from typing import Final

PATH: Final = "/v1/node-certificate"
MAX_REQUEST_BYTES: Final = 16 * 1024
