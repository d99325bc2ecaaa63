"""The Ray launcher's flags and bundle layout, checked without Ray (CI does not install it):
every bad flag is a UserInputError before Ray is touched, the bundles are in worker-rank order,
and a missing Ray says how to install it."""

from __future__ import annotations

import sys

import pytest

from afdserve.errors import UserInputError
from afdserve.launch import ray_cli
from afdserve.launch.ray_launcher import RayGroupConfig, bundles, import_ray
from afdserve.launch.roles import RoleMap

SERVE = ["--", "--model", "builtin:tiny-llama"]


def test_bundles_follow_the_worker_ranks():
    roles = RoleMap.parse("front,attention:1,ffn:1,attention:1")  # an FFN rank between
    cfg = RayGroupConfig(
        roles, attention_cpus=2, ffn_cpus=1, ffn_gpus=1, attention_resource="afd_attention"
    )
    # worker ranks: attention 0, attention 1, then FFN 0 (= --rank 2), whatever the rank order
    assert bundles(cfg) == [
        {"CPU": 2.0, "afd_attention": 1.0},
        {"CPU": 2.0, "afd_attention": 1.0},
        {"CPU": 1.0, "GPU": 1.0},
    ]
    gpu_only = RayGroupConfig(roles, attention_cpus=0, attention_gpus=1, ffn_cpus=0, ffn_gpus=1)
    assert bundles(gpu_only) == [{"GPU": 1}] * 3


def test_the_plan_of_a_local_group():
    p = ray_cli.plan(["--roles", "front,attention:2,ffn:1", "--front-port", "29700", *SERVE])
    assert p.address == "" and p.node_ip == "127.0.0.1" and p.front_port == 29700
    assert p.group.roles.attention_workers == 2 and p.group.roles.ffn_workers == 1
    assert list(p.serve) == SERVE[1:]
    assert ray_cli._local_cpus(p, None) == 3  # what the bundles ask
    ext = ray_cli.plan(["--roles", "attention:1,ffn:1", "--front", "10.0.0.5:29600"])
    assert ext.front == "10.0.0.5:29600" and ext.front_port is None and ext.serve == ()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--roles", "front,attention:2"], "at least one attention and one FFN"),
        (["--roles", "attention:1,ffn:1"], "has no front"),
        (["--roles", "attention:1,ffn:1", "--front", "h:1", *SERVE], "runs no front"),
        (["--roles", "front,attention:1,ffn:1", "--front", "h:1"], "drop --front"),
        (["--roles", "front,attention:1,ffn:1", "--front-port", "0"], "--front-port"),
        (["--roles", "front,attention:1,ffn:1", "--attention-cpus", "-1"], "--attention-cpus"),
        (
            ["--roles", "front,attention:1,ffn:1", "--ffn-cpus", "0"],
            "some CPU or GPU",
        ),
        (["--roles", "front,attention:1,ffn:1", "--ffn-resource", "GPU"], "custom resource"),
        (["--roles", "front,attention:1,ffn:1", "--max-restarts", "-2"], "--max-restarts"),
        (["--roles", "front,attention:1,ffn:1", "--ray-timeout", "0"], "--ray-timeout"),
        (
            ["--roles", "front,attention:1,ffn:1", "--address", "h:6379", "--num-cpus", "4"],
            "local cluster only",
        ),  # fmt: skip
        (["--roles", "front,attention:2,ffn:1", "--", "--ffn-workers", "2"], "disagrees"),
        (["--roles", "front,attention:1,ffn:1", "--", "--transport", "shm"], "does not cross"),
        (["--roles", "front,attention:1,ffn:1", "--", "--mode", "aggregated"], "runs AFD"),
    ],
)
def test_bad_flags_are_user_errors(argv, message):
    with pytest.raises(UserInputError, match=message):
        ray_cli.plan(argv)


def test_main_answers_exit_2_on_a_bad_flag(capsys):
    assert ray_cli.main(["--roles", "ffn:1"]) == 2
    assert "afdserve.launch.ray: error:" in capsys.readouterr().err


def test_without_ray_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(UserInputError, match=r"pip install afdserve\[ray\]"):
        import_ray()
