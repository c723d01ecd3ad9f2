"""The test cluster's DNS records (hack/k8s_dns.py): the names CoreDNS's kubernetes plugin would answer."""

from __future__ import annotations

from typing import Any

from k8s_dns import records


def _service(name: str, cluster_ip: str, **spec: Any) -> dict[str, Any]:
    return {"metadata": {"namespace": "wm", "name": name}, "spec": {"clusterIP": cluster_ip, **spec}}


def test_services_headless_endpoints_and_statefulset_hostnames() -> None:
    services = {
        "items": [
            _service("enroller", "10.0.0.9"),
            _service("etcd", "None", publishNotReadyAddresses=True),
            _service("metrics", "None"),
        ]
    }
    endpoints = {
        "items": [
            {
                "metadata": {"namespace": "wm", "name": "etcd"},
                "subsets": [
                    {
                        "addresses": [{"ip": "10.213.0.11", "hostname": "etcd-0"}],
                        "notReadyAddresses": [{"ip": "10.213.0.12", "hostname": "etcd-1"}],
                    }
                ],
            },
            {
                "metadata": {"namespace": "wm", "name": "metrics"},
                "subsets": [{"addresses": [{"ip": "10.213.0.11"}], "notReadyAddresses": [{"ip": "10.213.0.13"}]}],
            },
        ]
    }
    assert records(services, endpoints) == [
        ("10.0.0.9", "enroller.wm.svc.cluster.local"),
        ("10.213.0.11", "etcd-0.etcd.wm.svc.cluster.local"),
        ("10.213.0.11", "etcd.wm.svc.cluster.local"),
        ("10.213.0.11", "metrics.wm.svc.cluster.local"),  # not ready and not published: left out
        ("10.213.0.12", "etcd-1.etcd.wm.svc.cluster.local"),  # members find each other before they are ready
        ("10.213.0.12", "etcd.wm.svc.cluster.local"),
    ]
