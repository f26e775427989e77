"""`fleetctl update --model M2`: move every replica onto new weights, one at a time, without
dropping a request.

One step per old replica (`Rollout.replace`), NGINX changed only through `Fleet.commit`:

    surge (CPU replicas or a free GPU, and --max-surge 1):
        start new → /ready → one real generation (the gate) → new into NGINX (reload)
        → old out of NGINX (reload) → old's running + waiting requests reach 0 → SIGTERM old
    no room for one more (--max-unavailable 1):
        old out of NGINX (reload) → its requests reach 0 → SIGTERM old (its GPU frees)
        → start new on that GPU → /ready → the gate → new into NGINX (reload)

A new replica that fails its gate halts the update and rolls back: it is removed, an old replica
already stopped is started again, and replicas already moved are moved back the same way, so
NGINX ends serving only the old weights. Every replica keeps the fleet's served model name, so
clients never change their `model` field; each replica's record says which weights it serves.

Progress lives in the fleet state (`FleetState.update`) and belongs to the `fleetctl update`
process (state.py: `UpdateProgress.is_owner_alive`): while that process lives, the watcher
pauses and `scale`/`up` refuse; once it is gone mid-way, the update counts as interrupted and
running it again resumes (replicas already serving the new weights count as done, its
leftovers are removed first).

A backend with its own rolling update (`info.has_rolling_update`: Swarm) replaces the replicas
itself; fleetctl gates each new one the same way (fleetctl/backend_update.py).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NoReturn

from fleetctl.errors import ConfigError, FleetError
from fleetctl.fleet import Fleet
from fleetctl.groups import DEFAULT_GROUP
from fleetctl.models import BUNDLED, is_store_name, resolve_model_path, weights_name
from fleetctl.probe import error_text
from fleetctl.state import FleetState, Phase, ReplicaRecord, UpdatePhase, UpdateProgress

GATE_PROMPT = "Hello"
GATE_MAX_TOKENS = 2
GATE_REQUEST_TIMEOUT_S = 120.0  # a first generation on a GPU may compile kernels


@dataclass(frozen=True)
class UpdateOptions:
    model: str  # as given; `target_model` is its absolute form
    max_surge: int = 1  # 1: the new replica starts beside the old one (needs room: CPU or a free GPU)
    max_unavailable: int = 0  # 1: without room, the old replica leaves first (one fewer serves meanwhile)
    timeout_s: float = 0.0  # per new replica, /ready plus the gate; 0: the fleet's --ready-timeout
    group: str = DEFAULT_GROUP  # the model group to move (a fleet of one group: "default")

    def __post_init__(self) -> None:
        if self.max_surge not in (0, 1) or self.max_unavailable not in (0, 1):
            raise ConfigError("--max-surge and --max-unavailable take 0 or 1: replicas are replaced one at a time")
        if self.max_surge == 0 and self.max_unavailable == 0:
            raise ConfigError("--max-surge 0 needs --max-unavailable 1, or no replica could ever be replaced")
        if self.timeout_s < 0:
            raise ConfigError(f"--timeout must be positive seconds, not {self.timeout_s:g}")
        resolve_model_path(self.model)  # ConfigError naming --model when the weights are not there

    @property
    def target_model(self) -> str:
        if self.model in BUNDLED or is_store_name(self.model):      # names stay names
            return self.model
        return str(Path(self.model).expanduser().resolve())


def describe(state: FleetState) -> dict | None:
    """The update's progress for `status` (state.py owns it; kept here for scripts that import it)."""
    return state.describe_update()


