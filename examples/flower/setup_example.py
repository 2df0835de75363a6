"""Prepare a `flwr run` of this example: operator key + keyset, run-config override, Flower config.

    .venv/flower/bin/python examples/flower/setup_example.py --work runs/flower-example [--nodes 4]

writes WORK/keys/{operator.key,keyset.json}, WORK/run-config.toml (absolute paths) and
WORK/flwr-home/config.toml (the local simulation SuperLink with --nodes virtual SuperNodes), then
prints the command to run. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedproxy_secure.flower.bundle_wire import init_operator

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, type=Path)
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--config", type=Path, default=HERE / "tiny.yaml")
    a = ap.parse_args()
    work = a.work.resolve()
    key, keyset = init_operator(work / "keys")
    run_cfg = work / "run-config.toml"
    run_cfg.write_text(
        f'fedproxy-config = "{a.config.resolve()}"\nkeyset = "{keyset}"\noperator-key = "{key}"\n'
        f'out = "{work / "out"}"\nstate-root = "{work / "state"}"\n')
    home = work / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n'
        f"options.num-supernodes = {a.nodes}\n"
        "options.backend.client-resources.num-cpus = 1\noptions.backend.client-resources.num-gpus = 0.0\n")
    print(f"FLWR_HOME={home} flwr run {HERE} --run-config {run_cfg} --stream")


if __name__ == "__main__":
    main()
