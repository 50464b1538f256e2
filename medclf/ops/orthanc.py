"""A local Orthanc PACS with its DICOMweb plugin, for tests, benchmarks and development.

Like medclf.ops.devserver's S3 server: its own process, a generated config (free ports, a fresh
storage folder, authentication on with one user), stopped on exit. Needs the Debian packages
`orthanc` and `orthanc-dicomweb` (`make system-deps`). Orthanc 1.10 has no setting for the HTTP
bind address: it listens on every interface, and `RemoteAccessAllowed: false` makes it refuse every
client but 127.0.0.1; its DICOM (DIMSE) server is turned off, since medclf speaks DICOMweb only.
"""

from __future__ import annotations

import base64
import glob
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from typing import Optional

from medclf.ops.devserver import _free_port

PLUGIN_GLOBS = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so*", "/usr/lib/orthanc/libOrthancDicomWeb.so*",
                "/usr/lib/*/orthanc/libOrthancDicomWeb.so*", "/usr/local/share/orthanc/plugins/libOrthancDicomWeb.so*")


def orthanc_binary() -> Optional[str]:
    return shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc",) if os.path.exists(p)), None)


def dicomweb_plugin() -> Optional[str]:
    for pattern in PLUGIN_GLOBS:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


def missing() -> Optional[str]:
    """Why no local Orthanc can start here (None: it can)."""
    if orthanc_binary() is None:
        return "the Orthanc binary is not installed (Debian: apt-get install orthanc orthanc-dicomweb; `make system-deps`)"
    if dicomweb_plugin() is None:
        return "Orthanc's DICOMweb plugin is not installed (Debian: apt-get install orthanc-dicomweb)"
    return None


class LocalOrthanc:
    """`start()`, `stop()` (graceful) or `kill()`, and `start()` again on the same ports and storage."""

    def __init__(self, user: str, password: str, folder: Optional[str] = None, lua: Optional[str] = None):
        reason = missing()
        if reason:
            raise RuntimeError(reason)
        self.user, self.password = user, password
        self._own_folder = folder is None
        self.folder = folder or tempfile.mkdtemp(prefix="medclf-orthanc-")
        os.makedirs(self.folder, exist_ok=True)
        self.http_port, self.dicom_port = _free_port(), _free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.dicomweb = f"{self.url}/dicom-web"
        config = {
            "Name": "medclf-test",
            "StorageDirectory": os.path.join(self.folder, "db"),
            "IndexDirectory": os.path.join(self.folder, "db"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomServerEnabled": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {user: password},
            "HttpThreadsCount": 8,
            "StableAge": 1,  # seconds before a series counts as received whole (the arrival increment reads it)
            "Plugins": [dicomweb_plugin()],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "Ssl": False},
        }
        if lua:
            with open(os.path.join(self.folder, "filter.lua"), "w") as f:
                f.write(lua)
            config["LuaScripts"] = [os.path.join(self.folder, "filter.lua")]
        self.config_path = os.path.join(self.folder, "orthanc.json")
        with open(self.config_path, "w") as f:
            json.dump(config, f, indent=1)
        self.proc: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 60.0) -> "LocalOrthanc":
        log = open(os.path.join(self.folder, "orthanc.log"), "ab")
        self.proc = subprocess.Popen([orthanc_binary(), self.config_path], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while True:
            try:
                self.rest("GET", "/system")
                return self
            except Exception:
                if time.time() > deadline or self.proc.poll() is not None:
                    self.kill()
                    raise RuntimeError(f"Orthanc did not start on {self.url} (log: {self.folder}/orthanc.log)") from None
                time.sleep(0.2)

    def rest(self, method: str, path: str, body: Optional[bytes] = None):
        """Orthanc's own REST API (not DICOMweb), for test set-up: upload, delete, list."""
        req = urllib.request.Request(self.url + path, data=body, method=method)
        token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(req, timeout=30) as resp:
            data = resp.read()
        return json.loads(data) if data else None

    def upload(self, dicom: bytes) -> dict:
        return self.rest("POST", "/instances", dicom)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.running():
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        if self.running():
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        self.stop()
        if self._own_folder:
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "LocalOrthanc":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