class Rollout:
    def __init__(self, fleet: Fleet, options: UpdateOptions,
                 on_progress: Callable[[int, int], None] = lambda num_done, num_total: None):
        self.fleet = fleet
        self.options = options
        self.group = options.group
        self.target = options.target_model
        self.on_progress = on_progress
        self.replaced: dict[str, str] = {}  # new replica → the weights it replaced (what a rollback restores)

    # The update as a whole ----------------------------------------------------------------
    def run(self) -> FleetState:
        """Runs the update to its end; FleetError (one line) when it halted and rolled back."""
        old_ids = self._begin()
        progress = self.fleet.state_dir.load().update
        self.on_progress(progress.num_done, progress.num_total)
        if self.fleet.backend.info.has_rolling_update:
            from fleetctl.backend_update import run_backend_update

            run_backend_update(self)
        else:
            for num_moved, old_id in enumerate(old_ids, start=1):
                old_model = self.fleet.state_dir.load().replicas[old_id].model
                try:
                    self.replaced[self.replace(old_id, self.target)] = old_model
                except FleetError as exc:
                    self.roll_back(exc)
                self.record(num_done=progress.num_done + num_moved)
                self.on_progress(progress.num_done + num_moved, progress.num_total)

        with self.fleet.transaction() as state:
            # `scale` and the watcher start the new weights from now on
            if state.config.groups:
                state.config.group(self.group).model = self.target
            else:
                state.config.model = self.target
            state.update.phase, state.update.step, state.update.finished_at_s = UpdatePhase.DONE, "", time.time()
        self.fleet.event("update", f"done: {len(state.active(self.group))} replica(s) serve "
                                   f"{weights_name(self.target)}")
        return state

    def _begin(self) -> list[str]:
        """Claims the update for this process and returns the old replicas to replace. Leftovers
        of an interrupted run go first: its unproven new replicas and whatever was draining."""
        fleet = self.fleet
        with fleet.state_dir.locked():
            state = fleet.state_dir.load()
            state.refuse_during_update("run it again")
            self.from_model = state.config.group(self.group).model
            mine = [r for r in state.sorted_replicas() if r.group == self.group]
            leftovers = [r.id for r in mine
                         if r.phase is Phase.DRAINING or (r.model == self.target and r.phase is not Phase.SERVING)]
            old_ids = [r.id for r in state.active(self.group) if r.model != self.target and r.id not in leftovers]
            num_done = sum(1 for r in state.active(self.group) if r.model == self.target and r.id not in leftovers)
            if not old_ids and not leftovers and self.from_model == self.target:
                raise FleetError(f"every replica already serves {weights_name(self.target)}; nothing to update")

            with fleet.transaction() as st:
                # a step from the start: `status` may look before the first replica is started
                st.update = UpdateProgress(self.target, self.from_model, num_total=num_done + len(old_ids),
                                           num_done=num_done, step=f"{len(old_ids)} replica(s) to replace").claim()
        fleet.event("update", f"to {weights_name(self.target)}: {len(old_ids)} replica(s) to replace",
                    f"max-surge {self.options.max_surge}, max-unavailable {self.options.max_unavailable}")
        if leftovers:
            fleet.remove_replicas(leftovers, "left over from an interrupted update")
        return old_ids

    def roll_back(self, error: FleetError, failure: str = "") -> NoReturn:
        """Moves every replica on the new weights back to the weights it replaced (newest
        first), then raises the one line that says what halted the update and where the fleet
        stands. `failure`: what already went wrong in a backend's own rollback."""
        fleet = self.fleet
        reason = " ".join(str(error).split())
        self.record(phase=UpdatePhase.ROLLING_BACK, reason=reason, step="rolling back")
        fleet.event("update", "halted, rolling back", reason)
        failure = " ".join(failure.split())
        moved = [r.id for r in fleet.state_dir.load().active(self.group) if r.model == self.target]
        for new_id in reversed(moved if not failure else []):
            old_model = self.replaced.get(new_id, self.from_model)
            if old_model == self.target:
                continue
            try:
                self.replace(new_id, old_model)
            except FleetError as exc:
                failure = " ".join(str(exc).split())
                break
        group_serving = [r for r in fleet.state_dir.load().serving() if r.group == self.group]
        serving = ", ".join(r.id for r in group_serving)
        if failure:
            mix = ", ".join(f"{r.id} {weights_name(r.model)}" for r in group_serving)
            self.record(phase=UpdatePhase.FAILED, step="", finished_at_s=time.time())
            raise FleetError(f"update to {weights_name(self.target)} halted: {reason}; the rollback failed too "
                             f"({failure}); NGINX serves {mix}; run `fleetctl update --model "
                             f"{self.from_model}` to finish it") from error
        self.record(phase=UpdatePhase.ROLLED_BACK, step="", finished_at_s=time.time())
        fleet.event("update", "rolled back", f"NGINX serves {serving}")
        raise FleetError(f"update to {weights_name(self.target)} halted and rolled back: {reason}; "
                         f"NGINX serves only {weights_name(self.from_model)} ({serving})") from error

    # One step -----------------------------------------------------------------------------
    def replace(self, old_id: str, model: str) -> str:
        """A replica of `model` takes old_id's place; returns its id. When the new replica fails
        its gate, this step is undone (the new one removed, the old one serving) and the gate's
        FleetError propagates."""
        fleet = self.fleet
        name = weights_name(model)
        if self._has_room(fleet.state_dir.load()):
            self.record(step=f"starting a replica of {name} beside {old_id}")
            new_id = fleet.start_replicas(1, model=model, group=self.group)[0]
            self.record(step=f"{new_id} ({name}) loading; {old_id} serves on")
            try:
                self._gate(new_id)
            except FleetError:
                fleet.remove_replicas([new_id], "failed its gate")
                raise
            self.record(step=f"{new_id} in NGINX; {old_id} leaves NGINX and drains")
            fleet.remove_replicas([old_id], f"replaced by {new_id} ({name})")
            return new_id

        self.record(step=f"{old_id} leaves NGINX and drains to make room for {name}")
        fleet.remove_replicas([old_id], f"making room for a replica of {name}", forget=False)
        new_id = fleet.start_replicas(1, model=model, group=self.group)[0]
        self.record(step=f"{new_id} ({name}) loading in {old_id}'s place")
        try:
            self._gate(new_id)
        except FleetError:
            fleet.remove_replicas([new_id], "failed its gate")
            fleet.start_again(old_id, "restored: its replacement failed its gate")
            fleet.wait_ready([old_id], fleet.state_dir.load().config.ready_timeout_s)
            raise
        fleet.forget(old_id)
        return new_id

    def _has_room(self, state: FleetState) -> bool:
        """Whether one more replica fits beside the current ones; else --max-unavailable 1 must
        make room (or the update cannot proceed)."""
        gpus = state.config.group(self.group).gpus or state.config.gpus
        is_free_gpu = not gpus or any(g not in {r.gpu for r in state.active()} for g in gpus)
        if self.options.max_surge and is_free_gpu:
            return True
        if not self.options.max_unavailable:
            raise FleetError(f"no free GPU for a new replica beside the old ones (--gpus {','.join(gpus)} are "
                             "all in use); pass --max-unavailable 1 to replace replicas in place, one at a time")
        return False

    def _gate(self, replica_id: str) -> None:
        """/ready, then one real generation; only then does the replica enter NGINX."""
        state = self.fleet.state_dir.load()
        timeout_s = self.options.timeout_s or state.config.ready_timeout_s
        self.fleet.wait_ready([replica_id], timeout_s, gate=self.check_generation, timeout_option="--timeout")

    def check_generation(self, record: ReplicaRecord, seconds_left: float) -> None:
        """A short completion under the fleet's served name must come back with tokens: weights,
        tokenizer and name are all what clients will use."""
        config = self.fleet.state_dir.load().config
        served_name = config.group(record.group).served_model_name
        body = {"model": served_name, "prompt": GATE_PROMPT, "max_tokens": GATE_MAX_TOKENS,
                "temperature": 0}
        status, answer = self.fleet.http.post_json(f"{record.url}/v1/completions", body, config.client_api_key,
                                                   min(seconds_left, GATE_REQUEST_TIMEOUT_S))
        usage = answer.get("usage") if isinstance(answer, dict) else None
        if status != 200 or not usage or not usage.get("completion_tokens"):
            raise FleetError(f"{record.id} ({weights_name(record.model)}) failed its test generation: "
                             f"POST /v1/completions answered {status or 'nothing'}: {error_text(answer)}")
        self.fleet.event(record.id, "passed its gate", f"/ready 200 and {usage['completion_tokens']} token(s) "
                                                       f"generated as {served_name}")

    def record(self, **changes) -> None:
        with self.fleet.state_dir.transaction() as state:
            for name, value in changes.items():
                setattr(state.update, name, value)
