"""Client side: local LoRA training on the proxy (with PCR and DP-SGD) and the network join loop.

The trainer is imported lazily by callers (``from fedproxy_secure.client.trainer import train_round``)
so importing this package stays light.
"""
