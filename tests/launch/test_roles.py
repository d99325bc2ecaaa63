"""The role map: which launcher rank is the front, which attention or FFN worker, and which
afdserve worker rank each connects to its front as."""

from __future__ import annotations

import pytest

from afdserve.errors import UserInputError
from afdserve.launch.roles import Role, RoleMap


def test_roles_in_rank_order_with_worker_ranks():
    roles = RoleMap.parse("front,attention:2,ffn:1")
    assert roles.world_size == 4 and roles.front_rank == 0
    assert (roles.attention_workers, roles.ffn_workers) == (2, 1)
    assert [roles.role(k) for k in range(4)] == [
        Role("front", 0), Role("attention", 0), Role("attention", 1), Role("ffn", 0)
    ]  # fmt: skip
    assert [roles.worker_rank(k) for k in (1, 2, 3)] == [0, 1, 2]  # as `afdserve worker --rank`
    assert roles.describe() == "0=front, 1=attention0, 2=attention1, 3=ffn0"


def test_entries_may_repeat_and_the_front_may_be_elsewhere_or_absent():
    roles = RoleMap.parse("attention, ffn:2 ,attention,front")
    assert [roles.worker_rank(k) for k in range(4)] == [0, 2, 3, 1]
    assert roles.front_rank == 4 and roles.world_size == 5
    outside = RoleMap.parse("attention:2,ffn")
    assert outside.front_rank is None and outside.world_size == 3
    with pytest.raises(UserInputError, match="is the front"):
        roles.worker_rank(4)


def test_default_map_puts_the_front_first_and_one_ffn_worker_last():
    assert RoleMap.default(5) == RoleMap.parse("front,attention:3,ffn:1")
    with pytest.raises(UserInputError, match="no room"):
        RoleMap.default(2)


@pytest.mark.parametrize(
    "spec,match",
    [
        ("", "empty"),
        ("front,front,attention,ffn", "one front at most"),
        ("front:2,attention,ffn", "front: 1"),
        ("front,attention:2", "at least one attention and one FFN"),
        ("ffn:1", "at least one attention"),
        ("front,attention:0,ffn", "count must be >= 1"),
        ("front,attn:2,ffn", "'attn:2' is not front"),
        ("front,attention:-1,ffn", "is not front"),
        ("front,,ffn,attention", "'' is not front"),
    ],
)
def test_bad_role_maps_are_one_clear_error(spec, match):
    with pytest.raises(UserInputError, match=match):
        RoleMap.parse(spec)


def test_rank_outside_the_map():
    with pytest.raises(UserInputError, match="rank 4 is outside"):
        RoleMap.parse("front,attention,ffn").role(4)
    with pytest.raises(UserInputError, match="indices"):
        RoleMap((Role("attention", 1), Role("ffn", 0)))
