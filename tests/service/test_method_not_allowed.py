"""405 answers carry an Allow header listing every method the path serves (GET and POST of one
path are separate routes; Starlette used to name only the first)."""

from __future__ import annotations

import re

from tests.service.conftest import Api

PROBE = ("GET", "POST", "PUT", "PATCH", "DELETE")


def test_allow_header_lists_every_method_of_the_path(api: Api) -> None:
    checked = 0
    for path, ops in api.client.app.openapi()["paths"].items():
        allowed = {m.upper() for m in ops}
        url = re.sub(r"\{[^}]+\}", "x", path)
        for method in PROBE:
            if method in allowed:
                continue
            r = api.client.request(method, url, headers=api.h("admin"))
            assert r.status_code == 405, (method, url, r.status_code)
            assert r.headers["content-type"] == "application/problem+json"
            assert set(r.headers["allow"].split(", ")) == allowed, (method, url, r.headers)
            checked += 1
    assert checked > 50
    both = api.client.request("DELETE", "/v1/models", headers=api.h("admin"))
    assert both.headers["allow"] == "GET, POST"
