"""The audio sensor: driver, emulator and config section."""
