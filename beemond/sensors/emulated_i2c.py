"""An ``smbus2.SMBus``-compatible bus with emulated chips behind it.

Only the transport is emulated: drivers build real ``smbus2.i2c_msg`` objects and call the same
methods they call on ``/dev/i2c-N``. A chip is any object with ``write(data: bytes)`` and
``read(length) -> bytes``; a missing chip or a chip that NACKs raises ``OSError`` with the errno the
Linux I2C core reports (``ENXIO``/``EREMOTEIO``), as the real bus does.
"""

from __future__ import annotations

import ctypes
import errno
import os

from smbus2 import i2c_msg

I2C_M_RD = 0x0001


class EmulatedSMBus:
    def __init__(self, bus: int | None = None, chips: dict[int, object] | None = None):
        self.bus = bus
        self.chips: dict[int, object] = dict(chips or {})
        self.closed = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self.closed = True

    def _chip(self, address: int):
        if self.closed:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        chip = self.chips.get(address)
        if chip is None:
            raise OSError(errno.ENXIO, os.strerror(errno.ENXIO))
        return chip

    # ---- the seam drivers use
    def i2c_rdwr(self, *msgs: i2c_msg) -> None:
        for msg in msgs:
            chip = self._chip(msg.addr)
            if msg.flags & I2C_M_RD:
                data = bytes(chip.read(msg.len))
                ctypes.memmove(msg.buf, data, len(data))
            else:
                chip.write(bytes(msg))

    def write_byte_data(self, address: int, register: int, value: int, force=None) -> None:
        self._chip(address).write(bytes([register, value]))

    def write_i2c_block_data(self, address: int, register: int, data, force=None) -> None:
        self._chip(address).write(bytes([register, *data]))

    def read_byte_data(self, address: int, register: int, force=None) -> int:
        chip = self._chip(address)
        chip.write(bytes([register]))
        return chip.read(1)[0]

    def read_i2c_block_data(self, address: int, register: int, length: int, force=None) -> list[int]:
        chip = self._chip(address)
        chip.write(bytes([register]))
        return list(chip.read(length))
