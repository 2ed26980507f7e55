"""User-facing errors.

`EETuneError` is raised for bad input anywhere in the library (a wrong exit layer, a missing
model path, an exits directory that does not match its backbone ...). Its message is one line
naming the problem and the fix; the CLI prints it and exits with code 2. `Interrupted` (a Ctrl-C
that a run handled: what it saved and how to continue) exits with 130, as shells expect.
"""


class EETuneError(Exception):
    """Bad input or an unusable artefact; the message is a one-line reason and remedy."""

    exit_code = 2


class Interrupted(EETuneError):
    """The user stopped a long run (Ctrl-C) and it stopped cleanly; the message says how to go on."""

    exit_code = 130
