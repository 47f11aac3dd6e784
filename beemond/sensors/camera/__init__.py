"""The camera sensor: driver, emulator and config section."""
