"""Stage i: server-guided compression of the LLM into a proxy (Block Influence or uniform drop),
optional distillation towards the LLM, and the proxy folder format (HF folder + ``fedproxy.json``).
"""

from __future__ import annotations

from fedproxy_secure.compress.agreement import agreement
from fedproxy_secure.compress.calib import calib_hash, calib_texts_from
from fedproxy_secure.compress.core import CompressedProxy, compress
from fedproxy_secure.compress.distill import distill
from fedproxy_secure.compress.influence import block_influence
from fedproxy_secure.compress.proxy_io import load_proxy_meta, save_proxy
from fedproxy_secure.compress.selection import kept_count, select_blocks, uniform_blocks

__all__ = [
    "CompressedProxy", "agreement", "block_influence", "calib_hash", "calib_texts_from", "compress",
    "distill", "kept_count", "load_proxy_meta", "save_proxy", "select_blocks", "uniform_blocks",
]
