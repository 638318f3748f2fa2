"""One exception type for every mistake a user can make, so the CLI can print it as one line."""


class JaxkvError(Exception):
    """Bad input or an unusable checkpoint: the message alone tells the user what to fix."""


class InvalidRequest(JaxkvError):
    """A generation request that can never be served. `param` names the field at fault (as the HTTP API
    spells it) and `code` says why, in OpenAI's vocabulary, so the server needs no guessing."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value"):
        super().__init__(message)
        self.param, self.code = param, code


class QueueFull(JaxkvError):
    """The engine's queue is at its limit: the request was fine, try again later."""

    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(JaxkvError):
    """A request ran past its deadline and was ended, freeing its row and pages."""


def check_text(text: str, param: str) -> str:
    """`text` if UTF-8 can encode it; else InvalidRequest naming `param` (a lone surrogate from a JSON
    escape such as "\\ud800" would make tokenizers and response encoding raise)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequest(f"{param} contains a lone surrogate (U+{ord(text[e.start]):04X}) at character "
                             f"{e.start}: not valid Unicode text", param, "invalid_encoding") from None
    return text
