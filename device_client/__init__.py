"""Device client: ask the edge server for a group's intermediate latent, finish the image locally.

from device_client import DeviceClient, DeviceConfig
with DeviceClient(DeviceConfig(server="127.0.0.1:50051", model="tiny")) as client:
    result = client.generate("a red circle on the left", seed=7)
    result.save("out.png")
"""

from device_client.client import DeviceClient, DeviceError, DeviceModel, DeviceResult
from device_client.config import DeviceConfig
from sage_core.outputs import read_metadata

__all__ = ["DeviceClient", "DeviceConfig", "DeviceError", "DeviceModel", "DeviceResult", "read_metadata"]
