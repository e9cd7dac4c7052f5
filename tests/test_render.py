"""The renderer is pure: golden files pin its output byte for byte, and real `nginx -t` accepts it.

Regenerate the goldens after an intended change with: UPDATE_GOLDEN=1 pytest tests/test_render.py
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from grayagent.rules.model import parse_document
from grayagent.stores.base import digest_of
from grayagent.targets.nginx_render import NginxOptions, render
from tests.servers.nginx import NginxInstance

GOLDEN = Path(__file__).parent / "golden"
CASES = sorted(p.name for p in GOLDEN.iterdir() if (p / "rules.yaml").exists())
OPTIONS = NginxOptions(verify_listen="127.0.0.1:18089")


def _render(case: str) -> str:
    content = (GOLDEN / case / "rules.yaml").read_bytes()
    return render(parse_document(content, f"{case}/rules.yaml"), 7, digest_of(content), OPTIONS)


@pytest.mark.parametrize("case", CASES)
def test_render_matches_golden(case: str) -> None:
    out = _render(case)
    golden = GOLDEN / case / "nginx.conf"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(out)
    assert out == golden.read_text(), f"render of {case} changed; review the diff and UPDATE_GOLDEN=1 if intended"


@pytest.mark.parametrize("case", CASES)
def test_render_is_deterministic_and_printable_ascii(case: str) -> None:
    out = _render(case)
    assert out == _render(case)
    assert all(ch == "\n" or 0x20 <= ord(ch) < 0x7F for ch in out)


def test_hostile_values_stay_inside_their_strings() -> None:
    out = _render("hostile")
    assert 'return 200 "pwned"' not in out and "listen 1;" not in out and "$host$" not in out
    assert out.count("server {") == 2  # the service and the version endpoint; no value opened a block
    entry = re.compile(r'^"(?:[^"\\]|\\.)*" [A-Za-z0-9_.$-]+;$')
    for line in out.splitlines():
        # every map entry is one quoted key, one plain value and ';': nothing a value could have opened
        if line.strip().startswith('"'):
            assert entry.match(line.strip()), line


@pytest.mark.parametrize("case", CASES)
def test_real_nginx_accepts_render(case: str, tmp_path: Path) -> None:
    instance = NginxInstance(tmp_path)
    instance.conf.parent.mkdir(parents=True)
    instance.conf.write_text(_render(case).replace("127.0.0.1:18089", instance.verify_listen))
    (tmp_path / "tmp").mkdir()
    from tests.servers.nginx import MAIN_CONF
    instance.main_conf.write_text(MAIN_CONF.format(modules="", root=tmp_path, conf=instance.conf))
    done = instance.test_config()
    assert done.returncode == 0, done.stderr
