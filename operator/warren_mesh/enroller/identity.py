"""Which node a service-account token speaks for, as the API server vouches: the rules of the enroller."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from warren_mesh.trust.fields import validate_name
from warren_mesh.trust.reasons import RecordError
from warren_mesh.trust.text import printable

POD_NAME = "authentication.kubernetes.io/pod-name"
POD_UID = "authentication.kubernetes.io/pod-uid"


class KubeReader(Protocol):
    async def review_token(self, token: str, audiences: list[str]) -> dict[str, Any]: ...

    async def get_core(self, path: str) -> dict[str, Any] | None: ...


class Refused(Exception):
    """The token does not entitle its bearer to a node certificate; ``status`` is the HTTP answer."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


@dataclass(frozen=True, slots=True)
class AgentIdentity:
    """What an agent's token must be: of this service account, in this namespace, for this audience."""

    namespace: str = "warren-mesh"
    service_account: str = "warren-mesh-agent"
    audience: str = "warren-mesh"

    @property
    def username(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.service_account}"


def _first(extra: dict[str, Any], key: str) -> str | None:
    values = extra.get(key)
    return str(values[0]) if isinstance(values, list) and values else None


async def node_of(kube: KubeReader, token: str, identity: AgentIdentity) -> tuple[str, str]:
    """(node name, pod name) for a token of an agent pod that runs on that node now; else Refused."""
    status = await kube.review_token(token, [identity.audience])
    if not status.get("authenticated"):
        raise Refused(401, f"the API server did not accept the token: {printable(str(status.get('error') or ''))}")
    audiences = status.get("audiences")
    if isinstance(audiences, list) and identity.audience not in audiences:
        raise Refused(401, f"the token is not for the audience {identity.audience!r}")
    user = status.get("user") or {}
    username = str(user.get("username", ""))
    if username != identity.username:
        raise Refused(403, f"the token is {printable(username)}'s, not the agent's ({identity.username})")
    extra = user.get("extra") or {}
    pod_name, pod_uid = _first(extra, POD_NAME), _first(extra, POD_UID)
    if pod_name is None or pod_uid is None:
        raise Refused(403, "the token is not bound to a pod: use the pod's projected service-account token")
    pod = await kube.get_core(f"namespaces/{identity.namespace}/pods/{pod_name}")
    metadata = (pod or {}).get("metadata") or {}
    if pod is None or metadata.get("uid") != pod_uid:
        raise Refused(403, f"pod {printable(pod_name)} the token is bound to no longer exists")
    if metadata.get("deletionTimestamp"):
        raise Refused(403, f"pod {printable(pod_name)} is being deleted")
    spec = pod.get("spec") or {}
    if spec.get("serviceAccountName") != identity.service_account:
        raise Refused(403, f"pod {printable(pod_name)} does not run as {identity.service_account}")
    node = str(spec.get("nodeName") or "")
    if not node:
        raise Refused(403, f"pod {printable(pod_name)} is not scheduled to a node yet")
    try:
        validate_name(node)
    except RecordError:
        raise Refused(403, f"node name {printable(node)} is not one a mesh node can have") from None
    if await kube.get_core(f"nodes/{node}") is None:
        raise Refused(403, f"pod {printable(pod_name)} names node {node}, which does not exist")
    return node, pod_name
