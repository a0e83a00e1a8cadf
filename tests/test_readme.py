"""The README and docs/ as written: the first commands, the curl examples (bash and PowerShell) against a real
llama.cpp, the model names they promise, the generated settings table, every models file they show (each one
read as bin/serve reads it), the flag list, and every relative link."""
import glob
import json
import os
import re
from collections import namedtuple

import pytest
import requests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every page a reader can reach from the README, as paths relative to the project root.
DOCUMENTS = ["README.md"] + sorted(os.path.relpath(path, ROOT)
                                   for path in glob.glob(os.path.join(ROOT, "docs", "*.md")))

Example = namedtuple("Example", "path headers body options")


def read(document: str) -> str:
    """The text of a document, by its path relative to the project root."""
    with open(os.path.join(ROOT, document), encoding="utf-8") as file:
        return file.read()


def code_blocks(text: str, language: str) -> list:
    """The bodies of the fenced code blocks of one language, in order."""
    return [body for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.M | re.S) if lang == language]


def _example(command: str, body: str) -> Example:
    path = re.search(r"http://127\.0\.0\.1:8000(/\S+)", command).group(1)
    headers = dict(header.split(": ", 1) for header in re.findall(r'-H "([^"]+)"', command))
    options = frozenset(re.findall(r"(?<=\s)(-[A-Za-z])(?=\s)", command)) - {"-H", "-d"}
    return Example(path, headers, json.loads(body), options)


def curl_examples(text: str) -> list:
    """Each bash curl example of a document."""
    return [_example(command, re.search(r"-d '(.*?)'", command, flags=re.S).group(1))
            for block in code_blocks(text, "sh") for command in re.findall(r"^curl .*", block, flags=re.M | re.S)]


def powershell_examples(text: str) -> list:
    """Each PowerShell curl.exe example of a document: a here-string body piped to curl.exe, which reads it from
    its standard input (PowerShell 5.1 mangles double quotes inside a native command's arguments)."""
    examples = []
    for block in code_blocks(text, "powershell"):
        if "curl.exe" in block:
            body, command = re.fullmatch(r"@'\n(.*?)\n'@ \| (curl\.exe .*)", block.strip(), flags=re.S).groups()
            assert command.endswith(' -d "@-"'), command
            examples.append(_example(command + " ", body))
    return examples


def all_curl_examples() -> list:
    """The README's curl examples, then the API page's."""
    return curl_examples(read("README.md")) + curl_examples(read("docs/api.md"))


def test_first_two_commands_are_serve_and_test():
    first_block = re.search(r"```sh\n(.*?)```", read("README.md"), flags=re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.strip().splitlines()]
    # As typed on stock Debian and Ubuntu, which have python3 and no python.
    assert commands == ["python3 bin/serve", "python3 bin/test"]


def test_readme_is_what_the_first_hour_needs():
    # The reference lives in docs/; a README that grows back past this is the 928-line one of issue 25.
    assert len(read("README.md").splitlines()) <= 250


EXAMPLE_PATHS = ["/v1/chat/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/responses", "/v1/messages",
                 "/v1/rerank", "/tokenize", "/infill"]
# What each example's answer holds; rerank and infill need a reranker and a FIM model, which the demo model is
# not: llama.cpp's 501 in the envelope is what it answers then, as the API page says.
EXPECTED = {"/v1/chat/completions": (200, "choices"), "/v1/embeddings": (200, "data"), "/v1/responses": (200, "output"),
            "/v1/messages": (200, "content"), "/v1/rerank": (501, "error"), "/tokenize": (200, "tokens"),
            "/infill": (501, "error")}


def test_docs_have_a_curl_example_per_endpoint():
    assert [example.path for example in all_curl_examples()] == EXAMPLE_PATHS


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_curl_example_has_its_powershell_twin(document):
    # Windows is a first-class target: each bash example is followed by the same request in PowerShell.
    text = read(document)
    assert powershell_examples(text) == curl_examples(text)


def test_the_twins_are_found():
    # The twin check above would pass on a page with neither; the README and the API page have both.
    assert len(powershell_examples(read("README.md")) + powershell_examples(read("docs/api.md"))) == len(EXAMPLE_PATHS)


