"""The ds18b20 sensor: driver, emulator and config section."""
