"""User-facing errors.

`EETuneError` is raised for bad input anywhere in the library (a wrong exit layer, a missing
model path, an exits directory that does not match its backbone ...). Its message is one line
naming the problem and the fix; the CLI prints it and exits with code 2.
"""


class EETuneError(Exception):
    """Bad input or an unusable artefact; the message is a one-line reason and remedy."""