@pytest.mark.llama
@pytest.mark.parametrize("index", range(len(EXAMPLE_PATHS)))
def test_curl_examples_work_against_llama(make_app, llama, index):
    path, headers, body, _ = all_curl_examples()[index]
    assert headers.get("Authorization") == "Bearer local" or headers.get("x-api-key") == "local"
    client = make_app(llama.url, OPENAI_API_KEY="local").test_client()
    response = client.post(path, data=json.dumps(body), headers=headers)
    status, member = EXPECTED[path]
    assert response.status_code == status, response.get_data(as_text=True)
    if body.get("stream"):
        assert response.get_data().endswith(b"data: [DONE]\n\n")
    else:
        assert member in response.get_json()


@pytest.mark.llama
def test_model_names_come_back_as_the_readme_says(make_app, llama):
    # With one model: chat answers llama.cpp's name for the model (its file's), embeddings echo the name sent.
    paragraph = re.search(r"^\*\*Model names\.\*\*.*?\n\n", read("README.md"), flags=re.M | re.S).group(0)
    paragraph = " ".join(paragraph.split())
    assert "file name" in paragraph and "embeddings echo the name sent" in paragraph
    own_name = requests.get(llama.url + "/v1/models", timeout=5).json()["data"][0]["id"]
    client = make_app(llama.url).test_client()
    by_path = {}
    for path, headers, body, _ in curl_examples(read("README.md")):
        if not body.get("stream"):
            by_path[path] = client.post(path, data=json.dumps(body), headers=headers).get_json()["model"]
    assert own_name != "llama"
    assert by_path == {"/v1/chat/completions": own_name, "/v1/embeddings": "llama"}


def test_settings_table_is_the_generated_one():
    from service.config import render_settings_table

    assert render_settings_table() in read("docs/configuration.md"), \
        "paste service.config.render_settings_table() into docs/configuration.md"


def heading_anchors(text: str) -> set:
    """The anchors GitHub gives a document's headings: lower case, punctuation dropped, spaces as hyphens, and
    -1, -2, ... after repeats."""
    anchors = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *$", re.sub(r"^```.*?^```", "", text, flags=re.M | re.S), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        anchor, repeat = slug, 0
        while anchor in anchors:
            repeat += 1
            anchor = f"{slug}-{repeat}"
        anchors.add(anchor)
    return anchors


def relative_links(text: str) -> list:
    """Every link and image target of a document that is not a URL with a scheme, code left out."""
    prose = re.sub(r"`[^`\n]*`", "", re.sub(r"^```.*?^```", "", text, flags=re.M | re.S))
    targets = re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", prose)
    return [target for target in targets if not re.match(r"[a-z][a-z0-9+.-]*:", target)]


def test_heading_anchors_follow_github():
    text = ("# Sizing `WAITRESS_THREADS`\n## Fair share of llama.cpp's slots\n"
            "```\n# not a heading\n```\n## Notes\n## Notes\n")
    assert heading_anchors(text) == {"sizing-waitress_threads", "fair-share-of-llamacpps-slots", "notes", "notes-1"}


@pytest.mark.parametrize("document", DOCUMENTS)
def test_relative_links_lead_to_a_file_and_heading(document):
    broken = []
    for target in relative_links(read(document)):
        path, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(document), path)) if path else document
        if not os.path.isfile(os.path.join(ROOT, resolved)):
            broken.append(f"{target}: no file {resolved}")
        elif anchor and anchor not in heading_anchors(read(resolved)):
            broken.append(f"{target}: no heading #{anchor} in {resolved}")
    assert not broken, f"{document}: " + "; ".join(broken)


def test_readme_leads_to_every_doc():
    linked = {os.path.normpath(target.partition("#")[0]) for target in relative_links(read("README.md"))}
    assert set(DOCUMENTS[1:]) | {"BENCHMARKS.md", os.path.join("docs", "ui.png")} <= linked


# -- the models files the docs show ------------------------------------------------------------------------------

