"""The audio input device on hardware: finding it among PortAudio's devices and opening a stream on it.

:mod:`beemond.sensors.seams` calls :func:`open_input_stream` for ``backend = "hardware"`` (and the
emulator's stream otherwise); the driver never chooses.
"""

from __future__ import annotations

from beemond.errors import SensorError, TransientSensorError


class DeviceMissing(TransientSensorError):
    """No input device matches (unplugged, or the sound server is not up yet): transient."""


class DeviceError(SensorError, ValueError):
    """The device spec is ambiguous, or the device cannot record these settings: persistent."""


def find_input_device(spec: str, devices) -> int | None:
    """The PortAudio index of the input device *spec* names, from ``sounddevice.query_devices()``.

    *spec*: ``""`` (the default input: returns ``None``), an index (``"3"``), or a case-insensitive
    substring of the device name; a name equal to *spec* wins over other substring matches. Devices
    without input channels are never chosen. Raises :class:`DeviceMissing` when nothing matches and
    :class:`DeviceError` when several devices do (listing them).
    """
    if not spec:
        return None
    inputs = [(i, d["name"]) for i, d in enumerate(devices) if d["max_input_channels"] > 0]
    listing = ", ".join(f"[{i}] {name}" for i, name in inputs) or "none"
    if spec.strip().isdigit():
        index = int(spec)
        if any(i == index for i, _ in inputs):
            return index
        raise DeviceMissing(f"no input device with index {index} (inputs: {listing})")
    want = spec.lower()
    matches = [(i, name) for i, name in inputs if want in name.lower()]
    exact = [i for i, name in matches if name.lower() == want]
    if len(matches) == 1 or len(exact) == 1:
        return exact[0] if exact else matches[0][0]
    if not matches:
        raise DeviceMissing(f"no input device matching {spec!r} (inputs: {listing})")
    raise DeviceError(f"device {spec!r} matches several input devices: "
                      + ", ".join(f"[{i}] {name}" for i, name in matches)
                      + "; use a longer name substring or the index")


def open_input_stream(s, **kwargs):
    """(PortAudio's unstarted ``sounddevice.InputStream`` on the device sensor *s* names, the device's
    name), *kwargs* going to the stream. Raises :class:`DeviceMissing` (transient) or :class:`DeviceError`."""
    import sounddevice as sd

    try:
        # PortAudio enumerates devices once, in Pa_Initialize: re-initialise (no stream is open
        # here) so that a re-plugged microphone is seen.
        if sd._initialized:
            sd._terminate()
        sd._initialize()
        index = find_input_device(s.device, sd.query_devices())
        name = sd.query_devices(index, kind="input")["name"]
    except sd.PortAudioError as e:  # e.g. no default input at all
        raise DeviceMissing(f"no input device: {e}") from None
    try:
        sd.check_input_settings(device=index, channels=s.channels, dtype=kwargs["dtype"],
                                samplerate=s.sample_rate_hz)
    except (sd.PortAudioError, ValueError) as e:
        raise DeviceError(f"input device {name!r} cannot record {s.sample_rate_hz} Hz x{s.channels} "
                          f"{kwargs['dtype']} ({s.subtype}): {e}") from None
    try:
        return sd.InputStream(device=index, **kwargs), name
    except sd.PortAudioError as e:  # gone between the check and the opening
        raise DeviceMissing(f"cannot open input device {name!r}: {e}") from None
