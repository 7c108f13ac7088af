"""A throwaway Orthanc (Debian's ``orthanc`` + ``orthanc-dicomweb``) on 127.0.0.1, for the DICOMweb tests
and the bench: its own storage folder, HTTP basic auth, DICOMweb at ``/dicom-web``; started, filled with
DICOM files and stopped by the caller. Nothing listens beyond loopback (``RemoteAccessAllowed: false``)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
FIX = "apt-get install -y orthanc orthanc-dicomweb (make test does it when run as root)"


def missing() -> str | None:
    """Why Orthanc cannot run here (one line with the fix), or None."""
    if shutil.which("Orthanc") is None:
        return f"Orthanc is not installed: {FIX}"
    if not PLUGIN.exists():
        return f"Orthanc's DICOMweb plugin is not installed: {FIX}"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Orthanc:
    def __init__(self, folder: Path, user: str = "wsi", password: str = "orthanc-test-pw"):
        self.folder, self.user, self.password = Path(folder), user, password
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.root}/dicom-web"

    def start(self, timeout: float = 30.0) -> Orthanc:
        import requests

        config = {"Name": "wsi_mil_test", "StorageDirectory": str(self.folder / "db"),
                  "IndexDirectory": str(self.folder / "db"), "HttpPort": self.port, "DicomServerEnabled": False,
                  "RemoteAccessAllowed": False, "AuthenticationEnabled": True,
                  "RegisteredUsers": {self.user: self.password}, "Plugins": [str(PLUGIN)],
                  "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}, "HttpCompressionEnabled": False}
        cfg = self.folder / "orthanc.json"
        cfg.write_text(json.dumps(config))
        log = (self.folder / "orthanc.log").open("ab")
        self.proc = subprocess.Popen(["Orthanc", str(cfg)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if requests.get(f"{self.root}/system", auth=(self.user, self.password), timeout=1).ok:
                    return self
            except requests.RequestException:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not start on {self.root}; see {self.folder / 'orthanc.log'}")

    def upload(self, folder: Path) -> None:
        import requests

        for f in sorted(Path(folder).iterdir()):
            r = requests.post(f"{self.root}/instances", data=f.read_bytes(), auth=(self.user, self.password),
                              timeout=60)
            r.raise_for_status()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
