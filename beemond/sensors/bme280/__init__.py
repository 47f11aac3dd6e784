"""The bme280 sensor: driver, emulator and config section."""
