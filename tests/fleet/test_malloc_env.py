"""Replicas start with one glibc malloc arena and an early trim (the soak's RSS stayed flat only
so: bench/NOTES.md), unless the operator set those variables."""
from fleetctl.backends.base import ReplicaSpec, replica_env


def spec() -> ReplicaSpec:
    return ReplicaSpec(id="r1", model="m", served_model_name="m", device="cpu")


def test_replicas_get_one_malloc_arena_and_an_early_trim(monkeypatch):
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    env = replica_env(spec())
    assert env["MALLOC_ARENA_MAX"] == "1" and env["MALLOC_TRIM_THRESHOLD_"] == "131072"


def test_the_operators_malloc_settings_win(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "8")
    assert replica_env(spec())["MALLOC_ARENA_MAX"] == "8"
