from typing import Any
from tests.conftest import bearer, register

async def test_probe(client: Any) -> None:
    auth = bearer((await register(client))["access_token"])
    t = await (await client.post("/api/v1/tasks", json={"title": "x"}, headers=auth)).json()
    r = await client.post("/api/v1/tasks/bulk", json={"ids": [t["id"]], "set": {"status": None}}, headers=auth)
    print("bulk", r.status, await r.text())
    r = await client.get(f"/api/v1/tasks/{t['id']}", headers=auth)
    print("get", r.status, await r.text())
    r = await client.get("/api/v1/tasks", headers=auth)
    print("list", r.status, (await r.text())[:300])
    r = await client.post("/api/v1/tasks", json={"title": "x", "due_at": "0001-01-01T00:00:00+01:00"}, headers=auth)
    print("y1", r.status, (await r.text())[:300])
    r = await client.post("/api/v1/tasks", json={"title": "x", "due_at": "9999-12-31T23:59:59-01:00"}, headers=auth)
    print("y9999", r.status, (await r.text())[:300])
    r = await client.post("/api/v1/tasks", json={"title": "x", "due_at": "2020-12-31T23:59:60Z"}, headers=auth)
    print("leap", r.status, (await r.text())[:300])
    assert False
