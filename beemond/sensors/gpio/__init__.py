"""The gpio sensor: driver, emulator and config section."""
