"""The bare reference: a 15-line Flask + waitress + requests passthrough, with no validation, keys, limits, logs
or metrics. The benchmark measures the gateway against it. (Benchmarks only: never part of service/.)"""
import sys

import requests
import waitress
from flask import Flask, Response, request

UPSTREAM, PORT, THREADS = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
app, session = Flask(__name__), requests.Session()


@app.post("/v1/chat/completions")
def chat():
    """Forward the body; stream the answer back when it is a stream."""
    answer = session.post(UPSTREAM + "/v1/chat/completions", data=request.get_data(), stream=True,
                          headers={"Content-Type": "application/json"})
    if answer.headers.get("Content-Type", "").startswith("text/event-stream"):
        return Response(answer.iter_content(None), content_type="text/event-stream")
    return Response(answer.content, answer.status_code, content_type="application/json")


waitress.serve(app, host="127.0.0.1", port=PORT, threads=THREADS, _quiet=True)
