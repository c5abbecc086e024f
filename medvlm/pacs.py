"""DICOMweb access to a PACS: search (QIDO-RS), retrieve (WADO-RS) with a local cache, and store (STOW-RS).

:class:`PacsClient` wraps ``dicomweb_client.DICOMwebClient`` (the ``pacs`` extra: ``pip install dicomweb-client``)
and turns everything that can go wrong on the wire into an :class:`~medvlm.errors.InputError` that says what was
expected, what came back and what to do:

- **auth**: HTTP basic (user + password) or a bearer token (:class:`PacsAuth`, from the command line or the
  environment: ``MEDVLM_PACS_USER`` / ``MEDVLM_PACS_PASSWORD`` / ``MEDVLM_PACS_TOKEN``). Secrets never appear in
  a message, a log line or a ``repr``; a URL with ``user:password@`` in it is refused (it would end up in the shell
  history and the process list).
- **retries**: connection failures, timeouts and HTTP 408 / 429 / 500 / 502 / 503 / 504 are retried a bounded
  number of times (``retries``) with exponential backoff (``backoff_s``, doubled each time); 401 / 403 / 404 and
  the other 4xx are final at once.
- **cache**: retrieved instances are kept as ``<SOP Instance UID>.dcm`` under ``$MEDVLM_HOME/pacs`` or
  ``~/.cache/medvlm/pacs`` (folder mode 0700, files 0600: they hold patient data), so a second run on the same
  series asks the PACS only for the list of instances.

:func:`select_series` picks the series a command works on (the one given, or the only image series of the study)
and :func:`check_seg` checks a DICOM SEG before it is stored. :func:`seg_overlay` draws a SEG retrieved from the
PACS over its source image (:mod:`medvlm.viz`).

This module is the core: it moves DICOM objects; segmenting and report linking live in the packages above, and
the commands in :mod:`medvlm.app.pacs_commands`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from medvlm.errors import input_error, missing_dependency

__all__ = [
    "ENV_PASSWORD",
    "ENV_TOKEN",
    "ENV_USER",
    "NON_IMAGE_MODALITIES",
    "RADIOGRAPH_MODALITIES",
    "VOLUME_MODALITIES",
    "PacsAuth",
    "PacsClient",
    "SeriesInfo",
    "StoredInstance",
    "StudyInfo",
    "check_seg",
    "check_url",
    "default_cache_dir",
    "parse_since",
    "redact_url",
    "resolve_auth",
    "seg_overlay",
    "select_series",
]

ENV_USER, ENV_PASSWORD, ENV_TOKEN = "MEDVLM_PACS_USER", "MEDVLM_PACS_PASSWORD", "MEDVLM_PACS_TOKEN"
INSTALL = "pip install dicomweb-client  (or: pip install 'medvlm[pacs]')"

#: series segmented as a volume (segmentation.volume) / image by image (the 2D text-guided segmenter)
VOLUME_MODALITIES = ("CT", "MR")
RADIOGRAPH_MODALITIES = ("CR", "DX")
#: series that hold no image to segment or ground (results of earlier runs, reports, presentation states)
NON_IMAGE_MODALITIES = frozenset({"SEG", "SR", "RTSTRUCT", "RTPLAN", "RTRECORD", "PR", "KO", "REG", "DOC", "PLAN"})

#: HTTP statuses worth another try (the server may recover); every other error status is final
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_log = logging.getLogger(__name__)
T = TypeVar("T")


# --------------------------------------------------------------------------------------------------- auth, URL


@dataclass(frozen=True)
class PacsAuth:
    """Credentials for the PACS: HTTP basic (``user`` + ``password``) or a bearer ``token``, or none.

    The secrets are kept out of ``repr`` (and so out of tracebacks and logs); :meth:`describe` names the method.
    """

    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)

    def describe(self) -> str:
        """How the requests authenticate, without the secret: for messages."""
        if self.token:
            return "a bearer token"
        if self.user:
            return f"HTTP basic authentication as user {self.user!r}"
        return "no credentials"


def resolve_auth(user: str | None = None, password: str | None = None, token: str | None = None,
                 env: Mapping[str, str] | None = None) -> PacsAuth:
    """The credentials to use: the arguments, each falling back to its environment variable
    (:data:`ENV_USER`, :data:`ENV_PASSWORD`, :data:`ENV_TOKEN`). A token and a user together, or a user without a
    password (or the reverse), are refused."""
    environ = os.environ if env is None else env
    user = user or environ.get(ENV_USER) or None
    password = password or environ.get(ENV_PASSWORD) or None
    token = token or environ.get(ENV_TOKEN) or None
    if token and (user or password):
        raise input_error("PACS credentials", expected="either --user/--password (HTTP basic) or --token (bearer)",
                          received="both a token and a user or password (arguments or "
                                   f"{ENV_USER}/{ENV_PASSWORD}/{ENV_TOKEN})",
                          fix="pass one kind of credentials; unset the environment variable you do not mean")
    if bool(user) != bool(password):
        given, missing = ("--user", f"--password or {ENV_PASSWORD}") if user else \
            ("--password", f"--user or {ENV_USER}")
        raise input_error("PACS credentials", expected="a user and a password together (HTTP basic)",
                          received=f"{given} without a {'password' if user else 'user'}",
                          fix=f"add {missing} (the environment variable keeps the password off the command line)")
    return PacsAuth(user=user, password=password, token=token)


def redact_url(url: str) -> str:
    """``url`` without any ``user:password@`` part and without its query string: safe to print."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<invalid URL>"
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = host + (f":{port}" if port else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def check_url(url: str) -> str:
    """The DICOMweb base URL without a trailing slash; refuses what is not ``http(s)://host[:port]/path`` and a URL
    that carries credentials."""
    text = (url or "").strip()
    try:
        parts = urllib.parse.urlsplit(text)
        parts.port  # noqa: B018  (raises ValueError on a bad port)
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise input_error("--url", expected="the DICOMweb base URL, e.g. http://pacs.example.org:8042/dicom-web",
                          received=repr(redact_url(text) if parts is not None else "<unparseable URL>"),
                          fix="pass the http(s) URL the PACS serves QIDO-RS/WADO-RS/STOW-RS under")
    if parts.username or parts.password:
        raise input_error("--url", expected="a URL without credentials",
                          received=f"a URL with a user{' and a password' if parts.password else ''} in it "
                                   f"({redact_url(text)})",
                          fix=f"drop them from the URL and pass --user with {ENV_PASSWORD} (or --token / "
                              f"{ENV_TOKEN}); a URL ends up in the shell history and the process list")
    return text.rstrip("/")


def default_cache_dir() -> Path:
    """``$MEDVLM_HOME/pacs`` when MEDVLM_HOME is set, else ``~/.cache/medvlm/pacs``."""
    home = os.environ.get("MEDVLM_HOME")
    base = Path(home).expanduser() if home else Path.home() / ".cache" / "medvlm"
    return base / "pacs"


def parse_since(text: str | None) -> str | None:
    """``--since YYYYMMDD`` -> the QIDO StudyDate range ``YYYYMMDD-``; None stays None."""
    if text is None:
        return None
    value = text.strip()
    try:
        if not re.fullmatch(r"\d{8}", value):
            raise ValueError(value)
        datetime.strptime(value, "%Y%m%d")
    except ValueError:
        raise input_error("--since", expected="a date YYYYMMDD (e.g. 20240131)", received=repr(text),
                          fix="write the date as eight digits, year month day") from None
    return f"{value}-"


# ------------------------------------------------------------------------------------------------- results


@dataclass
class SeriesInfo:
    """One series as QIDO-RS lists it."""

    study_uid: str
    series_uid: str
    modality: str
    number: int | None = None
    description: str = ""
    n_instances: int | None = None

    def label(self) -> str:
        parts = [f"#{self.number}" if self.number is not None else "", self.modality or "?"]
        if self.description:
            parts.append(repr(self.description))
        if self.n_instances is not None:
            parts.append(f"{self.n_instances} instance(s)")
        return " ".join(p for p in parts if p) + f" (series {self.series_uid})"


@dataclass
class StudyInfo:
    """One study as QIDO-RS lists it, with its series."""

    study_uid: str
    date: str = ""
    patient_id: str = ""
    modalities: list[str] = field(default_factory=list)
    description: str = ""
    series: list[SeriesInfo] = field(default_factory=list)


@dataclass
class StoredInstance:
    """What STOW-RS accepted: one instance."""

    sop_class_uid: str
    sop_instance_uid: str
    series_uid: str
    study_uid: str
    modality: str


def _value(item: Mapping[str, Any], tag: str) -> Any:
    """First value of ``tag`` (8 hex digits) in a DICOM JSON object, None when absent."""
    entry = item.get(tag) or {}
    values = entry.get("Value") if isinstance(entry, Mapping) else None
    if not values:
        return None
    first = values[0]
    if isinstance(first, Mapping):  # person name
        return first.get("Alphabetic", "")
    return first


def _text(item: Mapping[str, Any], tag: str) -> str:
    value = _value(item, tag)
    return "" if value is None else str(value)


def _int(item: Mapping[str, Any], tag: str) -> int | None:
    value = _value(item, tag)
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def _all_values(item: Mapping[str, Any], tag: str) -> list[str]:
    entry = item.get(tag) or {}
    values = entry.get("Value") if isinstance(entry, Mapping) else None
    return [str(v) for v in values or []]


_STUDY_UID, _SERIES_UID, _SOP_UID, _SOP_CLASS = "0020000D", "0020000E", "00080018", "00080016"
_MODALITY, _MODALITIES, _STUDY_DATE, _PATIENT_ID = "00080060", "00080061", "00080020", "00100020"
_SERIES_NUMBER, _SERIES_DESCRIPTION, _STUDY_DESCRIPTION, _N_SERIES_INSTANCES = "00200011", "0008103E", \
    "00081030", "00201209"


def _series_info(item: Mapping[str, Any], study_uid: str) -> SeriesInfo:
    return SeriesInfo(study_uid=_text(item, _STUDY_UID) or study_uid, series_uid=_text(item, _SERIES_UID),
                      modality=_text(item, _MODALITY).upper(), number=_int(item, _SERIES_NUMBER),
                      description=_text(item, _SERIES_DESCRIPTION), n_instances=_int(item, _N_SERIES_INSTANCES))


def _check_uid(uid: str, what: str) -> str:
    text = str(uid or "").strip()
    if not (0 < len(text) <= 64 and _UID.match(text)):
        raise input_error(what, expected="a DICOM UID (digits and dots, at most 64 characters)",
                          received=repr(text[:80]), fix="copy the UID from `medvlm pacs find`")
    return text


# ----------------------------------------------------------------------------------------------- the client


class _BearerAuth:
    """``Authorization: Bearer <token>`` on every request (a requests auth callable; the token stays private)."""

    def __init__(self, token: str) -> None:
        self._token = token

    def __call__(self, request: Any) -> Any:
        request.headers["Authorization"] = f"Bearer {self._token}"
        return request

    def __repr__(self) -> str:
        return "_BearerAuth(<token>)"


class PacsClient:
    """A DICOMweb PACS at ``url`` (the base URL: QIDO/WADO/STOW paths hang below it, e.g. Orthanc's
    ``http://host:8042/dicom-web``).

    ``timeout_s``: per HTTP request (connect and read). ``retries``: further attempts after a retriable failure
    (connection refused or reset, timeout, HTTP 408/429/5xx), waiting ``backoff_s``, then twice that, ...
    ``cache_dir``: where retrieved instances are kept (default :func:`default_cache_dir`). ``sleep``: the wait
    function (default ``time.sleep``; tests pass a fake).
    """

    def __init__(self, url: str, auth: PacsAuth | None = None, *, timeout_s: float = 30.0, retries: int = 3,
                 backoff_s: float = 1.0, cache_dir: str | os.PathLike[str] | None = None,
                 sleep: Callable[[float], None] | None = None) -> None:
        self.url = check_url(url)
        self.auth = auth or PacsAuth()
        if not (timeout_s > 0 and math.isfinite(timeout_s)):
            raise input_error("--timeout", expected="a positive number of seconds", received=str(timeout_s),
                              fix="use e.g. --timeout 30")
        if not 0 <= int(retries) <= 10:
            raise input_error("--retries", expected="0 to 10 further attempts", received=str(retries),
                              fix="use e.g. --retries 3")
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.backoff_s = max(0.0, float(backoff_s))
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self._sleep = sleep or time.sleep  # looked up now, so that a test can patch time.sleep
        try:
            import requests
            from dicomweb_client.api import DICOMwebClient
        except ImportError as exc:
            raise missing_dependency("medvlm pacs (DICOMweb)", INSTALL) from exc
        session = requests.Session()
        if self.auth.token:
            session.auth = _BearerAuth(self.auth.token)
        elif self.auth.user and self.auth.password:
            session.auth = requests.auth.HTTPBasicAuth(self.auth.user, self.auth.password)
        self._client = DICOMwebClient(self.url, session=session, timeout=self.timeout_s)
        self._client.set_http_retry_params(retry=False)  # retried here, connection errors and timeouts included

    @property
    def where(self) -> str:
        """The PACS URL, safe to print."""
        return redact_url(self.url)

    # -------------------------------------------------------------------------------------- transport

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` (one DICOMweb transaction) with the bounded retries; map every failure to an InputError."""
        import requests
        from pydicom.errors import InvalidDicomError

        delay = self.backoff_s
        attempts = self.retries + 1
        for attempt in range(1, attempts + 1):
            try:
                return fn()
            except requests.HTTPError as exc:
                response = exc.response
                status = response.status_code if response is not None else 0
                if status in RETRY_STATUSES and attempt < attempts:
                    _log.warning("%s at %s: HTTP %s, retrying in %.1f s (attempt %d of %d)", what, self.where,
                                 status, delay, attempt + 1, attempts)
                    self._sleep(delay)
                    delay *= 2
                    continue
                raise self._http_error(what, status, response, attempt) from exc
            except (requests.ConnectionError, requests.Timeout) as exc:
                timeout = isinstance(exc, requests.Timeout)
                if attempt < attempts:
                    _log.warning("%s at %s: %s, retrying in %.1f s (attempt %d of %d)", what, self.where,
                                 "timed out" if timeout else "connection failed", delay, attempt + 1, attempts)
                    self._sleep(delay)
                    delay *= 2
                    continue
                kind = (f"no answer within {self.timeout_s:g} s" if timeout
                        else f"connection failed ({_reason(exc)})")
                raise input_error(f"PACS {self.where}", expected=f"a reachable DICOMweb server for {what}",
                                  received=f"{kind}, {attempts} attempt(s)",
                                  fix="check --url (host, port and the DICOMweb path, e.g. /dicom-web), that the "
                                      "PACS is running and reachable from here; raise --timeout for a slow PACS"
                                  ) from exc
            except (ValueError, InvalidDicomError) as exc:  # not DICOMweb (a web page, a proxy's error page)
                raise input_error(f"PACS {self.where}", expected=f"a DICOMweb answer to {what}",
                                  received=f"an answer that is not DICOMweb ({type(exc).__name__}: "
                                           f"{str(exc)[:200]})",
                                  fix="check that --url is the DICOMweb base URL (e.g. http://host:8042/dicom-web "
                                      "for Orthanc), not the web viewer's address"
                                      + ("; if it is, the PACS sent an instance that is not a DICOM Part 10 file "
                                         "(e.g. without its 128-byte preamble), which the PACS stored that way"
                                         if isinstance(exc, InvalidDicomError) else "")) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _http_error(self, what: str, status: int, response: Any, attempts: int) -> Exception:
        label = f"PACS {self.where}"
        reason = getattr(response, "reason", "") or ""
        received = f"HTTP {status} {reason}".strip()
        if status == 401:
            return input_error(label, expected=f"credentials the PACS accepts for {what}",
                               received=f"{received} with {self.auth.describe()}",
                               fix=f"pass --user and --password (or {ENV_USER} / {ENV_PASSWORD}) or --token (or "
                                   f"{ENV_TOKEN}) with valid credentials")
        if status == 403:
            return input_error(label, expected=f"permission for {what}",
                               received=f"{received} with {self.auth.describe()}",
                               fix="ask the PACS administrator for this right (read for find/retrieve, write for "
                                   "--store), or use an account that has it")
        if status == 404:
            return input_error(label, expected=f"the object of {what}", received=f"{received} (not found)",
                               fix="check the UIDs with `medvlm pacs find` and that --url is the DICOMweb base URL")
        if status == 413:
            return input_error(label, expected=f"the PACS to accept the upload ({what})",
                               received=f"{received} (the request is too large for the server)",
                               fix="raise the PACS's (or its proxy's) upload size limit")
        if status in RETRY_STATUSES:
            return input_error(label, expected=f"a working DICOMweb server for {what}",
                               received=f"{received} after {attempts} attempt(s)",
                               fix="the PACS (or a proxy in front of it) is failing or overloaded: try again "
                                   "later, raise --retries, or check the PACS's log")
        body = ""
        with contextlib.suppress(Exception):
            body = " ".join(str(response.text or "").split())[:160]
        return input_error(label, expected=f"the PACS to accept {what}",
                           received=received + (f": {body}" if body else ""),
                           fix="check the arguments (UIDs, filters) and the PACS's log")

    # -------------------------------------------------------------------------------------------- QIDO

    def find_studies(self, *, patient: str | None = None, modality: str | None = None, since: str | None = None,
                     limit: int = 100) -> list[StudyInfo]:
        """Studies matching the filters (QIDO-RS), each with its series; ``modality`` keeps only the studies (and
        series) of that modality; ``since`` is ``YYYYMMDD`` (studies on or after that day)."""
        filters: dict[str, Any] = {}
        if patient:
            filters["PatientID"] = patient
        if modality:
            filters["ModalitiesInStudy"] = modality.upper()
        date_range = parse_since(since)
        if date_range:
            filters["StudyDate"] = date_range
        items = self._call("QIDO-RS study search", lambda: self._client.search_for_studies(
            search_filters=filters or None, limit=limit,
            fields=["StudyDate", "PatientID", "ModalitiesInStudy", "StudyDescription"]))
        studies = []
        for item in items:
            uid = _text(item, _STUDY_UID)
            if not uid:
                continue
            study = StudyInfo(study_uid=uid, date=_text(item, _STUDY_DATE), patient_id=_text(item, _PATIENT_ID),
                              modalities=_all_values(item, _MODALITIES), description=_text(item, _STUDY_DESCRIPTION))
            study.series = [s for s in self.list_series(uid, must_exist=False)
                            if not modality or s.modality == modality.upper()]
            if modality and not study.series:
                continue  # a PACS that ignores ModalitiesInStudy: filtered here
            if patient and not any(c in patient for c in "*?") and study.patient_id not in ("", patient):
                continue  # a PACS that ignores PatientID
            studies.append(study)
        studies.sort(key=lambda s: (s.date, s.study_uid), reverse=True)
        return studies

    def list_series(self, study_uid: str, *, must_exist: bool = True) -> list[SeriesInfo]:
        """The series of a study (QIDO-RS), by series number. ``must_exist``: an unknown study is an error."""
        uid = _check_uid(study_uid, "--study")
        items = self._call(f"QIDO-RS series search of study {uid}", lambda: self._client.search_for_series(
            uid, fields=["Modality", "SeriesNumber", "SeriesDescription", "NumberOfSeriesRelatedInstances"]))
        series = [_series_info(item, uid) for item in items if _text(item, _SERIES_UID)]
        if not series and must_exist:
            raise input_error(f"study {uid}", expected=f"a study the PACS {self.where} holds",
                              received="no such study (QIDO-RS found no series)",
                              fix="check the Study Instance UID with `medvlm pacs find` (filters: --patient, "
                                  "--modality, --since)")
        series.sort(key=lambda s: (s.number if s.number is not None else 1 << 30, s.series_uid))
        return series

    def list_instances(self, study_uid: str, series_uid: str) -> list[str]:
        """SOP Instance UIDs of a series (QIDO-RS)."""
        study, series = _check_uid(study_uid, "--study"), _check_uid(series_uid, "--series")
        items = self._call(f"QIDO-RS instance search of series {series}",
                           lambda: self._client.search_for_instances(study, series, fields=["SOPInstanceUID"]))
        uids = [_text(item, _SOP_UID) for item in items]
        return [u for u in uids if u and _UID.match(u) and len(u) <= 64]

    # -------------------------------------------------------------------------------------------- WADO

    def cache_path(self, sop_instance_uid: str) -> Path:
        return self.cache_dir / f"{_check_uid(sop_instance_uid, 'SOP Instance UID')}.dcm"

    def retrieve_series(self, study_uid: str, series_uid: str) -> list[Path]:
        """The instances of a series as DICOM files in the cache (WADO-RS for those not there yet), in the order
        QIDO-RS lists them. Raises when the series holds no instance."""
        study, series = _check_uid(study_uid, "--study"), _check_uid(series_uid, "--series")
        uids = self.list_instances(study, series)
        if not uids:
            raise input_error(f"series {series}", expected=f"a series of study {study} with instances",
                              received="no instance (QIDO-RS found none)",
                              fix="check the UIDs with `medvlm pacs find`")
        missing = [u for u in uids if not self.cache_path(u).is_file()]
        if missing:
            _log.info("retrieving %d of %d instance(s) of series %s from %s", len(missing), len(uids), series,
                      self.where)
            if len(missing) == len(uids) or len(missing) > 8:
                datasets = self._call(f"WADO-RS retrieval of series {series}",
                                      lambda: self._client.retrieve_series(study, series))
            else:
                datasets = [self._retrieve_one(study, series, u) for u in missing]
            for ds in datasets:
                self._cache(ds)
        paths = [self.cache_path(u) for u in uids]
        absent = [p.stem for p in paths if not p.is_file()]
        if absent:
            raise input_error(f"series {series}", expected="every instance QIDO-RS lists to be retrievable",
                              received=f"{len(absent)} of {len(uids)} instance(s) not returned by WADO-RS, e.g. "
                                       f"{absent[0]}",
                              fix="the PACS may still be receiving the series: retry in a minute, or check its log")
        return paths

    def _retrieve_one(self, study: str, series: str, sop: str) -> Any:
        return self._call(f"WADO-RS retrieval of instance {sop}",
                          lambda: self._client.retrieve_instance(study, series, sop))

    def retrieve_instance(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> Any:
        """One instance as a pydicom Dataset (from the cache when there)."""
        path = self.cache_path(sop_instance_uid)
        if not path.is_file():
            study, series = _check_uid(study_uid, "--study"), _check_uid(series_uid, "--series")
            self._cache(self._retrieve_one(study, series, sop_instance_uid))
        import pydicom

        return pydicom.dcmread(str(path))

    def _cache(self, ds: Any) -> Path:
        """Write one retrieved dataset to the cache (private file, atomic rename)."""
        uid = str(getattr(ds, "SOPInstanceUID", "") or "")
        path = self.cache_path(uid)
        self.cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(prefix=f".{uid}.", suffix=".tmp", dir=self.cache_dir)  # mode 0600
        try:
            with os.fdopen(fd, "wb") as fh:
                ds.save_as(fh, enforce_file_format=True)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return path

    # -------------------------------------------------------------------------------------------- STOW

    def store(self, datasets: Sequence[Any]) -> list[StoredInstance]:
        """Store ``datasets`` with ONE STOW-RS request; returns what the PACS accepted. Raises when the PACS reports
        a failed instance (its Failed SOP Sequence), naming it and the reason."""
        if not datasets:
            return []
        files = [_as_part10(ds) for ds in datasets]
        response = self._call(f"STOW-RS of {len(datasets)} instance(s)",
                              lambda: self._client.store_instances(files))
        failed = list(getattr(response, "FailedSOPSequence", None) or [])
        if failed:
            reasons = "; ".join(f"{getattr(f, 'ReferencedSOPInstanceUID', '?')}: failure reason "
                                f"{getattr(f, 'FailureReason', '?')}" for f in failed[:4])
            raise input_error(f"PACS {self.where}", expected=f"the PACS to store all {len(datasets)} instance(s)",
                              received=f"{len(failed)} refused ({reasons})",
                              fix="check the PACS's log (0xA7xx: out of resources, 0xA9xx: data set does not "
                                  "match the SOP class, 0xC000: cannot understand)")
        accepted = {str(getattr(r, "ReferencedSOPInstanceUID", "")) for r in
                    (getattr(response, "ReferencedSOPSequence", None) or [])}
        out = []
        for ds in datasets:
            uid = str(ds.SOPInstanceUID)
            if accepted and uid not in accepted:
                raise input_error(f"PACS {self.where}", expected="every stored instance acknowledged",
                                  received=f"no acknowledgement for {uid}", fix="check the PACS's log")
            out.append(StoredInstance(sop_class_uid=str(ds.SOPClassUID), sop_instance_uid=uid,
                                      series_uid=str(ds.SeriesInstanceUID), study_uid=str(ds.StudyInstanceUID),
                                      modality=str(ds.get("Modality", ""))))
        return out


def _as_part10(ds: Any) -> Any:
    """``ds`` as a DICOM Part 10 file (preamble, "DICM", file meta): dicomweb-client sends what pydicom writes, and a
    dataset built in memory would otherwise go out without the preamble (and come back unreadable)."""
    import io

    import pydicom

    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buf.getvalue()))


def _reason(exc: Exception) -> str:
    text = str(exc)
    for marker in ("Connection refused", "Name or service not known", "No route to host", "Connection reset",
                   "Temporary failure in name resolution", "certificate verify failed", "Remote end closed"):
        if marker in text:
            return marker.lower()
    return type(exc).__name__


# ----------------------------------------------------------------------------------------- series choice


def select_series(series: Sequence[SeriesInfo], study_uid: str, series_uid: str | None, *,
                  modalities: Sequence[str], purpose: str) -> SeriesInfo:
    """The series of ``study_uid`` to work on: ``series_uid`` when given (it must be in the study and of one of
    ``modalities``), else the only series of those modalities. ``purpose`` names the command in messages."""
    allowed = ", ".join(modalities)
    images = [s for s in series if s.modality not in NON_IMAGE_MODALITIES]
    listed = "; ".join(s.label() for s in series[:8]) + (" ..." if len(series) > 8 else "")
    if series_uid:
        uid = _check_uid(series_uid, "--series")
        match = [s for s in series if s.series_uid == uid]
        if not match:
            raise input_error(f"--series {uid}", expected=f"a series of study {study_uid}",
                              received=f"not in the study; it holds: {listed or 'no series'}",
                              fix="pick one of the study's series (`medvlm pacs find` lists them)")
        chosen = match[0]
        if chosen.modality not in modalities:
            raise input_error(f"series {uid}", expected=f"a {allowed} series for {purpose}",
                              received=f"modality {chosen.modality or 'unknown'} ({chosen.label()})",
                              fix=_modality_fix(purpose))
        return chosen
    fitting = [s for s in images if s.modality in modalities]
    if len(fitting) == 1:
        return fitting[0]
    if not fitting:
        found = ", ".join(sorted({s.modality or "?" for s in series})) or "none"
        raise input_error(f"study {study_uid}", expected=f"a {allowed} series for {purpose}",
                          received=f"series of modality {found}: {listed or 'no series'}",
                          fix=_modality_fix(purpose))
    raise input_error(f"study {study_uid}", expected=f"one {allowed} series for {purpose} (or --series)",
                      received=f"{len(fitting)} such series: " + "; ".join(s.label() for s in fitting[:8]),
                      fix="pick one with --series UID")


def _modality_fix(purpose: str) -> str:
    if purpose == "link-report":
        return ("link-report grounds sentences on a radiograph (CR/DX); for a CT or MR series segment "
                "structures with `medvlm pacs segment --text ...`")
    return ("segment reads CT/MR series (as a volume) and CR/DX radiographs (image by image); pick such a series "
            "with --series")


# ------------------------------------------------------------------------------------------- SEG checks


def check_seg(seg: Any, sources: Sequence[Any], labels: Sequence[str]) -> Any:
    """Check a DICOM SEG (a pydicom Dataset, e.g. read back from the file medvlm wrote) before it is stored: it
    parses as a Segmentation, has one segment per label in order, and references ``sources`` (its study, its
    series and only their instances). Returns the highdicom Segmentation; raises InputError otherwise."""
    try:
        import highdicom as hd
    except ImportError as exc:
        raise missing_dependency("DICOM SEG", "pip install highdicom") from exc
    label = f"DICOM SEG {getattr(seg, 'SOPInstanceUID', '?')}"
    fix = "this is a bug in medvlm's SEG export: please report it with the command you ran"
    try:
        parsed = hd.seg.Segmentation.from_dataset(seg, copy=True)
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise input_error(label, expected="a valid DICOM Segmentation", received=f"{type(exc).__name__}: {exc}",
                          fix=fix) from exc
    segments = [str(s.SegmentLabel) for s in parsed.SegmentSequence]
    want = [str(x)[:64] for x in labels]
    if segments != want:
        raise input_error(label, expected=f"segments {want}", received=f"segments {segments}", fix=fix)
    study = {str(s.StudyInstanceUID) for s in sources}
    series_uids = {str(s.SeriesInstanceUID) for s in sources}
    sops = {str(s.SOPInstanceUID) for s in sources}
    referenced = {str(getattr(s, "SeriesInstanceUID", "")): [str(i.ReferencedSOPInstanceUID)
                                                             for i in s.ReferencedInstanceSequence]
                  for s in getattr(parsed, "ReferencedSeriesSequence", [])}
    refs = [u for items in referenced.values() for u in items]
    if str(parsed.StudyInstanceUID) not in study or not set(referenced) <= series_uids or not refs \
            or not set(refs) <= sops:
        raise input_error(label, expected=f"references to the source series {sorted(series_uids)} of study "
                                          f"{sorted(study)}",
                          received=f"study {parsed.StudyInstanceUID}, series {sorted(referenced)}, "
                                   f"{len(refs)} referenced instance(s)", fix=fix)
    return parsed


# ------------------------------------------------------------------------------------------------ viewing


def seg_overlay(seg: Any, source: Any, *, window: tuple[float, float] | None = None, min_side: int = 512,
                title: str | None = None) -> npt.NDArray[np.uint8]:
    """The segments of DICOM SEG ``seg`` on its source image ``source`` (pydicom Datasets, e.g. both retrieved
    from the PACS) drawn with :func:`medvlm.viz.draw_overlay`: ``(H, W, 3)`` uint8, upscaled (nearest) so that the
    longer side is at least ``min_side``. ``window``: display window (default: the image's own, else min-max)."""
    import io

    import highdicom as hd

    from medvlm.io import load_image
    from medvlm.types import Mask, Region
    from medvlm.viz import draw_overlay

    buf = io.BytesIO()
    source.save_as(buf, enforce_file_format=True)
    image = load_image(buf.getvalue(), format="dicom", window=window)
    parsed = seg if isinstance(seg, hd.seg.Segmentation) else hd.seg.Segmentation.from_dataset(seg, copy=True)
    numbers = [int(s.SegmentNumber) for s in parsed.SegmentSequence]
    labels = {int(s.SegmentNumber): str(s.SegmentLabel) for s in parsed.SegmentSequence}
    pixels = parsed.get_pixels_by_source_instance([str(source.SOPInstanceUID)], segment_numbers=numbers,
                                                  combine_segments=False, assert_missing_frames_are_empty=True)
    factor = max(1, math.ceil(min_side / max(image.shape)))
    rgb = image.to_rgb_uint8()
    if factor > 1:
        rgb = np.repeat(np.repeat(rgb, factor, axis=0), factor, axis=1)
    regions, drawn = [], []
    for k, number in enumerate(numbers):
        mask = np.asarray(pixels[0, :, :, k]) > 0
        if factor > 1:
            mask = np.repeat(np.repeat(mask, factor, axis=0), factor, axis=1)
        if mask.any():
            regions.append(Region.from_mask(Mask(mask), label=labels[number]))
            drawn.append(number)
    return draw_overlay(rgb, regions, numbers=drawn, title=title)
