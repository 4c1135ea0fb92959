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
    """The public name `name` from the module that defines it, or the submodule `name` (PEP 562)."""
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise  # the submodule exists and failed to import: say so, not "no attribute"
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> list[str]:
    """The module's own names and the public ones imported on first use."""
    return sorted({*globals(), *__all__})
