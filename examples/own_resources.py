# examples/own_resources.py
"""A corem server with a resource of your own, observable: `.venv/bin/python examples/own_resources.py`.

It reads its settings as `corem serve` does (the defaults, COREM_* variables, COREM_CONFIG), serves
telemetry and every door as ever, and `sensors/temperature` besides; Ctrl-C stops it gracefully."""

import trio

from corem.cli import run_until_signalled, setup_logging
from corem.codec import Code
from corem.coap import Response
from corem.coap.site import Resource
from corem.config import Settings
from corem.server import Server


class Temperature(Resource):
    observable = True                      # GET with Observe 0 registers, Observe 1 leaves
    rt = "temperature"                     # shown in /.well-known/core

    def __init__(self) -> None:
        super().__init__()
        self.value = b"21.5"

    def get(self, req):                    # req is None when rendering a notification
        return Response(Code.CONTENT, self.value)

    def put(self, req):
        self.value = bytes(req.message.payload)
        self.changed()                     # every observer gets the new state
        return Response(Code.CHANGED)


settings = Settings.load()
setup_logging(settings)
server = Server(settings)
server.site.add("sensors/temperature", Temperature())
trio.run(run_until_signalled, server)
