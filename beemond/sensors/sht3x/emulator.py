"""Register-level emulation of a Sensirion SHT3x (SHT30/31/35) humidity and temperature sensor.

Follows the SHT3x-DIS datasheet (v7, Dec 2022): 16-bit commands, single-shot measurements
(section 4.3, table 9) with and without clock stretching, measurement durations (table 4), 6-byte
results ``T_msb T_lsb CRC RH_msb RH_lsb CRC`` with CRC-8 poly 0x31 init 0xFF (section 4.12), soft
reset 0x30A2, status register 0xF32D with CRC, and NACK of a read while a measurement without clock
stretching is still running. Values come from a *source* callable (a :class:`CsvReplay` row or a
fixed value) and are encoded into raw ticks exactly as the chip would: ``S_T = (T + 45) / 175 *
(2^16 - 1)``, ``S_RH = RH / 100 * (2^16 - 1)``.

Fault injection for tests: ``corrupt_next`` flips a bit in the next result's CRC-protected data
(byte ``corrupt_byte`` of the six, default the temperature MSB).
"""

from __future__ import annotations

import errno
import os
import time

from beemond.sensors.sht3x.chip import COMMANDS, MEASUREMENT_S, crc8

_SINGLE_SHOT = {code: rep for (rep, stretch), code in COMMANDS.items()}
_STRETCH = {code: stretch for (rep, stretch), code in COMMANDS.items()}


def encode(temperature_c: float, humidity_rh: float) -> tuple[int, int]:
    """Raw ticks the chip reports for a temperature (°C) and relative humidity (%RH)."""
    st = round((temperature_c + 45.0) * 65535.0 / 175.0)
    srh = round(humidity_rh * 65535.0 / 100.0)
    return min(max(st, 0), 65535), min(max(srh, 0), 65535)


class SHT3xChip:
    def __init__(self, source, clock=time.monotonic):
        self.source = source          # () -> (temperature °C, humidity %RH, tag)
        self.clock = clock
        self._result: bytes | None = None
        self._ready_at = 0.0
        self._stretch = False
        self._pending_read = b""
        self.status = 0x0000
        self.corrupt_next = 0         # tests: number of upcoming results to corrupt
        self.corrupt_byte = 0         # tests: which of the 6 result bytes is corrupted
        self.served: list = []        # tags of the values served, in order

    def write(self, data: bytes) -> None:
        if len(data) != 2:
            raise OSError(errno.EREMOTEIO, os.strerror(errno.EREMOTEIO))
        cmd = (data[0] << 8) | data[1]
        if cmd in _SINGLE_SHOT:
            t, rh, tag = self.source()
            st, srh = encode(t, rh)
            words = [st.to_bytes(2, "big"), srh.to_bytes(2, "big")]
            out = b"".join(w + bytes([crc8(w)]) for w in words)
            if self.corrupt_next > 0:
                self.corrupt_next -= 1
                i = self.corrupt_byte
                out = out[:i] + bytes([out[i] ^ 0x01]) + out[i + 1:]
            self.served.append(tag)
            self._result = out
            self._stretch = _STRETCH[cmd]
            self._ready_at = self.clock() + MEASUREMENT_S[_SINGLE_SHOT[cmd]]
        elif cmd == 0x30A2:   # soft reset
            self._result, self.status = None, 0x0000
        elif cmd == 0xF32D:   # read status register
            word = self.status.to_bytes(2, "big")
            self._pending_read = word + bytes([crc8(word)])
        elif cmd == 0x3041:   # clear status
            self.status = 0x0000
        else:                 # unknown command: status bit 1 "command not processed"
            self.status |= 0x0002
            raise OSError(errno.EREMOTEIO, os.strerror(errno.EREMOTEIO))

    def read(self, length: int) -> bytes:
        if self._pending_read:
            out, self._pending_read = self._pending_read[:length], b""
            return out
        if self._result is None:
            raise OSError(errno.EREMOTEIO, os.strerror(errno.EREMOTEIO))
        if self.clock() < self._ready_at:
            if not self._stretch:
                # Datasheet 4.4: without clock stretching the sensor NACKs the read header.
                raise OSError(errno.EREMOTEIO, os.strerror(errno.EREMOTEIO))
            time.sleep(max(0.0, self._ready_at - self.clock()))
        out, self._result = self._result[:length], None
        return out


def emulated_chip(sensor, replay) -> SHT3xChip:
    """The chip a simulated SHT3x sensor reads (:func:`beemond.sensors.seams.i2c_bus`): each
    single-shot measurement takes the replay's next row; ``served`` keeps each row's index."""

    def source():
        row = replay.next_row()
        return row.temperature_c, row.humidity_rh, row.index

    return SHT3xChip(source)
