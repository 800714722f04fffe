"""Who is who in a multi-process run, read from each engine's standard variables before anything joins.

Each engine has its own variables:

- TensorFlow: `TF_CONFIG`, JSON `{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker",
  "index": 0}}` (an optional `"chief"` task is the chief; else worker 0);
- JAX: `JAX_COORDINATOR_ADDRESS` (`host:port` where process 0 listens), `JAX_NUM_PROCESSES`,
  `JAX_PROCESS_ID` (0 is the chief);
- PyTorch: torchrun's `WORLD_SIZE`, `RANK` (0 is the chief), `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`.

The readers are pure: a mapping of variables in, a `Cluster` (or None: no variable set, one machine)
out, or a `UserError` naming the variable and the fix. A partial set is an error, never a quiet run
on one process: a forgotten variable would otherwise train alone while the other machines wait.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from dataclasses import dataclass

from capsnet.errors import UserError

TF_VARS = ("TF_CONFIG",)
JAX_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
TORCH_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# The variables that say "I am one of several processes" (MASTER_ADDR / MASTER_PORT alone are set by
# some schedulers for every job, so they do not count on the other engines).
CLAIMS = {"tensorflow": TF_VARS, "jax": JAX_VARS, "torch": ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
ENGINE_NAMES = {"tensorflow": "TensorFlow", "jax": "JAX", "torch": "PyTorch"}
HOW_TO_START = {
    "tensorflow": "TF_CONFIG (tf.distribute)",
    "jax": "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (jax.distributed)",
    "torch": "torchrun (its variables WORLD_SIZE, RANK, MASTER_ADDR and MASTER_PORT say who is who)",
}
TF_TASK_TYPES = ("chief", "worker")


@dataclass(frozen=True)
class Cluster:
    """This process's place among the processes of one run.

    Attributes:
        kind: what a process is called ("worker", "chief", "process", "rank").
        index: this process's number within its kind.
        rank: its number among all, 0 to `size - 1`; the chief is rank 0.
        size: the number of processes.
        coordinator: `host:port` where the chief listens; every process meets there first.
        names: every process's name by rank, e.g. `("worker 0", "worker 1")`.
        addresses: every process's `host:port` by rank where the variables say (TF_CONFIG), else empty.
        local_rank: this process's GPU on its machine (torchrun's `LOCAL_RANK`).
        variable: the variable that sets `coordinator`, for messages.
        gathered: a launcher gathered the processes already (torchrun's agent, which also holds the
            coordinator's port), so they need not meet first.
    """

    kind: str
    index: int
    rank: int
    size: int
    coordinator: str
    names: tuple[str, ...]
    addresses: tuple[str, ...] = ()
    local_rank: int = 0
    variable: str = "TF_CONFIG"
    gathered: bool = False

    @property
    def name(self) -> str:
        return self.names[self.rank]

    @property
    def is_chief(self) -> bool:
        """The chief writes the user's files (logs, checkpoints, plots, the test)."""
        return self.rank == 0

    @property
    def peer(self) -> str:
        """What one process is called in messages: "worker" (TF_CONFIG's tasks) or "process"."""
        return "worker" if self.kind in TF_TASK_TYPES else "process"

    @property
    def peers(self) -> str:
        return f"{self.peer}s" if self.peer == "worker" else "processes"

    @property
    def backup_dir_name(self) -> str:
        """The chief keeps `capsulenet.py`'s `backup` folder; every other process its own."""
        return "backup" if self.is_chief else f"backup-{self.kind}-{self.index}"

    def where(self, rank: int) -> str:
        """A process's name with its address when known, e.g. `worker 1 at 127.0.0.1:20002`."""
        return f"{self.names[rank]} at {self.addresses[rank]}" if self.addresses else self.names[rank]


def check_address(text: str, variable: str, fix: str = "set it to the chief's address and a free port"
                  ) -> str:
    """`text` if it is `host:port` (`[v6]:port` for IPv6) with a port in 1..65535.

    Raises:
        UserError: naming `variable`.
    """
    host, sep, port = text.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or any(c.isspace() for c in host) or not _is_port(port):
        raise UserError(f"{variable}: {text!r} is not host:port (e.g. 10.0.0.1:12345, a port in "
                        f"1..65535); {fix}")
    return text.strip()


def _is_port(text: str) -> bool:
    return text.isdigit() and 1 <= int(text) <= 65535


def _integer(environ: Mapping[str, str], variable: str, what: str) -> int:
    try:
        return int(environ[variable])
    except ValueError:
        raise UserError(f"{variable}: {environ[variable]!r} is not an integer; set it to {what}") from None


def _missing(environ: Mapping[str, str], variables: tuple[str, ...], what: str) -> None:
    """One error naming every unset variable of a partial set."""
    given = [v for v in variables if environ.get(v, "").strip()]
    missing = [v for v in variables if not environ.get(v, "").strip()]
    if given and missing:
        raise UserError(f"{_and(missing)} {_is(missing)} not set ({_and(given)} {_is(given)}): {what} needs "
                        f"all of {', '.join(variables)}; set {'it' if len(missing) == 1 else 'them'} on "
                        "every process, or unset the others to train on this machine alone")


def _and(names: list[str]) -> str:
    return " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)


def _is(names: list[str]) -> str:
    return "is" if len(names) == 1 else "are"


def _in_range(value: int, variable: str, size: int, size_variable: str) -> None:
    if not 0 <= value < size:
        raise UserError(f"{variable} {value}: must be in [0, {size_variable} = {size}); give each process "
                        f"its own number from 0 to {size - 1}")


def tf_cluster(environ: Mapping[str, str]) -> Cluster | None:
    """The cluster `TF_CONFIG` describes; None when it is unset or empty.

    Raises:
        UserError: it is not JSON, lacks the cluster or this task, or an address is not host:port.
    """
    raw = environ.get("TF_CONFIG", "").strip()
    if not raw:
        return None
    try:
        config = json.loads(raw)
        cluster, task = config["cluster"], config["task"]
        task_type, index = str(task["type"]), int(task["index"])
        members = {t: [str(a) for a in cluster.get(t, [])] for t in TF_TASK_TYPES}
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise UserError(f"TF_CONFIG: expected JSON {{\"cluster\": {{\"worker\": [\"host:port\", "
                        f"...]}}, \"task\": {{\"type\": \"worker\", \"index\": 0}}}} ({e!r})") from e
    others = sorted(set(cluster) - set(TF_TASK_TYPES))
    if others:
        raise UserError(f"TF_CONFIG: task types {others} are not supported; "
                        "MultiWorkerMirroredStrategy takes 'chief' and 'worker' tasks only")
    if task_type not in TF_TASK_TYPES or not 0 <= index < len(members[task_type]):
        raise UserError(f"TF_CONFIG: task {task_type} {index} is not in the cluster {members}")
    ordered = [(t, i, a) for t in TF_TASK_TYPES for i, a in enumerate(members[t])]  # the chief first
    addresses = tuple(check_address(a, f"TF_CONFIG {t} {i}", "give each task the address and a free port "
                                    "of the machine it runs on") for t, i, a in ordered)
    duplicates = sorted({a for a in addresses if addresses.count(a) > 1})
    if duplicates:
        raise UserError(f"TF_CONFIG: {', '.join(duplicates)} is given to several tasks; give each task "
                        "its own host:port")
    rank = ordered.index(next(m for m in ordered if m[:2] == (task_type, index)))
    return Cluster(task_type, index, rank, len(ordered), addresses[0],
                   tuple(f"{t} {i}" for t, i, _ in ordered), addresses)


def jax_cluster(environ: Mapping[str, str]) -> Cluster | None:
    """The cluster the `JAX_*` variables describe; None when none of them is set.

    Raises:
        UserError: a partial set, a non-integer, an id out of range or a malformed address.
    """
    if not any(environ.get(v, "").strip() for v in JAX_VARS):
        return None
    _missing(environ, JAX_VARS, "multi-process JAX")
    coordinator = check_address(environ["JAX_COORDINATOR_ADDRESS"], "JAX_COORDINATOR_ADDRESS")
    size = _integer(environ, "JAX_NUM_PROCESSES", "the number of processes")
    if size < 1:
        raise UserError(f"JAX_NUM_PROCESSES {size}: must be at least 1 (the number of processes)")
    rank = _integer(environ, "JAX_PROCESS_ID", "this process's number, from 0")
    _in_range(rank, "JAX_PROCESS_ID", size, "JAX_NUM_PROCESSES")
    return Cluster("process", rank, rank, size, coordinator, tuple(f"process {r}" for r in range(size)),
                   variable="JAX_COORDINATOR_ADDRESS")


def torch_cluster(environ: Mapping[str, str]) -> Cluster | None:
    """The group torchrun's variables describe; None when none of `WORLD_SIZE`, `RANK`, `LOCAL_RANK` is
    set (`MASTER_ADDR` / `MASTER_PORT` alone are a scheduler's defaults, not a group).

    Raises:
        UserError: a partial set, a non-integer, a rank out of range or a malformed address or port.
    """
    if not any(environ.get(v, "").strip() for v in CLAIMS["torch"]):
        return None
    _missing(environ, TORCH_VARS, "multi-process PyTorch (torchrun)")
    size = _integer(environ, "WORLD_SIZE", "the number of processes")
    if size < 1:
        raise UserError(f"WORLD_SIZE {size}: must be at least 1 (the number of processes)")
    rank = _integer(environ, "RANK", "this process's number, from 0")
    _in_range(rank, "RANK", size, "WORLD_SIZE")
    local_rank = _integer(environ, "LOCAL_RANK", "this process's GPU on its machine, from 0")
    _in_range(local_rank, "LOCAL_RANK", size, "WORLD_SIZE")
    host, port = environ["MASTER_ADDR"].strip(), environ["MASTER_PORT"].strip()
    if not _is_port(port):
        raise UserError(f"MASTER_PORT: {port!r} is not a port; set it to a free port in 1..65535 on the "
                        "rank 0 machine")
    if ":" in host and not _is_ipv6(host) or any(c.isspace() for c in host):
        raise UserError(f"MASTER_ADDR: {host!r} is not a host name or IP address; set it to the rank 0 "
                        "machine's address alone (the port goes in MASTER_PORT)")
    coordinator = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return Cluster("rank", rank, rank, size, coordinator, tuple(f"rank {r}" for r in range(size)),
                   local_rank=local_rank, variable="MASTER_ADDR and MASTER_PORT",
                   gathered="TORCHELASTIC_RUN_ID" in environ)


def _is_ipv6(text: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(text), ipaddress.IPv6Address)
    except ValueError:
        return False


READERS = {"tensorflow": tf_cluster, "jax": jax_cluster, "torch": torch_cluster}


def read_cluster(engine: str, environ: Mapping[str, str]) -> Cluster | None:
    """The cluster of `engine` ("tensorflow", "jax" or "torch") from its variables; None on one machine.

    Raises:
        UserError: the variables are wrong (see the readers), or another engine's variables are set
            instead: the run would otherwise train alone while the user expects a cluster.
    """
    cluster = READERS[engine](environ)
    if cluster is not None:
        return cluster
    for other, variables in CLAIMS.items():
        given = [v for v in variables if environ.get(v, "").strip()]
        if other != engine and given:
            raise UserError(
                f"{given[0]}: on {ENGINE_NAMES[engine]}, start every machine with {HOW_TO_START[engine]}; "
                f"{given[0]} is {ENGINE_NAMES[other]}'s (KERAS_BACKEND={other}), unset it to train on this "
                "machine alone")
    return None
