"""The README's commands and curl examples work as written."""
import json
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as file:
        return file.read()


def curl_examples():
    """Each README curl example as (path, headers, JSON body)."""
    examples = []
    for command in re.findall(r"^curl .*?(?=\n```)", readme(), flags=re.M | re.S):
        path = re.search(r"http://127\.0\.0\.1:8000(/\S+)", command).group(1)
        headers = dict(header.split(": ", 1) for header in re.findall(r'-H "([^"]+)"', command))
        body = json.loads(re.search(r"-d '(.*?)'", command, flags=re.S).group(1))
        examples.append((path, headers, body))
    return examples


def test_first_two_commands_are_serve_and_test():
    first_block = re.search(r"```sh\n(.*?)```", readme(), flags=re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.strip().splitlines()]
    # As typed on stock Debian and Ubuntu, which have python3 and no python.
    assert commands == ["python3 bin/serve", "python3 bin/test"]


EXAMPLE_PATHS = ["/v1/chat/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/responses", "/v1/messages",
                 "/v1/rerank", "/tokenize", "/infill"]
# What each example's answer holds; rerank and infill need a reranker and a FIM model, which the demo model is
# not: llama.cpp's 501 in the envelope is what it answers then, as the README says.
EXPECTED = {"/v1/chat/completions": (200, "choices"), "/v1/embeddings": (200, "data"), "/v1/responses": (200, "output"),
            "/v1/messages": (200, "content"), "/v1/rerank": (501, "error"), "/tokenize": (200, "tokens"),
            "/infill": (501, "error")}


def test_readme_has_a_curl_example_per_endpoint():
    assert [path for path, _, _ in curl_examples()] == EXAMPLE_PATHS


@pytest.mark.llama
@pytest.mark.parametrize("index", range(len(EXAMPLE_PATHS)))
def test_curl_examples_work_against_llama(make_app, llama, index):
    path, headers, body = curl_examples()[index]
    assert headers.get("Authorization") == "Bearer local" or headers.get("x-api-key") == "local"
    client = make_app(llama.url, OPENAI_API_KEY="local").test_client()
    response = client.post(path, data=json.dumps(body), headers=headers)
    status, member = EXPECTED[path]
    assert response.status_code == status, response.get_data(as_text=True)
    if body.get("stream"):
        assert response.get_data().endswith(b"data: [DONE]\n\n")
    else:
        assert member in response.get_json()
