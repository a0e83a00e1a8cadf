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
    assert commands == ["python bin/serve", "python bin/test"]


def test_readme_has_the_three_curl_examples():
    assert [path for path, _, _ in curl_examples()] == ["/v1/chat/completions", "/v1/chat/completions",
                                                        "/v1/embeddings"]


@pytest.mark.llama
@pytest.mark.parametrize("index", range(3))
def test_curl_examples_work_against_llama(llama_client, index):
    path, headers, body = curl_examples()[index]
    assert headers["Authorization"] == "Bearer local"
    response = llama_client.post(path, data=json.dumps(body), headers=headers)
    assert response.status_code == 200, response.get_data(as_text=True)
    if body.get("stream"):
        assert response.get_data().endswith(b"data: [DONE]\n\n")
    else:
        assert response.get_json()["object"] in ("chat.completion", "list")
