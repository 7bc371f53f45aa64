"""Kombu's own transport integration mixins pass on ``pgqueue://`` (see run.py).

The suite runs once, in its own interpreter; each mixin is one test here, failing
with the names and messages of that mixin's failing cases. Skipped only when the
Kombu sdist (which carries the mixins) cannot be downloaded and is not cached.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections import defaultdict

import pytest

from .run import SdistUnavailable, extract_common, fetch_sdist, kombu_version, run

pytestmark = [pytest.mark.slow]

MIXINS = [
    "BasicFunctionality",
    "BaseExchangeTypes",
    "BaseMessage",
    "BasePriority",
    "BaseEventLoop",
    "BaseTimeToLive",
    "BaseFailover",
]

# Cases that cannot pass for a transport with ``can_parse_url = True`` (which pgqueue
# needs: libpq parameters in the URL's query string would crash Kombu's own parser).
# Each must still fail the way described, so a change in Kombu or here shows up.
KNOWN = {
    "test_failover_switches_to_alternate_url": (
        "asserts Connection.port before connecting; Kombu leaves it None for URL-parsing "
        "transports until the transport exists (kombu/connection.py:236-262)"
    ),
}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[tuple[str, str]]]:
    """``{mixin: [(case, failure message or "")]}`` from one run of the whole suite."""
    try:
        fetch_sdist("kombu", kombu_version())
    except SdistUnavailable as exc:
        pytest.skip(f"Kombu's integration mixins are unavailable: {exc}")
    report = tmp_path_factory.mktemp("kombu-it") / "junit.xml"
    done = run(["-q", f"--junitxml={report}"], capture=True)
    assert report.exists(), f"the suite did not run:\n{done.stdout}\n{done.stderr}"
    found: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for case in ET.parse(report).getroot().iter("testcase"):
        mixin = case.get("classname", "").rsplit(".", 1)[-1].removeprefix("TestPgQueue")
        problems = [
            (child.get("message") or child.tag)[:400]
            for child in case
            if child.tag in ("failure", "error")
        ]
        found[mixin].append((case.get("name", "?"), "; ".join(problems)))
    return dict(found)


@pytest.mark.parametrize("mixin", MIXINS)
def test_kombu_integration_mixin_passes(
    outcomes: dict[str, list[tuple[str, str]]], mixin: str
) -> None:
    version = kombu_version()
    if f"class {mixin}" not in extract_common(fetch_sdist("kombu", version), version):
        pytest.skip(f"Kombu {version}'s integration suite has no {mixin}")
    cases = outcomes.get(mixin)
    assert cases, f"no {mixin} cases ran; ran: {sorted(outcomes)}"
    failed = [f"{name}: {message}" for name, message in cases if message and name not in KNOWN]
    known = [name for name, message in cases if name in KNOWN]
    assert all(message for name, message in cases if name in KNOWN), (
        f"a known-failing case now passes; remove it from KNOWN: {known}"
    )
    assert failed == [], f"{len(failed)} of {len(cases)} {mixin} cases failed:\n" + "\n".join(
        failed
    )
