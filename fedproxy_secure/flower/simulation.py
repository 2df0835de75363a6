"""Run the FedProxy Flower app on Flower's simulation engine from Python (``flwr.simulation.run_simulation``).

``python -m fedproxy_secure.flower.simulation --settings settings.json --nodes 4`` runs one
federation with the settings bound into both apps (``run_simulation`` gives apps an empty run
config) and prints the path of ``results.json``. Used by the tests and the 1,000-node benchmark;
``flwr run`` (docs/flower.md) is the user-facing way to run the same apps.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from fedproxy_secure.flower.settings import FlowerSettings


def run_in_simulation(settings: FlowerSettings, num_nodes: int, *, cpus_per_node: float = 1.0,
                      ray_cpus: int | None = None, verbose: bool = False, drops: tuple = ()) -> dict:
    """One federation of ``num_nodes`` virtual SuperNodes; returns ``results.json`` as a dict.

    ``cpus_per_node`` is Ray's ``client_resources.num_cpus`` (how many ClientApp actors run at once =
    available CPUs / this). ``drops``: :class:`~fedproxy_secure.flower.faults.DropAt` failures to
    inject (tests). Raises FedProxyError/ConfigError from the ServerApp.
    """
    from flwr.simulation import run_simulation

    from fedproxy_secure.flower.client_app import make_client_app
    from fedproxy_secure.flower.server_app import make_server_app

    os.environ.setdefault("OMP_NUM_THREADS", str(settings.torch_threads))
    backend: dict = {"client_resources": {"num_cpus": cpus_per_node, "num_gpus": 0.0}}
    if ray_cpus is not None:
        backend["init_args"] = {"num_cpus": ray_cpus, "logging_level": "ERROR", "log_to_driver": verbose}
    mods: tuple = ()
    if drops:
        from fedproxy_secure.flower.faults import drop_mod

        mods = (drop_mod(drops),)
    run_simulation(make_server_app(settings), make_client_app(settings, extra_mods=mods), num_supernodes=num_nodes,
                   backend_config=backend, verbose_logging=verbose)
    path = Path(settings.out) / "results.json"
    if not path.is_file():
        from fedproxy_secure.errors import FedProxyError

        raise FedProxyError(f"the Flower run wrote no {path}; see the log above for the ServerApp's error")
    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", required=True, help="JSON file: FlowerSettings fields (config, keyset, operator_key, ...)")
    ap.add_argument("--nodes", type=int, required=True)
    ap.add_argument("--cpus-per-node", type=float, default=1.0)
    ap.add_argument("--ray-cpus", type=int, default=None)
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--drop-at", action="append", default=[], metavar="CALL:PARTITION:STAGE",
                    help="tests: the node of PARTITION fails SecAgg+ run CALL at STAGE (repeatable)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING)
    settings = FlowerSettings.model_validate(json.loads(Path(a.settings).read_text()))
    from fedproxy_secure.flower.faults import DropAt

    drops = tuple(DropAt.parse(d) for d in a.drop_at)
    run_in_simulation(settings, a.nodes, cpus_per_node=a.cpus_per_node, ray_cpus=a.ray_cpus, verbose=a.verbose,
                      drops=drops)
    print(Path(settings.out) / "results.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
