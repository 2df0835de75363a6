"""Big-model loading with accelerate: a tiny LLM forced across CPU and disk gives the plain load's logits."""

from __future__ import annotations

import pytest
import torch

from fedproxy_secure.errors import ConfigError
from fedproxy_secure.config import TinyModelSpec
from fedproxy_secure.models.tiny import save_tiny_llm
from fedproxy_secure.models.loading import Placement, load_causal_lm, parse_max_memory, placement

SPEC = TinyModelSpec(arch="llama", layers=4, hidden=64, heads=4, intermediate=128, vocab=300, seed=7)


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    torch.set_num_threads(1)
    return save_tiny_llm(SPEC, tmp_path_factory.mktemp("llm"))


def _weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_cpu_plus_disk_offload_gives_identical_logits(llm_dir, tmp_path):
    ids = torch.randint(3, SPEC.vocab, (2, 17), generator=torch.Generator().manual_seed(0))
    plain = load_causal_lm(llm_dir)
    with torch.no_grad():
        want = plain(input_ids=ids).logits
    budget = _weight_bytes(plain) // 3  # a third of the weights fit in "CPU memory": the rest goes to disk
    offload = tmp_path / "offload"
    place = Placement(device="auto", max_memory={"cpu": budget}, offload_dir=offload)
    big = load_causal_lm(llm_dir, place=place)
    devices = set(big.hf_device_map.values())
    assert "disk" in devices and "cpu" in devices, big.hf_device_map
    # offloaded weights are not held in memory: they sit on the meta device and are read from disk
    # (the safetensors checkpoint itself, or the offload folder) block by block in forward
    assert any(p.device.type == "meta" for p in big.parameters())
    with torch.no_grad():
        got = big(input_ids=ids).logits
    assert torch.equal(got.cpu(), want)
    # the context manager gives the same placement to calls that do not name one
    with placement(place):
        again = load_causal_lm(llm_dir)
    assert "disk" in set(again.hf_device_map.values())


def test_parse_max_memory_and_placement_errors_name_the_option():
    assert parse_max_memory("cpu=2GiB, 0=20GiB") == {"cpu": "2GiB", 0: "20GiB"}
    assert parse_max_memory("cpu=1000") == {"cpu": 1000}
    assert parse_max_memory(None) is None
    for bad in ("cpu", "gpu=1GiB", "cpu=lots", "=1GiB"):
        with pytest.raises(ConfigError, match="--max-memory"):
            parse_max_memory(bad)
    with pytest.raises(ConfigError, match="--device"):
        Placement(device="tpu")
    with pytest.raises(ConfigError, match="--max-memory/--offload-dir"):
        Placement(device="cpu", max_memory={"cpu": 1000})
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="--device cuda"):
            Placement(device="cuda")
