"""GPIO (beemond.sensors.gpio.driver) through gpiozero's MockFactory: inputs to capture requests, the status LED,
sensor power switching, config checks, and a button press reaching the camera in the real daemon."""

from __future__ import annotations

import copy
import csv
import io
import json
import multiprocessing
import queue
import shutil
import threading
import time

import pytest

from beemond import config, ipc
from beemond.sensors.camera.emulator import decode_jpeg
from beemond.sensors.gpio.driver import BLINK_ERROR, GpioWorker
from beemond.sensors.sht3x.driver import SHT3xWorker
from beemond.spool import Spool
from conftest import AGE, DATA, decrypt_with_age, make_config, wait_for

GPIO = {"sensors.hive_gpio": None, "sensors.gpio.type": "gpio", "sensors.gpio.backend": "simulated", "sensors.gpio.record_window_s": 0.5,
        "sensors.gpio.inputs": {"door": {"pin": 17, "kind": "button", "targets": ["hive_climate"], "cooldown_s": 30},
                                "pir": {"pin": 27, "kind": "motion", "targets": ["hive_climate", "hive_audio"],
                                        "cooldown_s": 0}}}


class Rig:
    """A worker on a real ipc.Channel, run in a thread; events read from its pipe."""

    def __init__(self, cfg, name: str, cls):
        self.sensor = next(s for s in cfg.sensors if s.name == name)
        self.commands: queue.Queue = queue.Queue()
        self.reader, writer = multiprocessing.Pipe(duplex=False)
        self.worker = cls(cfg, self.sensor, ipc.Channel(name, self.commands, writer, 0.2))
        self.staging = Spool(cfg.spool).staging_dir(name)
        self.events: list[ipc.Event] = []
        self.thread = threading.Thread(target=self.worker.run)
        self.thread.start()

    def stop(self) -> None:
        self.commands.put(ipc.Shutdown())
        self.thread.join(20)
        assert not self.thread.is_alive()

    def drain(self, kind: str) -> list[ipc.Event]:
        while self.reader.poll():
            self.events.append(self.reader.recv())
        return [e for e in self.events if e.kind == kind]


def test_inputs_send_capture_requests_with_cooldown_and_are_recorded(tmp_path, keys, password_file):
    cfg = config.load(make_config(tmp_path, keys, password_file, 21, **copy.deepcopy(GPIO)))
    rig = Rig(cfg, "gpio", GpioWorker)
    door = rig.worker.devices["door"].pin
    pir = rig.worker.devices["pir"].pin
    try:
        door.drive_low()     # pressed: the button is pulled up and wired to ground
        wait_for(lambda: rig.drain(ipc.CAPTURE_REQUEST), 5, "a capture request")
        door.drive_high()
        door.drive_low()     # pressed again within cooldown_s: recorded, not sent
        door.drive_high()
        # gpiozero takes a MotionSensor's first sample as its initial state, not as an edge: wait for it
        assert rig.worker.devices["pir"].wait_for_no_motion(5)
        pir.drive_high()     # a PIR output is active high
        wait_for(lambda: len(rig.drain(ipc.CAPTURE_REQUEST)) >= 2, 5, "the PIR's capture request")
        wait_for(lambda: list(rig.staging.glob("*.csv")), 5, "the input event record")
    finally:
        rig.stop()
    requests = rig.drain(ipc.CAPTURE_REQUEST)
    assert [r.targets for r in requests] == [["hive_climate"], ["hive_climate", "hive_audio"]]
    assert requests[0].reason == "gpio.door (button)"
    rows = []
    for path in sorted(rig.staging.glob("*.csv")):
        rows += list(csv.DictReader(io.StringIO(path.read_text())))
    assert [(r["input"], r["pin"], r["action"]) for r in rows] == [
        ("door", "17", "sent"), ("door", "17", "cooldown"), ("pir", "27", "sent")]


def test_status_led_blinks_while_running_and_faster_after_an_error(tmp_path, keys, password_file):
    cfg = config.load(make_config(tmp_path, keys, password_file, 21, **copy.deepcopy(GPIO), **{"sensors.gpio.status_led_pin": 22}))
    rig = Rig(cfg, "gpio", GpioWorker)
    led = rig.worker.led.pin
    try:
        wait_for(lambda: len(led.states) >= 3, 5, "the LED to blink")
        assert [s.state for s in led.states[:3]] == [False, True, False]
        # Make the next record unwritable: the staging directory becomes a file.
        shutil.rmtree(rig.staging)
        rig.staging.write_text("")
        rig.worker.devices["door"].pin.drive_low()
        wait_for(lambda: rig.drain(ipc.ERROR), 5, "the record write error")
        wait_for(lambda: rig.worker.pattern == BLINK_ERROR, 5, "the error pattern")
        led.clear_states()
        wait_for(lambda: len(led.states) >= 5, 3, "fast blinking")
        offs = [s.timestamp for s in led.states[1:5] if not s.state]
        assert offs and all(t < 0.5 for t in offs), "0.1 s on / 0.1 s off after the error"
    finally:
        rig.stop()
    assert led.state is False, "the LED is off at shutdown"


