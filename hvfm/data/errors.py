"""The one error type the data side raises for bad input that the user must fix.

Its message is a single line that names the file (or field) and what to do about it; the command
line entry points print it as `error: ...` and exit with code 2 instead of a stack trace.
"""


class DataError(ValueError):
    """Bad annotation file, video root or tokenizer folder: one line naming the file and the fix."""
