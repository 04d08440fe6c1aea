"""vSphere integration with pyVmomi: sessions, discovery, replica VMs, isolated networks.

Everything here is synchronous and blocks on the network; callers on an asyncio loop
use `asyncio.to_thread`. Errors are `appliance.vsphere.errors.VSphereError` leaves.
"""
