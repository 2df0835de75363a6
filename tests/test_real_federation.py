"""The README's "Run a real federation" section, executed step for step on loopback (in the default run:
it is the user path the docs promise; a few minutes on 2 cores).

The test reads the section's ``yaml`` block (written as ``federation.yaml``, with a free port in its
URL) and its ``bash`` block, and runs each command as written with the installed ``fedproxy-secure``:
lines ending in ``&`` start as separate processes (the operator's server, three sites), ``wait``
waits for them, every other line must exit 0. ``LLM`` is a tiny random Llama and ``CALIB`` and the
sites' files come from the vendored BIG-bench sample. Then it checks what the section promises:
2 FFA-LoRA rounds with every site, one A seed in every round config, the exported adapter loads with
``AutoPeftModelForCausalLM``, and the fused folder exists.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.net_helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).parent / "fedproxy-secure"
SECTION = "## Run a real federation"


def readme_blocks() -> tuple[str, list[str]]:
    """(federation.yaml text, command lines) of the README section."""
    text = (ROOT / "README.md").read_text()
    sec = text[text.index(SECTION):]
    sec = sec[: sec.index("\n## ", len(SECTION))]
    yaml_block = re.search(r"```yaml\n(.*?)```", sec, re.S).group(1)
    bash_block = re.search(r"```bash\n(.*?)```", sec, re.S).group(1)
    lines = [ln.strip() for ln in bash_block.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return yaml_block, lines


def test_readme_section_is_well_formed():
    fed_yaml, lines = readme_blocks()
    import yaml

    cfg = yaml.safe_load(fed_yaml)
    assert cfg["rounds"] == 2 and cfg["lora"]["ffa"] is True and cfg["min_clients"] == 3
    joins = [ln for ln in lines if " client join " in f" {ln} "]
    assert len(joins) == 3 and all(ln.endswith("&") for ln in joins)
    assert all(ln == "wait" or ln.startswith("fedproxy-secure ") for ln in lines)
    assert any(" server export " in ln for ln in lines) and any(" server fuse " in ln for ln in lines)


def _site_files(work: Path) -> None:
    from fedproxy_secure.data import load_task

    src = ROOT / "examples" / "data" / "bigbench-mini"
    for name, task in zip("abc", ("navigate", "sports_understanding", "strategyqa")):
        with (work / f"{name}.jsonl").open("w") as fh:
            for ex in load_task(src, task).examples[:12]:
                fh.write(json.dumps({"prompt": ex.prompt, "response": ex.response}) + "\n")


@pytest.mark.timeout(900)
def test_readme_real_federation_runs_as_written(tmp_path):
    from fedproxy_secure.config import TinyModelSpec
    from fedproxy_secure.models.tiny import save_tiny_llm

    fed_yaml, lines = readme_blocks()
    port, serve_port = free_port(), free_port()
    (tmp_path / "federation.yaml").write_text(fed_yaml.replace("https://127.0.0.1:8443", f"https://127.0.0.1:{port}"))
    llm = save_tiny_llm(TinyModelSpec(arch="llama", layers=4, hidden=32, heads=2, intermediate=64, vocab=259,
                                      max_positions=256), tmp_path / "llm")
    _site_files(tmp_path)
    (tmp_path / "question.txt").write_text("Is the sky blue?\n")  # site-a's question for `client ask`
    env = {**os.environ, "LLM": str(llm), "CALIB": str(ROOT / "examples/data/bigbench-mini/winowhy.json"),
           "OMP_NUM_THREADS": "1", "COLUMNS": "200", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    background: list[tuple[str, subprocess.Popen, Path]] = []
    outputs: dict[str, str] = {}
    t0 = time.time()
    for i, line in enumerate(lines):
        if line == "wait":
            for cmd, proc, log in background:
                try:
                    rc = proc.wait(timeout=max(10.0, 480 - (time.time() - t0)))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    rc = "timeout"
                outputs[cmd] = log.read_text()
                others = "".join(f"\n--- {c}\n{lg.read_text()[-1500:]}" for c, _, lg in background if c != cmd)
                assert rc == 0, f"{cmd} -> {rc}\n{outputs[cmd][-3000:]}{others}"
            background.clear()
            continue
        bg = line.endswith("&")
        argv = [re.sub(r"\$\{?(\w+)\}?", lambda m: env[m.group(1)], tok).replace("8445", str(serve_port))
                for tok in shlex.split(line.rstrip("&").strip())]
        assert argv[0] == "fedproxy-secure"
        argv[0] = str(CLI)
        if bg:
            log = tmp_path / f"bg{i}.log"
            proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
            background.append((line, proc, log))
            continue
        r = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        outputs[line] = r.stdout + r.stderr
        assert r.returncode == 0, f"{line} -> {r.returncode}\n{outputs[line][-3000:]}"
    assert not background, "the README starts processes it never waits for"

    server_log = next(v for k, v in outputs.items() if " server start " in f" {k} ")
    assert "round 1 done" in server_log and "round 2 done" in server_log and "federation FINISHED" in server_log
    for k, v in outputs.items():
        if " client join " in f" {k} ":
            assert "rounds [1, 2]" in v, v[-2000:]
    con = sqlite3.connect(tmp_path / "fed" / "server" / "state.db")
    try:
        cfgs = [json.loads(c) for (c,) in con.execute("SELECT config FROM rounds ORDER BY round_id")]
        statuses = [s for (s,) in con.execute("SELECT status FROM rounds ORDER BY round_id")]
    finally:
        con.close()
    settings = json.loads((tmp_path / "fed" / "server" / "federation.json").read_text())
    assert statuses == ["done", "done"]
    assert [c["a_seed"] for c in cfgs] == [settings["a_seed"]] * 2 and settings["a_seed"] is not None
    assert all(c["dim"] == settings["dim"] and len(c["cohort"]) == 3 for c in cfgs)
    status = next(v for k, v in outputs.items() if " server status " in f" {k} ")
    assert "federation finished" in status

    from peft import AutoPeftModelForCausalLM

    model = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "fed" / "export" / "adapter"))
    assert model is not None and (tmp_path / "fed" / "fused").is_dir()
    served = next(v for k, v in outputs.items() if " server serve-model " in f" {k} ")
    answer = next(v for k, v in outputs.items() if " client ask " in f" {k} ")
    assert answer.strip(), f"the site got no answer from the served model\n{served[-2000:]}"
    audit = (tmp_path / "fed" / "server" / "audit.jsonl").read_text()
    assert '"serve_request"' in audit and "Is the sky blue?" not in audit  # one entry, no prompt text
    print(f"README federation: {time.time() - t0:.0f} s")
