"""A canned llama-server for benchmarks: one asyncio process answering in microseconds, so that what a benchmark
measures is the gateway in front of it.

    python -m bench.canned_upstream PORT [CHUNKS] [CHUNK_DELAY_MS]

Non-streamed chat answers are one fixed JSON body; streamed ones are CHUNKS events, CHUNK_DELAY_MS apart, then a
usage chunk and [DONE], as llama.cpp sends them (chunked transfer, one event per chunk). A request may set its own
with "bench_chunks" and "bench_delay_ms" fields, which the gateway passes through like any llama.cpp field.
"""
import asyncio
import json
import re
import sys

COMPLETION = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": "bench",
    "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "Hello there!"}}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16}}).encode()
CHUNK = b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":0,"model":"bench",' \
        b'"choices":[{"index":0,"delta":{"content":"tok"},"finish_reason":null}]}\n\n'
USAGE = b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":0,"model":"bench",' \
        b'"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":%d,"total_tokens":%d}}\n\n'


def _response(status, body, content_type=b"application/json"):
    return b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s" % (status, content_type,
                                                                                 len(body), body)


class Canned(asyncio.Protocol):
    """One client connection: answers each request as soon as it is whole, keeping the connection alive."""

    chunks = 20
    delay_s = 0.0

    def connection_made(self, transport):
        self.transport, self.buffer, self.busy = transport, b"", False

    def data_received(self, data):
        self.buffer += data
        if not self.busy:
            self._next()

    def _next(self):
        head, sep, rest = self.buffer.partition(b"\r\n\r\n")
        if not sep:
            return
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if len(rest) < length:
            return
        body, self.buffer = rest[:length], rest[length:]
        path = head.split(b" ", 2)[1]
        if path.startswith(b"/v1/chat/completions") and (b'"stream": true' in body or b'"stream":true' in body):
            self.busy = True
            chunks = re.search(rb'"bench_chunks": ?(\d+)', body)
            delay = re.search(rb'"bench_delay_ms": ?([\d.]+)', body)
            chunks = int(chunks.group(1)) if chunks else self.chunks
            delay_s = float(delay.group(1)) / 1000 if delay else self.delay_s
            asyncio.get_running_loop().create_task(self._stream(chunks, delay_s))
            return
        if path.startswith(b"/v1/chat/completions") or path.startswith(b"/v1/completions"):
            self.transport.write(_response(b"200 OK", COMPLETION))
        elif path.startswith(b"/health"):
            self.transport.write(_response(b"200 OK", b'{"status":"ok"}'))
        elif path.startswith(b"/v1/models"):
            self.transport.write(_response(b"200 OK", b'{"object":"list","data":[{"id":"bench","object":"model"}]}'))
        else:
            self.transport.write(_response(b"404 Not Found", b'{"error":{"code":404,"message":"no"}}'))
        self._next()

    async def _stream(self, chunks, delay_s):
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n")
        for index in range(chunks):
            if delay_s and index:
                await asyncio.sleep(delay_s)
            self.transport.write(b"%x\r\n%s\r\n" % (len(CHUNK), CHUNK))
        tail = USAGE % (chunks, 12 + chunks) + b"data: [DONE]\n\n"
        self.transport.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(tail), tail))
        self.busy = False
        self._next()


async def serve(port, chunks=20, delay_ms=0.0):
    """Serve forever on 127.0.0.1:port."""
    Canned.chunks, Canned.delay_s = chunks, delay_ms / 1000
    server = await asyncio.get_running_loop().create_server(Canned, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 20,
                      float(sys.argv[3]) if len(sys.argv) > 3 else 0.0))
