"""Device client: ask the edge server for a group's intermediate latent, finish the image locally.

from device_client import DeviceClient, DeviceConfig
with DeviceClient(DeviceConfig(server="127.0.0.1:50051", model="tiny")) as client:
    result = client.generate("a red circle on the left", seed=7)
    result.save("out.png")

The names below are imported on first use, so `sage-device --help` and its argument checks do not wait for torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "DeviceClient": "device_client.client",
    "DeviceError": "device_client.client",
    "DeviceModel": "device_client.client",
    "DeviceResult": "device_client.client",
    "DeviceConfig": "device_client.config",
    "read_metadata": "sage_core.outputs",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    """The public name `name` from the module that defines it (PEP 562)."""
    if name not in _HOMES:
        raise AttributeError(f"module 'device_client' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
