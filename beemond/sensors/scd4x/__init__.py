"""Sensirion SCD4x (SCD40/SCD41) CO2, temperature and humidity sensor, in one package.

- :mod:`.chip`: datasheet logic (commands, timings, CRC-8, conversions, ranges), no I/O;
- :mod:`.driver`: the chip through an ``smbus2.SMBus``-compatible bus (``i2c_rdwr``), periodic or
  single-shot measurement;
- :mod:`.worker`: the polled sensor worker (records, plausibility limits, samples for the metrics);
- :mod:`.emulator`: the chip's command state machine behind ``EmulatedSMBus``, for simulation and tests;
- :mod:`.source`: the simulated CO2 signal (a synthetic daily colony-respiration curve).

``section`` holds the ``[sensors.NAME]`` table's class and ``example.toml`` a config snippet. Importing the
package imports none of them: ``Section`` and ``Worker`` load on first use (:func:`beemond.registry.exports`).
"""

from beemond.registry import exports

__getattr__ = exports(__name__, Section=".section:SCD4xConfig", Worker=".driver:SCD4xWorker")
