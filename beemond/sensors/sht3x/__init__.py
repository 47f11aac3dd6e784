"""The sht3x sensor: driver, emulator and config section."""
