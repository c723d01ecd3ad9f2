"""Why a value read from etcd was refused: the error every failed check raises, and the reasons it is counted under
(the label values of the rejected and conflicting records metrics).
"""

from __future__ import annotations

from typing import Final


class RecordError(ValueError):
    """A record that cannot be used, with the reason it is counted under."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# The reasons a record is rejected; each is a label value of warren_mesh_rejected_records_total.
REASON_INVALID_JSON: Final = "invalid_json"


REASON_TOO_LARGE: Final = "too_large"


REASON_INVALID_KEY: Final = "invalid_key"


REASON_SCHEMA_VERSION: Final = "schema_version"


REASON_INVALID_FIELD: Final = "invalid_field"


REASON_NAME_MISMATCH: Final = "name_mismatch"


REASON_INVALID_PUBLIC_KEY: Final = "invalid_public_key"


REASON_INVALID_ENDPOINT: Final = "invalid_endpoint"


REASON_INVALID_CIDR: Final = "invalid_cidr"


REASON_FORBIDDEN_NETWORK: Final = "forbidden_network"


REASON_INVALID_CONFIG: Final = "invalid_config"


REASON_UNEXPECTED: Final = "unexpected_error"  # a bug of ours, contained to the record that hit it


# A claim of a node that already holds an older one of the same kind (and family): it takes nothing, and its owner
# (or the operator) removes it. One node cannot exhaust the mesh's addresses or pod subnets by claiming them all.
REASON_SURPLUS_CLAIM: Final = "surplus_claim"


# Reasons a record that decodes fine is left out because of what it claims next to the config, the reservations
# and the records before it (topology decides).
REASON_ADDRESS_OUTSIDE_CIDR: Final = "address_outside_cidr"


REASON_ADDRESS_TAKEN: Final = "address_taken"


REASON_DUPLICATE_PUBLIC_KEY: Final = "duplicate_public_key"


REASON_OVERLAPPING_ALLOWED_IPS: Final = "overlapping_allowed_ips"


REASON_NETWORK_NOT_OWNED: Final = "network_not_owned"  # a network the mesh never gave this record


REASON_UNSAFE_ROUTE: Final = "unsafe_route"  # would route this node's underlay or etcd into the tunnel


CONFLICT_REASONS: Final = (
    REASON_ADDRESS_OUTSIDE_CIDR,
    REASON_ADDRESS_TAKEN,
    REASON_DUPLICATE_PUBLIC_KEY,
    REASON_OVERLAPPING_ALLOWED_IPS,
    REASON_NETWORK_NOT_OWNED,
    REASON_UNSAFE_ROUTE,
)


# Reasons a record cannot be used at all (the view decides); metrics start every one at 0 so that increase()
# sees the first rejection.
REJECTION_REASONS: Final = (
    REASON_INVALID_JSON,
    REASON_TOO_LARGE,
    REASON_INVALID_KEY,
    REASON_SCHEMA_VERSION,
    REASON_INVALID_FIELD,
    REASON_NAME_MISMATCH,
    REASON_INVALID_PUBLIC_KEY,
    REASON_INVALID_ENDPOINT,
    REASON_INVALID_CIDR,
    REASON_FORBIDDEN_NETWORK,
    REASON_INVALID_CONFIG,
    REASON_UNEXPECTED,
    REASON_SURPLUS_CLAIM,
)
