"""Fault injection for the Flower app's tests: a node that fails in a chosen SecAgg+ stage of a chosen run.

``DropAt(call, partition, stage)``: in the ``call``-th SecAgg+ run of the federation (the ServerApp
numbers its SecAgg+ runs 1, 2, ... and sends the number as the messages' ``group_id``; FedAvg makes
one run per round, SA-H-TIES two), the node of ``partition`` answers the message of ``stage``
(``setup`` | ``share_keys`` | ``collect_masked_vectors`` | ``unmask``) with an error instead of its
reply. Flower's SecAgg+ workflow treats an error reply like a missing one: the node leaves
``active_node_ids`` at that stage, exactly what a node that crashed or lost its connection there
causes (only faster: no timeout to wait out).

The mod is installed only when a drop is asked for (``run_in_simulation(..., drops=...)``,
``python -m fedproxy_secure.flower.simulation --drop-at CALL:PARTITION:STAGE``); the apps that
``flwr run`` loads never carry it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from fedproxy_secure.errors import ConfigError

STAGES = ("setup", "share_keys", "collect_masked_vectors", "unmask")


class SimulatedDrop(RuntimeError):
    """Raised by the fault mod in place of a node's reply."""


@dataclass(frozen=True)
class DropAt:
    """One injected failure: SecAgg+ run ``call`` (1-based), node ``partition``, stage ``stage``."""

    call: int
    partition: int
    stage: str

    @staticmethod
    def parse(text: str) -> "DropAt":
        """``CALL:PARTITION:STAGE`` (e.g. ``2:3:share_keys``); ConfigError naming what is wrong."""
        parts = text.split(":")
        if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit() or parts[2] not in STAGES:
            raise ConfigError(f"--drop-at {text!r}: use CALL:PARTITION:STAGE with STAGE one of {', '.join(STAGES)}")
        return DropAt(int(parts[0]), int(parts[1]), parts[2])


def drop_mod(drops: Iterable[DropAt]):
    """A Flower client mod that fails the scheduled (SecAgg+ run, partition, stage) messages."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    wanted = {(d.call, d.partition, d.stage) for d in drops}

    def mod(msg, context, call_next):
        cfg = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        if cfg is not None and Key.STAGE in cfg:
            group = msg.metadata.group_id
            call = int(group) if str(group).isdigit() else -1
            partition = int(context.node_config.get("partition-id", -1))
            if (call, partition, str(cfg[Key.STAGE])) in wanted:
                raise SimulatedDrop(f"injected failure: node of partition {partition} drops in SecAgg+ run {call}, "
                                    f"stage {cfg[Key.STAGE]}")
        return call_next(msg, context)

    return mod
