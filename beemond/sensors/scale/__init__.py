"""The scale sensor: driver, emulator and config section."""