EXAMPLES = sorted(os.path.relpath(path, ROOT) for path in glob.glob(os.path.join(ROOT, "docs", "examples", "*.toml")))
MODELS_FILE_DOC = os.path.join("docs", "models-file.md")
LOCAL_FILE_KEYS = ("source", "draft", "mmproj")  # the keys that may name a file beside the models file


def toml_blocks() -> list:
    """(document, text) of every TOML block of the README and docs/: each one is a whole models file."""
    return [(document, block) for document in DOCUMENTS for block in code_blocks(read(document), "toml")]


def check_args(args) -> list:
    """What bin/serve refuses in a model's args: flags the table does not know, bad values, flags it sets itself."""
    from service.llama import flags

    return [str(problem) for problem in flags.problems(args) + flags.owned(args)]


def read_as_bin_serve_would(text: str, folder) -> list:
    """The specs of a models file's text, saved as folder/models.toml beside an empty stand-in for each local
    file it names: the docs name hf: models, or files relative to the models file, never this machine's."""
    from service.models.models_file import read_models_file, tomllib

    for table in tomllib.loads(text).get("models", {}).values():
        for key in LOCAL_FILE_KEYS:
            value = table.get(key, "none")
            if not value.startswith("hf:") and value not in ("auto", "none"):
                assert not os.path.isabs(os.path.expanduser(value)), f"{key} = {value!r}: a path of one machine"
                os.makedirs(os.path.dirname(os.path.join(folder, value)), exist_ok=True)
                open(os.path.join(folder, value), "wb").close()
    path = os.path.join(folder, "models.toml")
    with open(path, "w", encoding="utf-8") as file:
        file.write(text)
    return read_models_file(path, check_args=check_args)


def test_the_docs_show_models_files():
    # The parse test below would pass on docs with none: the models file page, its two examples and the README's
    # short one, and the two translations.
    shown = [document for document, _ in toml_blocks()]
    assert shown.count(MODELS_FILE_DOC) >= 3 and "README.md" in shown
    assert shown.count(os.path.join("docs", "from-llama-swap.md")) == 2
    assert EXAMPLES == [os.path.join("docs", "examples", "cpu.toml"), os.path.join("docs", "examples", "gpu.toml")]


@pytest.mark.parametrize("index", range(len(toml_blocks())))
def test_every_models_file_shown_is_read_as_written(index, tmp_path):
    document, text = toml_blocks()[index]
    specs = read_as_bin_serve_would(text, tmp_path)  # raises ModelsFileError, every problem with its line
    assert [spec.id for spec in specs] == re.findall(r"^\[models\.([\w-]+)\]", text, flags=re.M), document


@pytest.mark.parametrize("example", EXAMPLES)
def test_each_example_file_is_the_one_the_docs_show(example):
    # The files are there to be copied; the page shows them whole, so neither can drift from the other.
    assert read(example) in code_blocks(read(MODELS_FILE_DOC), "toml")


def test_the_examples_use_what_they_are_there_to_show(tmp_path):
    specs = {os.path.basename(path): {spec.id: spec for spec in read_as_bin_serve_would(read(path), tmp_path)}
             for path in EXAMPLES}
    gpu = specs["gpu.toml"]
    assert any(spec.mmproj == "auto" for spec in gpu.values())
    assert any(spec.draft for spec in gpu.values())
    assert any("--n-cpu-moe" in spec.args for spec in gpu.values())
    assert any(spec.limits.max_tokens and spec.defaults for spec in specs["cpu.toml"].values())


def _flag_spans(paragraph: str) -> set:
    return set(re.findall(r"`(--[a-z-]+)`", paragraph))


def test_the_flag_list_is_the_table():
    from service.llama.flags import FLAGS

    text = " ".join(read(MODELS_FILE_DOC).split())
    listed = re.search(r"The flags the embedded llama\.cpp knows \(.*?\): (.*?)\. ", text).group(1)
    refused = re.search(r"Flags the gateway sets itself are refused in `args`(.*?)\. ", text).group(1)
    assert _flag_spans(listed) == {flag.names[0] for flag in FLAGS if not flag.owner}
    assert _flag_spans(refused) == {flag.names[0] for flag in FLAGS if flag.owner}
