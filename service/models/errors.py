"""The error of a model that did not come up, shared by models/ (a file not found, a fetch that failed) and llama/
(a process that did not serve): here, so that neither package imports the other for it."""


class LlamaStartError(RuntimeError):
    """llama.cpp did not come up; the message says why in one line (llama.cpp's own error line, if it printed one)."""
