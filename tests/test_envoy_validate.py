"""The pre-started `envoy --mode validate` against the real binary."""

from __future__ import annotations

import json

from grayagent.targets.envoy_validate import PrewarmedValidator
from tests.servers.envoy import envoy_binary

GOOD = {"static_resources": {"clusters": [{
    "name": "c", "connect_timeout": "1s",
    "load_assignment": {"cluster_name": "c", "endpoints": [{"lb_endpoints": [
        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 9}}}}]}]}}]}}


def test_validates_good_and_bad_candidates_with_the_next_one_started_in_advance() -> None:
    validator = PrewarmedValidator(envoy_binary(), ["--concurrency", "1", "-l", "error"], timeout=30)
    try:
        validator.prewarm()
        waiting = validator._ready
        assert waiting is not None and waiting[0].poll() is None, "a validator waits before any candidate exists"
        code, output = validator.validate(json.dumps(GOOD).encode())
        assert code == 0, output
        assert validator._ready is not None and validator._ready[0].pid != waiting[0].pid  # the next one is ready
        bad = json.loads(json.dumps(GOOD))
        bad["static_resources"]["clusters"][0]["connect_timeout"] = "soon"
        code, output = validator.validate(json.dumps(bad).encode())
        assert code != 0 and "connect_timeout" in output
        # A pre-started validator that died is replaced, not waited on.
        assert validator._ready is not None
        validator._ready[0].kill()
        validator._ready[0].wait()
        assert validator.validate(json.dumps(GOOD).encode())[0] == 0
    finally:
        validator.close()
    assert not validator._dir.exists()
