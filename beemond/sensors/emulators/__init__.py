"""Emulated devices that sit behind each driver's library seam (DESIGN.md, "Hardware seams").

The drivers in ``beemond.sensors`` talk to these exactly as they talk to hardware: an
``smbus2.SMBus``-compatible bus, a ``sounddevice.InputStream``-compatible stream. The same emulators
serve ``backend = "simulated"`` and the tests.
"""
