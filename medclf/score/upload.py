"""Reading a request body with bounded memory.

The size limit is enforced on the bytes actually received, as they arrive (Starlette's
`request.stream()`), whatever Content-Length says or whether it is there at all (chunked
transfer). A body over the limit is dropped at the first chunk past it, and with at most
`serve.max_ongoing_requests` requests in flight, the bodies this code holds stay under the budget
ServeConfig checks. Serve's proxy can still hand a replica more than one chunk at a time: it
buffers the client without backpressure (docs/security.md, "Bounded memory per request").
"""

from __future__ import annotations


class TooLarge(Exception):
    def __init__(self, size: int, declared: bool):
        super().__init__(size)
        self.size, self.declared = size, declared


async def read_limited(request, max_bytes: int) -> bytes:
    """The body, or TooLarge as soon as it is known to exceed `max_bytes`."""
    declared = request.headers.get("content-length")
    if declared and declared.strip().isdigit() and int(declared) > max_bytes:
        raise TooLarge(int(declared), True)  # refused before a byte of the body is read
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > max_bytes:
            del buf[:]  # drop what was read now, not when the request object goes
            raise TooLarge(max_bytes + 1, False)
    return bytes(buf)
