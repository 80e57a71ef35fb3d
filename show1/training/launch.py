"""How the training processes start: the launcher command in front of `-m show1.cli train …`.

One machine: torchrun `--standalone` with N processes, or `accelerate launch` with a config. Several machines
(nodes): torchrun on every node with the same command, meeting at a c10d rendezvous that the node named by the
endpoint hosts, so every node starts `--nproc_per_node` processes and they train as one data-parallel group
(show1.training.ranks: the global batch is split over all of them; the main process, on one node, writes). The run
folder must be on storage every node sees.

A deployment sets the nodes as job variables (read in show1.config, checked here):
SHOW1_TRAIN_NODES        how many nodes train together (default 1: this machine alone)
SHOW1_RDZV_ENDPOINT      host:port of the rendezvous, on the node that hosts it (the same on every node)
SHOW1_RDZV_ID            one id per run, the same on every node (a new one for each new run)
SHOW1_NODE_ADDRESS       this node's address on the network the nodes share; the node whose address is the
                         endpoint's host hosts the rendezvous (torch's own check, by hostname, fails where the
                         nodes share a hostname or it resolves to another address)
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from show1.config import ConfigError

VARIABLES = {"count": "SHOW1_TRAIN_NODES", "endpoint": "SHOW1_RDZV_ENDPOINT", "run_id": "SHOW1_RDZV_ID",
             "address": "SHOW1_NODE_ADDRESS"}
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class Nodes(BaseModel):
    """The machines one training runs on, as this node sees them. The defaults: this machine alone."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    count: int = Field(1, ge=1)
    endpoint: str | None = None  # host:port of the c10d rendezvous
    run_id: str | None = None
    address: str | None = None  # this node's address on the nodes' network

    @field_validator("endpoint")
    @classmethod
    def _host_and_port(cls, value: str | None) -> str | None:
        if value is None:
            return None
        host, colon, port = value.rpartition(":")
        if not colon or not host:
            raise ValueError("give host:port, e.g. 10.0.0.1:29500")
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"the port {port!r} is not a port number (1 to 65535)")
        return value

    @field_validator("run_id")
    @classmethod
    def _plain_id(cls, value: str | None) -> str | None:
        if value is not None and not _RUN_ID.fullmatch(value):
            raise ValueError("use letters, digits, '.', '_' and '-' (the same id on every node of the run)")
        return value

    @model_validator(mode="after")
    def _complete(self) -> Nodes:
        if self.count > 1:
            missing = [VARIABLES[name] for name in ("endpoint", "run_id", "address") if getattr(self, name) is None]
            if missing:
                raise ValueError(f"{' and '.join(missing)} not set: with {VARIABLES['count']}={self.count} every node "
                                 "needs the rendezvous endpoint (host:port on the node that hosts it), the run's "
                                 "rendezvous id (the same on every node) and its own address")
        return self

    @property
    def host(self) -> str | None:
        """The rendezvous host (the endpoint's host)."""
        return self.endpoint.rpartition(":")[0].strip("[]") if self.endpoint else None

    @property
    def is_host(self) -> bool:
        """Whether this node hosts the rendezvous: node 0, whose flow run reports the run."""
        return self.count == 1 or self.address == self.host


def nodes_from(variables: Mapping[str, str]) -> Nodes:
    """The nodes the job variables describe (`show1.config.train_node_variables()`). Raises ConfigError naming the
    variable and what is wrong with it."""
    fields = {name: variables[variable] for name, variable in VARIABLES.items() if variables.get(variable)}
    count = fields.get("count", "1")
    if not count.isdigit() or int(count) < 1:
        raise ConfigError(f"{VARIABLES['count']}={count!r}: give a whole number of nodes, 1 or more")
    try:
        return Nodes(**(fields | {"count": int(count)}))
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            message = error["msg"].removeprefix("Value error, ")
            name = VARIABLES.get(str(error["loc"][0])) if error["loc"] else None
            problems.append(f"{name}={fields[_field(name)]!r}: {message}" if name else message)
        raise ConfigError("; ".join(problems)) from None


def _field(variable: str) -> str:
    return next(name for name, known in VARIABLES.items() if known == variable)


def launch_command(processes: int, accelerate_config: str | None, nodes: Nodes | None = None) -> list[str]:
    """The command that starts the training processes, before `-m show1.cli train …`: `accelerate launch` with the
    config (and `processes`, when given, as its process count), else torchrun with `processes` on this machine
    (gloo on CPUs, NCCL on GPUs), or on each of `nodes` at their rendezvous. Raises ConfigError for several nodes
    with an accelerate config (show1 starts multi-node runs with torchrun only)."""
    nodes = nodes or Nodes()
    if accelerate_config and nodes.count > 1:
        raise ConfigError(f"{VARIABLES['count']}={nodes.count} with the accelerate config {accelerate_config}: show1 "
                          "starts a multi-node run with torchrun only; set SHOW1_ACCELERATE_CONFIG to an empty value "
                          "(the processes per node come from SHOW1_TRAIN_PROCESSES)")
    if accelerate_config:
        count = ["--num_processes", str(processes)] if processes > 1 else []
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", accelerate_config, *count]
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    if nodes.count == 1:
        return [*torchrun, "--standalone", "--nproc_per_node", str(processes)]
    assert nodes.endpoint and nodes.run_id and nodes.address  # checked by Nodes
    # No restarts: a node that fails ends the run on every node within seconds (its connections close), and the
    # nodes started again (--resume latest, the `train` deployment's default) continue from the last checkpoint.
    return [*torchrun, "--nnodes", str(nodes.count), "--nproc_per_node", str(processes), "--max-restarts", "0",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", nodes.endpoint, "--rdzv-id", nodes.run_id,
            "--rdzv-conf", f"is_host={str(nodes.is_host).lower()}", "--local-addr", nodes.address]
