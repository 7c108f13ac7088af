"""DICOMweb series as slides: a locator that travels as a slide path, the HTTP session, and opening.

A slide CSV row with ``slide_id, dicomweb_url, study_uid, series_uid`` becomes the slide path
``dicomweb+<url>/studies/<study>/series/<series>``, which every stage passes around like a file path (it
survives ``pathlib.Path``: the parser accepts the collapsed ``//``). Tiles are read over HTTP by wsidicom
through dicomweb-client.

Credentials come from the environment only, never from the command line, the config or the manifest:
``WSI_MIL_DICOMWEB_TOKEN`` (sent as ``Authorization: Bearer``), or ``WSI_MIL_DICOMWEB_TOKEN_FILE`` (a file
holding the token), or ``WSI_MIL_DICOMWEB_USER`` with ``WSI_MIL_DICOMWEB_PASSWORD`` (HTTP basic). Transient
failures (connection errors, 429, 500, 502, 503, 504) are retried ``WSI_MIL_DICOMWEB_RETRIES`` times
(default 3) with exponential backoff from ``WSI_MIL_DICOMWEB_BACKOFF`` seconds (default 0.5: waits 0.5, 1,
2 s); a server that stays away fails the slide (a rerun reads it again); a refusal (401, 403, 404) fails the slide with one line that names the status and the series,
never a credential.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import SlideError, SourceUnavailable

PREFIX = "dicomweb+"


def retries() -> int:
    return int(os.environ.get("WSI_MIL_DICOMWEB_RETRIES", "3"))


def backoff_s() -> float:
    return float(os.environ.get("WSI_MIL_DICOMWEB_BACKOFF", "0.5"))

_LOCATOR = re.compile(r"^dicomweb\+(https?):/+(.+?)/studies/([^/]+)/series/([^/]+)$")


@dataclass(frozen=True)
class Series:
    url: str  # the DICOMweb root, e.g. http://host:8042/dicom-web
    study_uid: str
    series_uid: str

    @property
    def locator(self) -> str:
        return f"{PREFIX}{self.url}/studies/{self.study_uid}/series/{self.series_uid}"


def is_dicomweb(path) -> bool:
    return str(path).startswith(PREFIX)


def parse(path) -> Series:
    m = _LOCATOR.match(str(path))
    if m is None:
        raise SlideError(f"{path}: not a DICOMweb slide ({PREFIX}<url>/studies/<uid>/series/<uid>)")
    scheme, rest, study, series = m.groups()
    return Series(f"{scheme}://{rest}", study, series)


def slide_exists(path) -> bool:
    """A local slide file or folder that exists, or a DICOMweb series (checked when it is opened)."""
    return is_dicomweb(path) or Path(path).exists()


def _auth(session) -> None:
    env = os.environ
    token = env.get("WSI_MIL_DICOMWEB_TOKEN")
    if not token and env.get("WSI_MIL_DICOMWEB_TOKEN_FILE"):
        try:
            token = Path(env["WSI_MIL_DICOMWEB_TOKEN_FILE"]).read_text().strip()
        except OSError as exc:
            raise SlideError(f"WSI_MIL_DICOMWEB_TOKEN_FILE: cannot read it ({exc.strerror})") from None
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    elif env.get("WSI_MIL_DICOMWEB_USER"):
        session.auth = (env["WSI_MIL_DICOMWEB_USER"], env.get("WSI_MIL_DICOMWEB_PASSWORD", ""))


def session():
    """A requests session with the environment's credentials and retries with backoff on transient errors."""
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    s = requests.Session()
    n = retries()
    retry = Retry(total=n, connect=n, read=n, status=n, backoff_factor=backoff_s(),
                  status_forcelist=(429, 500, 502, 503, 504), allowed_methods=("GET", "HEAD"),
                  raise_on_status=False)
    for scheme in ("http://", "https://"):
        s.mount(scheme, HTTPAdapter(max_retries=retry))
    _auth(s)
    return s


WHY = {401: "credentials refused (set WSI_MIL_DICOMWEB_TOKEN, or WSI_MIL_DICOMWEB_USER and _PASSWORD)",
       403: "forbidden", 404: "no such study or series"}


def _refused(series: Series, code) -> SlideError:
    return SlideError(f"DICOMweb server {series.url} answered {code}: {WHY.get(code, 'error')} "
                      f"(series {series.series_uid})")


def _check(http, series: Series) -> None:
    """Ask for the series' instances first (QIDO-RS), so a refusal or a missing series is one clear line
    rather than whatever the reading library makes of it."""
    url = f"{series.url}/studies/{series.study_uid}/series/{series.series_uid}/instances"
    r = http.get(url, headers={"Accept": "application/dicom+json"}, timeout=60)
    if r.status_code in WHY or r.status_code >= 400:
        raise _refused(series, r.status_code)
    if r.status_code == 204 or not r.content.strip() or r.json() == []:
        raise _refused(series, 404)


def open_series(path):
    """The series as an open ``WsiDicom``; a refusal or an unreachable server is one line (no credentials)."""
    import requests
    from dicomweb_client.api import DICOMwebClient
    from wsidicom import WsiDicom, WsiDicomWebClient

    series = parse(path)
    try:
        http = session()
        _check(http, series)
        web = DICOMwebClient(series.url, session=http)
        web.set_http_retry_params(retry=False)  # one retry policy, ours (its own would wait 15 s more per read)
        client = WsiDicomWebClient(web)
        return WsiDicom.open_web(client, series.study_uid, series.series_uid)
    except requests.HTTPError as exc:
        raise _refused(series, exc.response.status_code if exc.response is not None else "?") from None
    except requests.RequestException as exc:
        raise SourceUnavailable(f"DICOMweb server {series.url} unreachable after {retries()} retries "
                                f"({type(exc).__name__}; series {series.series_uid})") from None


def from_csv_row(row: dict, name: str, line: int) -> Series:
    missing = [c for c in ("dicomweb_url", "study_uid", "series_uid") if not str(row.get(c) or "").strip()]
    if missing:
        raise SlideError(f"{name} line {line}: empty {', '.join(missing)} for a DICOMweb slide")
    url = str(row["dicomweb_url"]).strip().rstrip("/")
    if not re.match(r"^https?://[^/\s]+", url):
        raise SlideError(f"{name} line {line}: dicomweb_url {url!r} is not an http:// or https:// address")
    return Series(url, str(row["study_uid"]).strip(), str(row["series_uid"]).strip())
