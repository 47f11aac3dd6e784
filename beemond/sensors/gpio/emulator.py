"""A person at the hive, for the simulated GPIO backend: drives a ``MockFactory`` pin periodically.

Only the pin level is emulated (``MockPin.drive_low`` / ``drive_high``, gpiozero's own seam); the
gpiozero device, its debounce and its callback, and beemond's worker are the code that runs.
"""

from __future__ import annotations

import threading


class PinPulser:
    """Every *every_s* seconds, hold *pin* at its active level for *hold_s*, then release it.

    *active_low*: the input is pulled up and activates when driven low (a button to ground, an IR
    break-beam receiver); otherwise it activates when driven high (a PIR's output).
    """

    def __init__(self, pin, active_low: bool, every_s: float, hold_s: float = 0.2):
        self.pin, self.active_low, self.every_s, self.hold_s = pin, active_low, every_s, hold_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"pulse-{pin}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        press, release = ((self.pin.drive_low, self.pin.drive_high) if self.active_low
                          else (self.pin.drive_high, self.pin.drive_low))
        while not self._stop.wait(self.every_s):
            press()
            self._stop.wait(self.hold_s)
            release()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