def test_power_pin_is_on_for_the_lead_time_before_a_measurement_and_off_after(tmp_path, keys, password_file):
    cfg = config.load(make_config(tmp_path, keys, password_file, 21, **{
        "sensors.hive_climate.interval_s": 3600, "sensors.hive_climate.record_window_s": 3600,
        "sensors.hive_climate.power_pin": 5,
        "sensors.hive_climate.power_lead_s": 0.3}))
    rig = Rig(cfg, "hive_climate", SHT3xWorker)
    pin = rig.worker.power.device.pin
    try:
        wait_for(lambda: rig.drain(ipc.SAMPLE), 5, "the first measurement")  # at start
        wait_for(lambda: len(pin.states) >= 3, 5, "power off after it")
        rig.commands.put(ipc.CaptureNow())
        wait_for(lambda: len(rig.drain(ipc.SAMPLE)) >= 2, 5, "a measurement on demand")
        wait_for(lambda: len(pin.states) >= 5, 5, "power off after it")
    finally:
        rig.stop()
    states = [s.state for s in pin.states]
    assert states[:5] == [False, True, False, True, False], states
    on_durations = [pin.states[i].timestamp for i in (2, 4)]  # time spent on before each off
    assert all(0.3 <= d < 1.0 for d in on_durations), on_durations


@pytest.mark.parametrize("over, key, words", [
    ({"sensors.gpio.inputs.door.targets": ["nope"]}, "sensors.gpio.inputs.door.targets", "no sensor 'nope'"),
    ({"sensors.gpio.inputs.pir.pin": 17}, "sensors.gpio.inputs.pir.pin", "GPIO17 is already used"),
    ({"sensors.hive_climate.power_pin": 27}, "sensors.gpio.inputs.pir.pin", "GPIO27 is already used"),
    ({"sensors.gpio.inputs.door.pin": 28}, "sensors.gpio.inputs.door.pin", "must be <= 27"),
    ({"sensors.gpio.inputs.door.kind": "lever"}, "sensors.gpio.inputs.door.kind", "allowed: button, motion, beam"),
    ({"sensors.gpio.backend": "hardware", "sensors.gpio.inputs.door.trigger_every_s": 1},
     "sensors.gpio.inputs.door.trigger_every_s", "only a simulated backend"),
])
def test_config_errors_name_the_key(tmp_path, keys, password_file, over, key, words):
    path = make_config(tmp_path, keys, password_file, 21, **{**copy.deepcopy(GPIO), **over})
    with pytest.raises(config.ConfigError) as err:
        config.load(path)
    assert err.value.key == key and words in err.value.message, str(err.value)


@pytest.mark.slow
@pytest.mark.skipif(AGE is None, reason="the stock age CLI is not installed")
def test_daemon_button_press_makes_the_camera_take_a_still(tmp_path, keys, password_file, daemons):
    cfg = make_config(tmp_path, keys, password_file, 21, **{
        "upload.protocol": "none",
        "sensors.hive_audio.enabled": False, "sensors.hive_scale": None, "processors": None,  # less load
        "sensors.hive_cam.width": 160, "sensors.hive_cam.height": 120,
        "sensors.hive_cam.still_interval_s": 0, "sensors.hive_cam.clip_interval_s": 0,
        "sensors.hive_cam.daylight_only": False,
        "sensors.hive_gpio.inputs.entrance.trigger_every_s": 1.5,
        "sensors.hive_gpio.inputs.entrance.cooldown_s": 0})
    d = daemons(cfg, tmp_path / "daemon.log", duration=9)
    assert d.wait() == 0, d.log()
    records = []
    for bundle in sorted((tmp_path / "spool" / "outbox").glob("*.tar.age")):
        got = decrypt_with_age(bundle, keys["identity"])
        records += [(r, got["members"][r["path"]]) for r in got["manifest"]["records"]]
    stills = [(r, data) for r, data in records if r["sensor"] == "hive_cam"]
    presses = [(r, data) for r, data in records if r["sensor"] == "hive_gpio"]
    assert stills, d.log()
    assert all(r["metadata"]["reason"] == "hive_gpio.entrance (button)" for r, _ in stills)
    assert decode_jpeg(stills[0][1]).shape == (120, 160, 3)
    rows = [row for _, data in presses for row in csv.DictReader(io.StringIO(data.decode()))]
    assert len(rows) >= len(stills) and all(row["action"] == "sent" for row in rows)


def test_ini_config_with_input_sections(tmp_path):
    from beemond.bundle import crypto

    _ident, rcpt, _pub = crypto.keygen(tmp_path / "keys")
    ini = tmp_path / "beemond.ini"
    ini.write_text(f"""[daemon]
spool_dir = {tmp_path / 'spool'}
[bundle]
recipients = {rcpt}
[upload]
protocol = none
[sensor.cam]
type = camera
backend = simulated
[sensor.io]
type = gpio
backend = simulated
status_led_pin = 22
[sensor.io.inputs.door]
pin = 17
kind = beam
targets = cam
pull_up = no
""")
    cfg = config.load(ini)
    io_ = next(s for s in cfg.sensors if s.name == "io")
    door = io_.inputs["door"]
    assert (door.pin, door.kind, door.targets, door.pull_up) == (17, "beam", ("cam",), False)
    assert io_.gpio_pins() == {"status_led_pin": 22, "inputs.door.pin": 17}
