"""One fleet, several models: each model group keeps its own replica count, engine settings and
updates, and NGINX gets one upstream per group routed by `model` (the routing itself:
test_njs_routing.py). Decisions run on the fakes of tests/fleet/fakes.py, in milliseconds."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fleetctl import fleet as fleet_mod
from fleetctl.config import FleetConfig, dump_fleet_file, load_fleet_file
from fleetctl.errors import ConfigError
from fleetctl.health import Watcher
from fleetctl.lifecycle import converge
from fleetctl.rollout import Rollout, UpdateOptions
from fleetctl.status import collect
from tests.fleet.fakes import make_fleet


@pytest.fixture(autouse=True)
def fast_polls(monkeypatch):
    monkeypatch.setattr(fleet_mod, "POLL_S", 0.001)


@pytest.fixture
def checkpoints(tmp_path) -> dict[str, str]:
    paths = {}
    for name in ("llama", "llama-v2", "coder"):
        (tmp_path / name).mkdir()
        paths[name] = str(tmp_path / name)
    return paths


def two_groups(checkpoints) -> list[dict]:
    return [{"name": "chat", "model": checkpoints["llama"], "served_model_name": "chat", "num_replicas": 2,
             "engine": {"max_num_seqs": 64, "enforce_eager": True}},
            {"name": "code", "model": checkpoints["coder"], "num_replicas": 1, "engine": {"max_model_len": 4096}}]


def by_group(fleet) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for record in fleet.state_dir.load().serving():
        groups.setdefault(record.group, []).append(record.id)
    return groups


def test_each_group_gets_its_replicas_engine_settings_and_upstream(tmp_path, checkpoints):
    fleet, backend, nginx = make_fleet(tmp_path, groups=two_groups(checkpoints))
    converge(fleet, None, lambda *_: None)
    assert by_group(fleet) == {"chat": ["r1", "r2"], "code": ["r3"]}
    specs = {rid: replica.spec for rid, replica in backend.replicas.items()}
    assert specs["r1"].served_model_name == "chat" and specs["r3"].served_model_name == "coder"
    assert specs["r1"].engine_args == ("--enforce-eager", "--max-num-seqs", "64")
    assert specs["r3"].engine_args == ("--max-model-len", "4096") and specs["r3"].model == checkpoints["coder"]
    config = nginx.configs[-1]
    assert '"models":{"chat":1,"coder":2}' in config  # the routes lb/pagefleet.js reads
    chat, code = config.split("upstream pf_g1 {")[1].split("}")[0], config.split("upstream pf_g2 {")[1].split("}")[0]
    assert nginx.upstreams(chat) == [f"127.0.0.1:{backend.replicas[r].port}" for r in ("r1", "r2")]
    assert nginx.upstreams(code) == [f"127.0.0.1:{backend.replicas['r3'].port}"]


def test_scaling_one_group_leaves_the_other_untouched(tmp_path, checkpoints):
    fleet, backend, nginx = make_fleet(tmp_path, groups=two_groups(checkpoints))
    converge(fleet, None, lambda *_: None)
    num_actions = len(backend.actions)
    converge(fleet, 3, lambda *_: None, group="code")
    converge(fleet, 1, lambda *_: None, group="chat")
    assert by_group(fleet) == {"chat": ["r1"], "code": ["r3", "r4", "r5"]}
    assert backend.actions[num_actions:] == [("start", "r4", checkpoints["coder"]), ("start", "r5", checkpoints["coder"]),
                                             ("stop", "r2", checkpoints["llama"])]
    state = fleet.state_dir.load()
    assert [g.num_replicas for g in state.config.groups] == [1, 3]
    with pytest.raises(ConfigError, match=r"model groups \(chat, code\); name one: --group NAME"):
        converge(fleet, 2, lambda *_: None)
    with pytest.raises(ConfigError, match="no model group 'small' in this fleet; its groups: chat, code"):
        converge(fleet, 2, lambda *_: None, group="small")


def test_the_watcher_replaces_a_missing_replica_in_its_own_group(tmp_path, checkpoints):
    fleet, backend, nginx = make_fleet(tmp_path, groups=two_groups(checkpoints))
    converge(fleet, None, lambda *_: None)
    backend.stop("r3", 0)  # the only `code` replica vanishes
    with fleet.state_dir.transaction() as state:
        del state.replicas["r3"]
    watcher = Watcher(fleet)
    watcher.tick()
    watcher.tick()
    assert by_group(fleet) == {"chat": ["r1", "r2"], "code": ["r4"]}
    assert backend.replicas["r4"].spec.model == checkpoints["coder"]


def test_an_update_moves_one_group_and_keeps_its_served_name(tmp_path, checkpoints):
    fleet, backend, nginx = make_fleet(tmp_path, groups=two_groups(checkpoints))
    converge(fleet, None, lambda *_: None)
    Rollout(fleet, UpdateOptions(checkpoints["llama-v2"], group="chat")).run()
    state = fleet.state_dir.load()
    assert {r.id: Path(r.model).name for r in state.serving()} == {"r3": "coder", "r4": "llama-v2", "r5": "llama-v2"}
    assert all(backend.replicas[r].spec.served_model_name == "chat" for r in ("r4", "r5"))
    assert state.config.group("chat").model == checkpoints["llama-v2"]
    assert state.config.group("code").model == checkpoints["coder"]


def test_status_groups_its_rows(tmp_path, checkpoints):
    fleet, backend, nginx = make_fleet(tmp_path, groups=two_groups(checkpoints))
    converge(fleet, None, lambda *_: None)
    converge(fleet, 2, lambda *_: None, group="code")  # r4 joins `code` after the `chat` rows
    report = collect(fleet)
    assert [(r["group"], r["id"]) for r in report["replicas"]] == \
        [("chat", "r1"), ("chat", "r2"), ("code", "r3"), ("code", "r4")]
    assert [(g["name"], g["model"], g["num_replicas_ready"]) for g in report["groups"]] == \
        [("chat", "chat", 2), ("code", "coder", 2)]
    assert report["num_replicas_wanted"] == 4 and report["model"] == "chat, coder"


def test_a_fleet_file_round_trips_through_render_fleet(tmp_path, checkpoints):
    config = FleetConfig(groups=two_groups(checkpoints), routing="prefix", api_keys=["k" * 12])
    path = tmp_path / "fleet.yaml"
    path.write_text(dump_fleet_file(config))
    assert "model" not in yaml.safe_load(path.read_text())  # the groups name their models
    assert FleetConfig(**load_fleet_file(path)).to_dict() == config.to_dict()


@pytest.mark.parametrize("text, words", [
    ("replicas: 2\n", "unknown setting(s) replicas"),
    ("groups:\n  - {name: chat, model: smollm2, engine: {max_num_seq: 4}}\n", "unknown engine setting 'max_num_seq'"),
    ("groups:\n  - {name: chat, model: smollm2, engine: {max_num_seqs: many}}\n", "max_num_seqs must be int"),
    ("groups:\n  - {name: a, model: smollm2}\n  - {name: b, model: smollm2}\n", "served model names must differ"),
    ("groups:\n  - {name: Chat_1, model: smollm2}\n", "a group name is 1-32 of a-z 0-9 -"),
])
def test_a_fleet_file_with_a_mistake_names_it(tmp_path, text, words):
    path = tmp_path / "fleet.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        FleetConfig(**load_fleet_file(path))


def test_swarm_names_a_groups_replicas_after_the_group_and_the_task_slot():
    from fleetctl.backends.swarm import group_of, replica_id

    assert [replica_id("default", 3), replica_id("chat", 3), replica_id("x-r2", 1)] == ["r3", "chat-r3", "x-r2-r1"]
    assert [group_of("r3"), group_of("chat-r3"), group_of("x-r2-r1"), group_of("my-rack")] == \
        ["default", "chat", "x-r2", "default"]


def test_up_again_with_another_replica_count_in_a_group_converges_and_other_changes_are_refused(tmp_path,
                                                                                                checkpoints):
    """`up --group chat=M,replicas=3` on a fleet running chat=M with 2 replicas changes only the
    count (as `up --replicas` does for a fleet without groups); another model or engine setting
    still needs new replicas, so `up` refuses it."""
    from fleetctl.groups import parse_group_option
    from fleetctl.lifecycle import open_or_create
    from fleetctl.state import StateDir

    def given(text: str) -> dict:
        return {"groups": [parse_group_option(text).to_dict()]}

    state_dir = StateDir(tmp_path / "home")
    open_or_create(state_dir, given(f"chat={checkpoints['llama']},replicas=2,max_num_seqs=64"))
    state = open_or_create(state_dir, given(f"chat={checkpoints['llama']},replicas=3,max_num_seqs=64"))
    assert state.config.group("chat").num_replicas == 3
    assert state_dir.load().config.group("chat").num_replicas == 3
    for changed in (f"chat={checkpoints['coder']},replicas=3,max_num_seqs=64",
                    f"chat={checkpoints['llama']},replicas=3,max_num_seqs=32"):
        with pytest.raises(ConfigError, match="changing it needs new replicas"):
            open_or_create(state_dir, given(changed))
    assert state_dir.load().config.group("chat").num_replicas == 3
