"""Small pure pieces of the fleet: GPU round-robin, the replica command line, state round-trips."""
from fleetctl.backends.base import ReplicaSpec, replica_env, serve_args
from fleetctl.backends.swarm import ipv4_host_port, rolling_update
from fleetctl.config import FleetConfig
from fleetctl.fleet import Fleet
from fleetctl.state import FleetState, Phase, ReplicaRecord, StateDir


def test_replicas_go_round_robin_over_the_gpus_asked_for():
    state = FleetState(FleetConfig(gpus=["0", "1", "2"]))
    picked = []
    for index in range(5):
        gpu = Fleet.pick_gpu(state)
        picked.append(gpu)
        state.replicas[f"r{index}"] = ReplicaRecord(f"r{index}", "127.0.0.1", 1, gpu=gpu)
    assert picked == ["0", "1", "2", "0", "1"]
    state.replicas["r1"].phase = Phase.DRAINING  # a draining replica frees its GPU
    assert Fleet.pick_gpu(state) == "1"
    assert Fleet.pick_gpu(FleetState(FleetConfig())) == ""


def test_replica_command_line_follows_the_contract_and_keeps_keys_off_it():
    spec = ReplicaSpec("r1", "smollm2", "smollm2", "cuda", gpu="1", api_keys=("secret-key-1",),
                       max_model_len=256, num_kv_blocks=64, drain_timeout_s=12)
    args = serve_args(spec, "/models/m.gguf", "0.0.0.0", 8000)
    assert args == ["serve", "--model", "/models/m.gguf", "--host", "0.0.0.0", "--port", "8000",
                    "--served-model-name", "smollm2", "--device", "cuda", "--drain-timeout", "12",
                    "--max-model-len", "256", "--num-kv-blocks", "64"]
    assert "secret-key-1" not in " ".join(args)
    assert replica_env(spec)["PAGEFLEET_API_KEYS"] == "secret-key-1"


def test_served_model_name_is_derived_from_the_model_as_the_replica_does():
    assert FleetConfig(model="smollm2").served_model_name == "smollm2-135m-instruct"
    assert FleetConfig(model="/models/Qwen2.5-0.5B-Instruct/").served_model_name == "qwen2.5-0.5b-instruct"
    assert FleetConfig(model="/m/SmolLM2-135M.Q4_1.gguf").served_model_name == "smollm2-135m.q4_1"
    assert FleetConfig(model="smollm2", served_model_name="chat").served_model_name == "chat"
    assert FleetConfig(device="", gpus=["0"]).replica_device == "cuda"
    assert FleetConfig().replica_device == "cpu"


def test_state_round_trips_through_the_state_dir(tmp_path):
    state_dir = StateDir(tmp_path)
    state = FleetState(FleetConfig(num_replicas=3, api_keys=["k" * 10]))
    state.replicas["r1"] = ReplicaRecord("r1", "127.0.0.1", 9000, phase=Phase.SERVING)
    state_dir.ensure()
    state_dir.save(state)
    with state_dir.transaction() as loaded:
        assert loaded.to_dict() == state.to_dict()
        loaded.replicas["r1"].phase = Phase.DRAINING
    assert state_dir.load().replicas["r1"].phase is Phase.DRAINING
    assert oct(state_dir.fleet_file.stat().st_mode & 0o777) == "0o600"


def test_swarm_updates_default_to_a_10_s_monitor_and_3_s_health_checks():
    config = FleetConfig()
    assert (config.update_monitor_s, config.health_interval_s) == (10.0, 3.0)
    assert rolling_update(config.update_monitor_s) == {"Parallelism": 1, "Order": "start-first",
                                                       "FailureAction": "rollback", "Monitor": 10_000_000_000}
    assert rolling_update(FleetConfig(update_monitor_s=2).update_monitor_s)["Monitor"] == 2_000_000_000


def test_a_swarm_task_is_reached_at_its_ipv4_binding_when_docker_gave_ipv6_another_port():
    # docker's order: [::] may come first, and its port differs when the IPv4 one was taken
    bindings = [{"HostIp": "::", "HostPort": "32771"}, {"HostIp": "0.0.0.0", "HostPort": "32772"}]
    assert ipv4_host_port(bindings) == 32772
    assert ipv4_host_port([{"HostIp": "::", "HostPort": "32771"}]) == 32771   # an IPv6-only engine
    assert ipv4_host_port([]) == 0
