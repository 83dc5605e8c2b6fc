"""GET /api/v1/cluster: the daemons sharing this Redis (fleet mode) and what each one runs."""

from __future__ import annotations

import time

from aiohttp import web

from streamd.api.context import streams
from streamd.api.errors import json_response


async def cluster(request: web.Request) -> web.Response:
    d = streams(request)
    if d.fleet is None:
        return json_response({"fleet": False, "self": None, "instance": None, "standing_aside": False,
                              "standing_aside_reason": None, "members": [], "streams": len(d.runners),
                              "capacity": None})
    f = d.fleet
    now = time.time()
    members = []
    for m, rec in sorted(f.fleet.members.items()):
        load = rec.get("load") or {}
        members.append({"id": m, "address": rec.get("address"), "version": rec.get("version"),
                        "max_streams": rec.get("max_streams"), "streams": rec.get("streams", []),
                        "load": {k: v for k, v in load.items() if k != "streams"},
                        "last_heartbeat": rec.get("heartbeat"),
                        "heartbeat_age_s": round(now - float(rec.get("heartbeat") or now), 3)})
    # a daemon standing aside (another running daemon has its member id) shows the fleet as Redis has it: the
    # member of its id is the other daemon, and this one says why it takes no part
    aside = f.fleet.standing_aside()
    return json_response({"fleet": True, "self": f.member_id, "instance": f.fleet.instance,
                          "standing_aside": aside is not None, "standing_aside_reason": aside,
                          "members": members, "streams": len(f.cfgs), "capacity": f.capacity()})
