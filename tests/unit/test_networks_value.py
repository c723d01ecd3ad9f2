"""Networks (values/networks.py): a sorted sequence that shares what a change leaves, and behaves as its tuple."""

from __future__ import annotations

import bisect
import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from warren_mesh.values.device import PeerSpec
from warren_mesh.values.networks import CHUNK, EMPTY, Networks

# Few distinct texts, so that duplicates and equal heads of chunks come up.
TEXTS = st.sampled_from([f"10.{i // 256}.{i % 256}.0/24" for i in range(300)])
STEPS = st.lists(st.tuples(st.booleans(), TEXTS), max_size=600)


@settings(max_examples=60, deadline=None)
@given(start=st.lists(TEXTS, max_size=400), steps=STEPS)
def test_adding_and_removing_give_what_a_sorted_list_gives(start: list[str], steps: list[tuple[bool, str]]) -> None:
    networks, model = Networks(start), sorted(start)
    for add, text in steps:
        if add:
            networks = networks.adding(text)
            bisect.insort(model, text)
        elif text in model:
            assert text in networks
            networks = networks.removing(text)
            del model[bisect.bisect_left(model, text)]
        else:
            assert text not in networks
            with pytest.raises(ValueError, match="not among"):
                networks.removing(text)
        assert len(networks) == len(model)
    assert list(networks) == model
    assert networks == tuple(model) and tuple(model) == networks
    assert hash(networks) == hash(tuple(model))
    assert [networks[i] for i in range(len(model))] == model
    assert [networks[-i] for i in range(1, len(model) + 1)] == [model[-i] for i in range(1, len(model) + 1)]
    assert networks[1:5] == tuple(model[1:5])
    assert networks == Networks(model)  # chunked differently, the same items
    assert all(len(chunk) < 2 * CHUNK for chunk in networks._chunks)
    assert all(chunk for chunk in networks._chunks)


def test_a_change_shares_every_chunk_but_the_one_it_falls_in() -> None:
    before = Networks(f"10.0.{i // 256}.{i % 256}/32" for i in range(9000))
    after = before.adding("10.0.17.77/31")
    shared = {id(chunk) for chunk in before._chunks} & {id(chunk) for chunk in after._chunks}
    assert len(shared) == len(before._chunks) - 1
    assert after.removing("10.0.17.77/31") == before
    with pytest.raises(IndexError):
        before[9000]


def test_a_peer_holding_networks_equals_the_same_peer_holding_a_tuple() -> None:
    texts = ("10.0.0.0/24", "10.0.1.0/24")
    held = PeerSpec("key", "192.0.2.1:51820", EMPTY.adding(texts[1]).adding(texts[0]), 25)
    plain = PeerSpec("key", "192.0.2.1:51820", texts, 25)
    assert held == plain and plain == held and hash(held) == hash(plain)
    assert held != PeerSpec("key", "192.0.2.1:51820", texts[:1], 25)
    assert Networks(texts) != list(texts)  # as a tuple is not a list
    assert pickle.loads(pickle.dumps(held)) == plain
    assert repr(EMPTY) == "Networks(())" and not EMPTY and len(EMPTY) == 0
