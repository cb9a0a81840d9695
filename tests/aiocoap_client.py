"""aiocoap's client as a command, for interop tests (it runs on asyncio; the tests run on Trio).

    python tests/aiocoap_client.py observe URL COUNT     print the first COUNT payloads (response + notifications)
    python tests/aiocoap_client.py get URL OUTFILE        GET (Block2 handled by aiocoap), body to OUTFILE
    python tests/aiocoap_client.py post URL INFILE CF     POST INFILE (Block1 when large), print the code

With `--credentials FILE` first, requests go through the credentials file's OSCORE contexts
(aiocoap-client's format); aiocoap-client itself ends an observation after the first answer.
"""

from __future__ import annotations

import asyncio
import json
import sys

import aiocoap


async def main(argv: list[str]) -> int:
    ctx = await aiocoap.Context.create_client_context()
    if argv[0] == "--credentials":
        ctx.client_credentials.load_from_dict(json.load(open(argv[1])))
        argv = argv[2:]
    try:
        action, url = argv[0], argv[1]
        if action == "observe":
            count = int(argv[2])
            req = aiocoap.Message(code=aiocoap.GET, uri=url, observe=0)
            pr = ctx.request(req)
            first = await asyncio.wait_for(pr.response, 60)
            print(f"{first.code} {first.payload.decode()}", flush=True)
            seen = 1
            async for note in pr.observation:
                print(f"{note.code} {note.payload.decode()}", flush=True)
                seen += 1
                if seen >= count:
                    pr.observation.cancel()
                    break
        elif action == "get":
            resp = await asyncio.wait_for(ctx.request(aiocoap.Message(code=aiocoap.GET, uri=url)).response, 120)
            open(argv[2], "wb").write(resp.payload)
            print(resp.code)
        elif action == "post":
            payload = open(argv[2], "rb").read()
            req = aiocoap.Message(code=aiocoap.POST, uri=url, payload=payload, content_format=int(argv[3]))
            resp = await asyncio.wait_for(ctx.request(req).response, 60)
            print(f"{resp.code} {resp.payload.decode(errors='replace')}")
        return 0
    finally:
        await ctx.shutdown()


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
